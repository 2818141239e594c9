"""Training-file line formats: every rule, good and bad lines, the line number in the error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from steer.training.formats import MAX_LINE_BYTES, FormatError, parse_lines, validate_jsonl

USER = {"role": "user", "content": "What is 2+2?"}
ANSWER = {"role": "assistant", "content": "4"}
SFT = {"messages": [{"role": "system", "content": "Be brief."}, USER, ANSWER]}
PREF = {"input": {"messages": [USER]}, "preferred_output": [ANSWER],
        "non_preferred_output": [{"role": "assistant", "content": "5"}]}
GRADED = {"messages": [USER], "reference": 4}


def jsonl(*lines: Any) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines).encode()


def error(*lines: Any) -> FormatError:
    with pytest.raises(FormatError) as info:
        validate_jsonl(jsonl(*lines), "fine-tune")
    return info.value


@pytest.mark.parametrize(("line", "kind"), [
    (SFT, "sft"),
    ({"messages": [USER, {"role": "assistant", "content": "4", "weight": 0}, USER, ANSWER]},
     "sft"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]},
     "sft"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
      "function": {"name": "add", "arguments": "{\"a\": 2}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "4"}, ANSWER],
      "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}],
      "parallel_tool_calls": False}, "sft"),
    (PREF, "preference"),
    ({**PREF, "input": {"messages": [USER], "tools": []}}, "preference"),
    (GRADED, "graded"),
    ({"messages": [USER], "reference": "four", "difficulty": {"level": 1}, "tags": ["x"]},
     "graded"),
    ({"messages": [USER]}, "graded"),  # a label-free line: the grader reads no field
])
def test_good_lines(line: dict[str, Any], kind: str) -> None:
    assert validate_jsonl(jsonl(line, line), "fine-tune") == (kind, 2)


@pytest.mark.parametrize(("bad", "message"), [
    ({"messages": [USER, {"role": "bot", "content": "4"}]},
     "messages[1].role must be one of system/user/assistant/tool"),
    ({"messages": [USER]}, "messages[0] must be an assistant message"),
    ({"messages": [USER, {"role": "assistant", "content": "4", "weight": 2}]},
     "messages[1].weight: Input should be 0 or 1"),
    ({"messages": [USER, {"role": "assistant", "content": "4", "weight": 0}]},
     "every assistant message has weight 0"),
    ({"messages": [USER, {"role": "assistant", "content": 4}]},
     "messages[1].content: must be a string or a non-empty list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                   ANSWER]}, "messages[0].content: part [0]: type: Input should be 'text'"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages[1] needs content or tool_calls"),
    ({"messages": [USER, {"role": "assistant", "content": "4", "mood": "happy"}]},
     "messages[1].mood is not a field of this format"),
    ({**SFT, "temperature": 0.5}, "temperature is not a field of this format"),
    ({"messages": [{"role": "tool", "content": "4"}, ANSWER]},
     "messages[0].tool_call_id is required"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
      "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages[1].tool_calls[0].function.arguments: Input should be a valid string"),
    ({**SFT, "tools": [{"type": "retrieval"}]}, "tools[0].type: Input should be 'function'"),
    ({"messages": []}, "messages must be a non-empty list of messages"),
    ({"messages": "hi"}, "messages: Input should be a valid list"),
])
def test_bad_sft_lines_name_line_and_problem(bad: dict[str, Any], message: str) -> None:
    exc = error(SFT, SFT, bad)
    assert exc.line == 3
    assert str(exc).startswith(f"line 3: {message}"), str(exc)
    assert exc.param == "file"


@pytest.mark.parametrize(("bad", "message"), [
    ({k: v for k, v in PREF.items() if k != "non_preferred_output"},
     "non_preferred_output is required"),
    ({**PREF, "preferred_output": [ANSWER, ANSWER]},
     "preferred_output must be a list of exactly one assistant message"),
    ({**PREF, "non_preferred_output": [USER]},
     "non_preferred_output must be a list of exactly one assistant message"),
    ({**PREF, "preferred_output": ANSWER}, "preferred_output: Input should be a valid list"),
    ({**PREF, "input": {"messages": [USER, ANSWER]}},
     "input.messages[1] must be a user message"),
    ({**PREF, "input": {"messages": [USER], "seed": 1}}, "input.seed is not a field"),
    ({**PREF, "preferred_output": [{**ANSWER, "weight": 1}]},
     "preferred_output[0].weight is not a field"),
    ({**PREF, "chosen": "x"}, "chosen is not a field of this format"),
])
def test_bad_preference_lines(bad: dict[str, Any], message: str) -> None:
    exc = error(PREF, bad)
    assert exc.line == 2
    assert str(exc).startswith(f"line 2: {message}"), str(exc)


@pytest.mark.parametrize(("bad", "message"), [
    ({"messages": [USER], "reference": [4]}, "reference must be a string or a number"),
    ({"messages": [USER], "reference": True}, "reference must be a string or a number"),
    ({"messages": [USER, ANSWER, {"role": "system", "content": "x"}], "reference": 4},
     "messages[2] must be a user message"),
    ({"messages": [{"role": "user"}], "reference": 4}, "messages[0].content is required"),
    ({"reference": 4}, "messages is required"),
    ({"messages": [USER], "tools": "none"}, "tools: Input should be a valid list"),
])
def test_bad_graded_lines(bad: dict[str, Any], message: str) -> None:
    exc = error(GRADED, GRADED, GRADED, bad)
    assert exc.line == 4
    assert str(exc).startswith(f"line 4: {message}"), str(exc)


def test_a_file_holds_one_kind() -> None:
    exc = error(SFT, PREF)
    assert (exc.line, exc.message) == (
        2, "a preference line in a file whose line 1 is sft; a training file holds one kind "
           "of line")
    # an sft line in a graded file: what is wrong with it as a graded line
    assert str(error(GRADED, SFT)).startswith("line 2: messages[2] must be a user message")


def test_file_level_problems() -> None:
    for empty in (b"", b"\n \n", b"   "):
        with pytest.raises(FormatError) as info:
            validate_jsonl(empty, "fine-tune")
        assert info.value.line == 0 and "empty" in str(info.value)
    with pytest.raises(FormatError) as info:
        validate_jsonl(jsonl(SFT), "batch")
    assert info.value.param == "purpose"


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "line 2: not valid JSON"),
    (b"[1, 2]", "line 2: each line must be a JSON object"),
    (b"\"text\"", "line 2: each line must be a JSON object"),
    (b"\xff\xfe{}", "line 2: not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "line 2: JSON nested too deeply"),
])
def test_lines_that_are_not_json_objects(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError) as info:
        validate_jsonl(jsonl(SFT) + raw + b"\n", "fine-tune")
    assert str(info.value).startswith(message), str(info.value)


def test_line_length_cap() -> None:
    long = {"messages": [USER, {"role": "assistant", "content": "x" * MAX_LINE_BYTES}]}
    with pytest.raises(FormatError) as info:
        validate_jsonl(jsonl(SFT, long), "fine-tune")
    assert info.value.line == 2 and "bytes; at most" in str(info.value)


def test_line_count_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("steer.training.formats.MAX_LINES", 3)
    assert validate_jsonl(jsonl(SFT, SFT, SFT), "fine-tune") == ("sft", 3)
    with pytest.raises(FormatError) as info:
        validate_jsonl(jsonl(SFT, SFT, SFT, SFT), "fine-tune")
    assert info.value.line == 4 and "more than 3 lines" in str(info.value)


def test_blank_lines_are_skipped_but_counted_in_line_numbers() -> None:
    content = b"\n" + jsonl(SFT) + b"\r\n  \n" + jsonl({"messages": [USER]})
    with pytest.raises(FormatError) as info:
        validate_jsonl(content, "fine-tune")
    assert info.value.line == 5
    crlf = jsonl(SFT).replace(b"\n", b"\r\n") * 2
    assert validate_jsonl(crlf, "fine-tune") == ("sft", 2)
    assert parse_lines(b"\n" + crlf) == [SFT, SFT]
