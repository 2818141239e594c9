"""Training-file line formats: what a `fine-tune` JSONL file may hold, checked line by line.

Three kinds, one per file (OpenAI's documented fine-tuning formats, plus Steer's graded lines):

- "sft": OpenAI's chat format, `{"messages": [...], "tools"?, "parallel_tool_calls"?}`; the
  last message is the assistant's, and every assistant message may carry `weight` 0 or 1
  (0: shown as context, not trained on).
- "preference": OpenAI's DPO format, `{"input": {"messages": [...], "tools"?,
  "parallel_tool_calls"?}, "preferred_output": [assistant message], "non_preferred_output":
  [assistant message]}`; the input ends with a user message.
- "graded": OpenAI's reinforcement format, `{"messages": [... ending with a user message],
  ...any other fields}`; a grader reads the other fields as `{{item.<field>}}`. `reference`,
  when given, is a string or a number.

A line's kind follows from its shape: `input` / `preferred_output` / `non_preferred_output`
make it a preference line, else messages ending with the assistant an sft line, else a graded
line. Blank lines are skipped (numbering counts them, so messages name the line an editor
shows). The closed formats forbid unknown fields, as OpenAI's do.

Exceptions: `FormatError(line, message, param="file")`; `line` is 0 for the file as a whole.

Not here: storing files (`steer.store.files`), converting lines to TRL rows (`trainer`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

KINDS = ("sft", "preference", "graded")
PURPOSES = ("fine-tune",)
MAX_LINES = 100_000
MAX_LINE_BYTES = 1 << 20
MAX_MESSAGES = 1024
ROLES = ("system", "user", "assistant", "tool")


class FormatError(ValueError):
    """A line (or the whole file, `line == 0`) is not a valid training line."""

    def __init__(self, line: int, message: str, param: str = "file") -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message
        self.param = param  # the request field at fault


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Closed):
    type: Literal["text"]
    text: str


def _content(value: Any, optional: bool = False) -> Any:
    """A message's content: a string or a list of text parts (no images or audio here)."""
    if value is None and optional:
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        for i, part in enumerate(value):
            try:
                TextPart.model_validate(part)
            except ValidationError as exc:
                raise ValueError(f"part [{i}]: {_first_problem(exc)} (only text parts, "
                                 "{\"type\": \"text\", \"text\": ...}, are accepted)") from None
        return value
    raise ValueError("must be a string or a non-empty list of text parts")


Content = Annotated[Any, AfterValidator(_content)]
OptionalContent = Annotated[Any, AfterValidator(lambda v: _content(v, optional=True))]


class ToolFunction(_Closed):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Closed):
    type: Literal["function"]
    function: ToolFunction


class CalledFunction(_Closed):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Closed):
    id: str
    type: Literal["function"]
    function: CalledFunction


class SystemMessage(_Closed):
    role: Literal["system"]
    content: Content
    name: str | None = None


class UserMessage(_Closed):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Closed):
    role: Literal["assistant"]
    content: OptionalContent = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, min_length=1)
    weight: Literal[0, 1] | None = None


class ToolMessage(_Closed):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


MESSAGE_MODELS: dict[str, type[_Closed]] = {
    "system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage,
    "tool": ToolMessage,
}


class _Chat(_Closed):
    messages: list[dict[str, Any]]
    tools: list[Tool] | None = None
    parallel_tool_calls: bool | None = None


class PreferenceLine(_Closed):
    input: _Chat
    preferred_output: list[dict[str, Any]]
    non_preferred_output: list[dict[str, Any]]


