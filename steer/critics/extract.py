"""Final-answer extraction from free text, shared by voting and exact-answer checks.

Each extractor returns a normalized answer string, or None when the text has no answer.
They run on the event loop over model output a client can shape, so each is linear: the
client's own `regex` pattern runs on RE2 (`patterns`); our fixed patterns stay on `re` and
use possessive quantifiers (`*+`) where adjacent whitespace runs would otherwise backtrack
quadratically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Literal

from steer.critics.patterns import compile_pattern

Extractor = Literal["last_number", "answer_line", "choice", "regex", "json"]
EXTRACTORS: tuple[str, ...] = ("last_number", "answer_line", "choice", "regex", "json")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# subtle: `[\s...]*` at each line start used to run over every following blank line, and
# `\s*(?:is)?\s*` / `(.+?)\s*$` split whitespace runs every way: quadratic in a long one.
_ANSWER_LINE = re.compile(
    r"(?im)^[ \t*#>-]*+(?:the\s++)?(?:final\s++)?answer\s*+(?:is\s*+)?[:=]\s*+(.*)$"
)
_CHOICE_MARKED = re.compile(
    r"(?i)\b(?:answer|option|choice)\s*+(?:(?:is|:)\s*+)?\(?([A-E])\)?(?![A-Za-z])"
)
_CHOICE_ANY = re.compile(r"\(([A-E])\)|(?<![A-Za-z])([A-E])(?![A-Za-z])")


def normalize_number(raw: str) -> str | None:
    text = raw.replace(",", "").strip()
    try:
        value = float(text)
    except ValueError:
        return None
    if value.is_integer():
        return str(int(value))
    return repr(round(value, 6)).rstrip("0").rstrip(".")


def last_number(text: str) -> str | None:
    for raw in reversed(_NUMBER.findall(text)):
        number = normalize_number(raw)
        if number is not None:
            return number
    return None


def answer_line(text: str) -> str | None:
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().strip("*").strip().rstrip(".").strip()
    number = normalize_number(answer) if _NUMBER.fullmatch(answer.replace(" ", "")) else None
    return number if number is not None else answer.lower() or None


def choice(text: str) -> str | None:
    marked = _CHOICE_MARKED.findall(text)
    if marked:
        return str(marked[-1]).upper()
    found = _CHOICE_ANY.findall(text)
    if not found:
        return None
    paren, bare = found[-1]
    return str(paren or bare).upper()


def json_value(text: str) -> str | None:
    """The whole text as one JSON value, in a normal form (keys sorted, no whitespace), so
    answers that differ only in layout vote together: a constrained answer, such as a tool
    call's `{"name", "arguments"}`, is all JSON."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):
        return None


def by_regex(pattern: str) -> Callable[[str], str | None]:
    """The last match of a client's pattern (its first group, if it has one), on RE2."""
    compiled = compile_pattern(pattern)
    group = 1 if compiled.groups else 0

    def extract(text: str) -> str | None:
        match = compiled.last_match(text)
        found = match.group(group) if match is not None else None
        return (found or "").strip().lower() or None

    return extract


def extractor(kind: str, pattern: str | None = None) -> Callable[[str], str | None]:
    if kind == "last_number":
        return last_number
    if kind == "answer_line":
        return answer_line
    if kind == "choice":
        return choice
    if kind == "json":
        return json_value
    if kind == "regex":
        if not pattern:
            raise ValueError("extract 'regex' needs a 'pattern'")
        return by_regex(pattern)
    raise ValueError(f"unknown extractor {kind!r}; choose from {', '.join(EXTRACTORS)}")


def normalize_reference(kind: str, reference: str | float) -> str:
    """Put a client's reference answer in the same normal form as extracted answers."""
    text = str(reference).strip()
    if kind == "last_number":
        return normalize_number(text) or text
    if kind == "choice":
        return text.strip("()").upper()
    number = normalize_number(text) if _NUMBER.fullmatch(text.replace(" ", "")) else None
    return number if number is not None else text.rstrip(".").lower()
