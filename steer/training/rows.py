"""Training rows: OpenAI-format training lines in, TRL's conversational rows out, and the
check the trainer runs on a rows file before it imports torch.

Owns `to_trl_rows(kind, lines)` and `read_rows(path, method)`. Does not own validating an
uploaded file against OpenAI's formats (`formats.py` does that on upload; the lines reaching
here have passed it, but `to_trl_rows` still refuses what it cannot convert, naming the line).

The TRL shapes (TRL 1.16, conversational):
- SFT: `{"prompt": [messages...], "completion": [assistant message]}`. SFTTrainer renders
  the prompt with the chat template and `add_generation_prompt=True`, renders prompt +
  completion, and (`completion_only_loss` defaults to True for prompt/completion rows) puts
  the loss on the completion's tokens only: the answer and its `<|im_end|>`, never the
  system prompt or the question.
- DPO: `{"prompt": [messages...], "chosen": [assistant], "rejected": [assistant]}`.

OpenAI's `weight` on assistant messages (0 or 1, default 1: every assistant message is
trained unless weighted 0) maps onto rows like this: each assistant message with weight 1
becomes one row whose prompt is the conversation before it and whose completion is that
message, so every trained message gets the loss, in its own context, and nothing else does;
an assistant message with weight 0 stays in later rows' prompts as context and gets no row.
A line with no trained assistant message yields no row.

Messages keep `role` and `content` only (the default model's chat template reads nothing
else); content given as text parts is joined.

Exceptions: `RowError(ValueError)` with the 1-based `line` it is about.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

Message = dict[str, str]
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
SFT_KEYS = ("prompt", "completion")
DPO_KEYS = ("prompt", "chosen", "rejected")


class RowError(ValueError):
    """A training line that cannot become a TRL row."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


def to_trl_rows(kind: Literal["sft", "preference"], lines: Iterable[Mapping[str, Any]]
                ) -> list[dict[str, list[Message]]]:
    """Convert OpenAI-format training lines ("sft" or "preference") into TRL rows."""
    rows: list[dict[str, list[Message]]] = []
    for number, line in enumerate(lines, start=1):
        if kind == "sft":
            rows.extend(_sft_rows(number, line))
        elif kind == "preference":
            rows.append(_preference_row(number, line))
        else:
            raise ValueError(f"no TRL rows for training lines of kind {kind!r}")
    return rows


def _sft_rows(number: int, line: Mapping[str, Any]) -> list[dict[str, list[Message]]]:
    raw = line.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RowError(number, "'messages' must be a non-empty list")
    context: list[Message] = []
    rows: list[dict[str, list[Message]]] = []
    for index, message in enumerate(raw):
        clean = _message(number, message, f"messages[{index}]")
        if clean["role"] == "assistant" and _weight(number, message, index) == 1 and context:
            rows.append({"prompt": list(context), "completion": [clean]})
        context.append(clean)
    return rows


def _weight(number: int, message: Mapping[str, Any], index: int) -> int:
    weight = message.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise RowError(number, f"messages[{index}].weight must be 0 or 1, got {weight!r}")
    return int(weight)


def _preference_row(number: int, line: Mapping[str, Any]) -> dict[str, list[Message]]:
    source = line.get("input")
    messages = source.get("messages") if isinstance(source, Mapping) else None
    if not isinstance(messages, list) or not messages:
        raise RowError(number, "'input.messages' must be a non-empty list")
    prompt = [_message(number, m, f"input.messages[{i}]") for i, m in enumerate(messages)]
    row = {"prompt": prompt}
    for field, target in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        output = line.get(field)
        if not isinstance(output, list) or len(output) != 1:
            raise RowError(number, f"'{field}' must be a list of one assistant message")
        clean = _message(number, output[0], f"{field}[0]")
        if clean["role"] != "assistant":
            raise RowError(number, f"'{field}[0]' must be an assistant message")
        row[target] = [clean]
    return row


def _message(number: int, message: object, where: str) -> Message:
    if not isinstance(message, Mapping):
        raise RowError(number, f"{where} must be an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise RowError(number, f"{where}.role must be one of {sorted(ROLES)}, got {role!r}")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise RowError(number, f"{where}.content parts must all be text parts")
        content = "".join(str(p) for p in parts)
    if not isinstance(content, str):
        raise RowError(number, f"{where}.content must be a string")
    # subtle: the default model's template has no developer role; OpenAI treats it as system.
    return {"role": "system" if role == "developer" else str(role), "content": content}


def read_rows(path: Path, method: Literal["sft", "dpo"]) -> list[dict[str, list[Message]]]:
    """Read and check a TRL rows file (JSONL) for `method`; RowError names the bad line."""
    keys = SFT_KEYS if method == "sft" else DPO_KEYS
    rows: list[dict[str, list[Message]]] = []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RowError(number, f"not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or set(row) != set(keys):
                got = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise RowError(number, f"a {method} row has exactly the keys {list(keys)}, "
                                       f"got {got}")
            clean: dict[str, list[Message]] = {}
            for key in keys:
                value = row[key]
                if not isinstance(value, list) or not value:
                    raise RowError(number, f"'{key}' must be a non-empty list of messages")
                clean[key] = [_message(number, m, f"{key}[{i}]") for i, m in enumerate(value)]
                if key != "prompt" and [m["role"] for m in clean[key]] != ["assistant"]:
                    raise RowError(number, f"'{key}' must be one assistant message")
            rows.append(clean)
    if not rows:
        raise RowError(0, f"{path.name} holds no training rows")
    return rows