def _loc(loc: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _first_problem(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    where = _loc(tuple(err.get("loc", ())), prefix)
    if err.get("type") == "extra_forbidden":
        return f"{where} is not a field of this format"
    if err.get("type") == "missing":
        return f"{where} is required"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _messages(raw: Any, where: str) -> list[dict[str, Any]]:
    """Each message checked against its role's model; the problem named by its path."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where} must be a non-empty list of messages")
    if len(raw) > MAX_MESSAGES:
        raise ValueError(f"{where} has {len(raw)} messages; at most {MAX_MESSAGES}")
    for i, message in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{at} must be an object")
        role = message.get("role")
        model = MESSAGE_MODELS.get(role) if isinstance(role, str) else None
        if model is None:
            raise ValueError(f"{at}.role must be one of {'/'.join(ROLES)}")
        try:
            checked = model.model_validate(message)
        except ValidationError as exc:
            raise ValueError(_first_problem(exc, at)) from None
        if isinstance(checked, AssistantMessage) and checked.content is None \
                and checked.tool_calls is None:
            raise ValueError(f"{at} needs content or tool_calls")
    return raw


def _check_chat(line: dict[str, Any], where: str = "") -> list[dict[str, Any]]:
    prefix = f"{where}." if where else ""
    try:
        _Chat.model_validate(line)
    except ValidationError as exc:
        raise ValueError(_first_problem(exc, where)) from None
    return _messages(line["messages"], f"{prefix}messages")


def _sft(line: dict[str, Any]) -> None:
    messages = _check_chat(line)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"messages[{len(messages) - 1}] must be an assistant message (the "
                         "answer to train on)")
    if not any(m.get("weight", 1) == 1 for m in messages if m["role"] == "assistant"):
        raise ValueError("every assistant message has weight 0: nothing to train on")


def _preference(line: dict[str, Any]) -> None:
    try:
        PreferenceLine.model_validate(line)
    except ValidationError as exc:
        raise ValueError(_first_problem(exc)) from None
    messages = _check_chat(line["input"], "input")
    if messages[-1]["role"] != "user":
        raise ValueError(f"input.messages[{len(messages) - 1}] must be a user message "
                         "(the prompt both outputs answer)")
    for field in ("preferred_output", "non_preferred_output"):
        outputs = _messages(line[field], field)
        if len(outputs) != 1 or outputs[0]["role"] != "assistant":
            raise ValueError(f"{field} must be a list of exactly one assistant message")
        if "weight" in outputs[0]:
            raise ValueError(f"{field}[0].weight is not a field of this format")


def _graded(line: dict[str, Any]) -> None:
    if "messages" not in line:
        raise ValueError("messages is required")
    messages = _messages(line["messages"], "messages")
    if messages[-1]["role"] != "user":
        raise ValueError(f"messages[{len(messages) - 1}] must be a user message (the prompt "
                         "the grader's samples answer)")
    if "reference" in line and (isinstance(line["reference"], bool)
                                or not isinstance(line["reference"], str | int | float)):
        raise ValueError("reference must be a string or a number")
    for name in ("tools", "parallel_tool_calls"):
        if name in line:  # OpenAI's own fields keep their meaning here too
            _check_chat({"messages": messages, name: line[name]})


_CHECKS = {"sft": _sft, "preference": _preference, "graded": _graded}


def kind_of(line: dict[str, Any]) -> str:
    """Which format a line is written in, from its shape (before checking it)."""
    if {"input", "preferred_output", "non_preferred_output"} & set(line):
        return "preference"
    messages = line.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        return "sft"
    return "graded"


def _records(content: bytes) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; FormatError at the first bad one."""
    if not content.strip():
        raise FormatError(0, "the file is empty: a training file needs at least one line")
    records: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(content.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_BYTES:
            raise FormatError(number, f"the line is {len(raw)} bytes; at most {MAX_LINE_BYTES}")
        if len(records) >= MAX_LINES:
            raise FormatError(number, f"the file has more than {MAX_LINES} lines")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(number, f"not UTF-8 text ({exc.reason} at byte {exc.start})") \
                from None
        try:
            value = json.loads(text)
        except RecursionError:
            raise FormatError(number, "JSON nested too deeply") from None
        except ValueError as exc:
            raise FormatError(number, f"not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise FormatError(number, "each line must be a JSON object")
        records.append((number, value))
    return records


def _mixed(this: str, kind: str, first: int) -> str:
    return (f"a {this} line in a file whose line {first} is {kind}; a training file holds one "
            "kind of line")


def validate_jsonl(content: bytes, purpose: str) -> tuple[str, int]:
    """The file's kind and its number of lines, or `FormatError` naming the first bad line."""
    if purpose not in PURPOSES:
        raise FormatError(0, f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    records = _records(content)
    kind = None
    first = 0
    for number, line in records:
        this = kind_of(line)
        if kind is None:
            kind, first = this, number
        elif this != kind:
            if "preference" not in (this, kind):
                # sft and graded lines differ only in their last message: say what is wrong
                # with this one as the file's kind (e.g. a bad role there)
                try:
                    _CHECKS[kind](line)
                except ValueError as exc:
                    raise FormatError(number, f"{exc} ({kind} format)") from None
            raise FormatError(number, _mixed(this, kind, first))
        try:
            _CHECKS[this](line)
        except ValueError as exc:
            raise FormatError(number, f"{exc} ({this} format)") from None
    assert kind is not None  # _records refused a file without lines
    return kind, len(records)


def parse_lines(content: bytes) -> list[dict[str, Any]]:
    """The objects of an already validated file, in order (blank lines skipped)."""
    return [line for _, line in _records(content)]
