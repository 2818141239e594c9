"""Client-supplied regular expressions, compiled with RE2 (linear time: no backtracking).

Every pattern a client sends goes through `compile_pattern`: the `regex` critic, the `regex`
extractor (`extract: "regex"` + `pattern`), and the JSON-schema `pattern` / `patternProperties`
keywords. Python's `re` backtracks, so one pattern like `(.*a){20}x` against model output
would hold the event loop (and `/health`) for minutes; RE2 matches in time linear in the text.
Our own fixed patterns (extract.py's) stay on `re`; they are written not to backtrack.

RE2 refuses what needs backtracking (backreferences, lookaround) and programs over its
memory cap: `compile_pattern` raises `ValueError` with RE2's reason, which option validation
turns into a 400 naming the field. It does not own what a match means (search vs fullmatch,
which group): callers do.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Protocol

import re2
from pydantic import AfterValidator, Field

MAX_PATTERN_CHARS = 1000
# RE2 instructions. Matching costs at most text length x program size when RE2 has to fall
# back from its DFA to the NFA (captures); this keeps that under a second for long outputs.
MAX_PROGRAM_SIZE = 4096
# RE2's own cap on compiled program + DFA cache memory, per pattern (its default is 8 MiB).
MAX_MEM = 2 << 20


def _options() -> Any:
    options = re2.Options()
    options.max_mem = MAX_MEM
    options.log_errors = False  # RE2 would print every refused client pattern to stderr
    return options


class Match(Protocol):
    def group(self, index: int = 0, /) -> str | None: ...


class ClientPattern:
    """A client's pattern compiled by RE2, with the few `re` methods we use."""

    def __init__(self, compiled: Any) -> None:
        self._re = compiled
        self.groups: int = compiled.groups
        self.pattern: str = compiled.pattern

    def search(self, text: str) -> Match | None:
        return self._call("search", text)  # type: ignore[no-any-return]

    def fullmatch(self, text: str) -> Match | None:
        return self._call("fullmatch", text)  # type: ignore[no-any-return]

    def findall_matches(self, text: str) -> list[Match]:
        """Every non-overlapping match, like `list(re.finditer(...))`."""
        return self._call("finditer", text)  # type: ignore[no-any-return]

    def _call(self, method: str, text: str) -> Any:
        try:
            return _run(self._re, method, text)
        except UnicodeEncodeError:
            # subtle: JSON can carry lone surrogates ("\ud800"), which RE2's UTF-8 can't
            # encode; "?" keeps every other character at its place.
            return _run(self._re, method, text.encode("utf-8", "replace").decode("utf-8"))


def _run(compiled: Any, method: str, text: str) -> Any:
    result = getattr(compiled, method)(text)
    return list(result) if method == "finditer" else result


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> ClientPattern:
    """The RE2 program for a client's pattern; `ValueError` when RE2 can't or won't run it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"invalid regex: longer than {MAX_PATTERN_CHARS} characters")
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(
            f"invalid regex: RE2 cannot compile it ({reason}); client patterns run on RE2, "
            "in linear time, without backreferences or lookaround"
        ) from exc
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise ValueError(
            f"invalid regex: too complex for RE2 ({compiled.programsize} instructions, at most "
            f"{MAX_PROGRAM_SIZE})"
        )
    return ClientPattern(compiled)


def check_pattern(pattern: str) -> str:
    """A pydantic after-validator: the pattern itself, once RE2 has compiled it."""
    compile_pattern(pattern)
    return pattern


# A client pattern as an options field: refused by length before RE2 compiles it.
PatternStr = Annotated[str, Field(max_length=MAX_PATTERN_CHARS), AfterValidator(check_pattern)]
