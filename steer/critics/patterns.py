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
import time
from typing import Annotated, Any, Protocol

import re2
from pydantic import AfterValidator, Field

MAX_PATTERN_CHARS = 1000
# RE2 instructions. Matching costs at most text length x program size when RE2 has to fall
# back from its DFA to the NFA (a DFA that outgrows MAX_MEM); 2000 allows `\pL+` or
# `.{1,200}` and keeps the worst search over 64 KiB of output near a second. RE2 releases
# the GIL while it matches, so critics run it in a thread, off the event loop.
MAX_PROGRAM_SIZE = 2000
# RE2's own cap on compiled program + DFA cache memory, per pattern (its default is 8 MiB).
MAX_MEM = 2 << 20
MAX_MATCHES = 1000
LAST_MATCH_SECONDS = 0.25


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
        return self._re.search(_encodable(text))  # type: ignore[no-any-return]

    def fullmatch(self, text: str) -> Match | None:
        return self._re.fullmatch(_encodable(text))  # type: ignore[no-any-return]

    def last_match(self, text: str) -> Match | None:
        """The last of `re.finditer`'s matches, looking at the first MAX_MATCHES and for at
        most LAST_MATCH_SECONDS.

        subtle: one RE2 search is linear, but iterating is not: each search may scan to the
        end of the text before settling on a short match (`a*b|a` over "aaaa..."), so n
        matches can cost n x len(text). Hence the caps; only such patterns ever reach them.
        """
        deadline = time.monotonic() + LAST_MATCH_SECONDS
        last = None
        for count, match in enumerate(self._re.finditer(_encodable(text)), 1):
            last = match
            if count >= MAX_MATCHES or time.monotonic() > deadline:
                break
        return last


def _encodable(text: str) -> str:
    """subtle: JSON can carry lone surrogates ("\\ud800"), which RE2's UTF-8 can't encode;
    each becomes "?", so every other character keeps its place."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


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
