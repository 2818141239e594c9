"""Fitting quoted text into a model's context window.

Strategies and model critics quote text a model wrote (candidates, other agents' answers,
drafts, partial solutions) inside prompts of their own. Those prompts are Steer's, not the
client's, so Steer must make them fit: `fit_prompt` shortens every quote alike, keeping each
one's head and tail around a marker, until the prompt leaves the room its answer needs.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

P = TypeVar("P")
Cut = Callable[[str], str]
# Tokenizing is the cost: a prompt is counted a few times at most, never once per character.
MAX_TRIES = 6


def shorten(text: str, keep: int) -> str:
    """`text` if it has at most `keep` characters, else its head and tail around a marker
    that says how much was cut (the tail often holds the final answer)."""
    if len(text) <= keep:
        return text
    head, tail = (keep + 1) // 2, keep // 2
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[len(text) - tail:]}"


def _cap(lengths: Sequence[int], budget: float) -> int:
    """The largest per-quote cap `keep` with sum(min(length, keep)) <= budget characters."""
    keep, spent, left = 0, 0, len(lengths)
    for length in sorted(lengths):
        fair = (budget - spent) / left
        if length > fair:
            return max(0, int(fair))
        keep, spent, left = length, spent + length, left - 1
    return keep


async def fit_prompt(
    build: Callable[[Cut], P], room: Callable[[P], Awaitable[int]], need: int
) -> P | None:
    """The prompt `build(cut)` (which passes every quote through `cut`) with quotes cut so
    it leaves `need` tokens of `room`; None when even empty quotes don't. The cut is sized
    from the tokens measured, then tightened until it fits."""
    lengths: list[int] = []

    def measure(text: str) -> str:
        lengths.append(len(text))
        return text

    full = build(measure)
    full_room = await room(full)
    if full_room >= need:
        return full
    empty = build(functools.partial(shorten, keep=0))
    empty_room = await room(empty)
    if empty_room < need:
        return None
    chars = float(sum(lengths))
    quoted = max(1, empty_room - full_room)  # tokens the quotes take in full
    for _ in range(MAX_TRIES):
        # Characters per token as measured: keep what the allowed tokens can hold, a bit less.
        chars *= 0.95 * (empty_room - need) / quoted
        prompt = build(functools.partial(shorten, keep=_cap(lengths, chars)))
        prompt_room = await room(prompt)
        if prompt_room >= need:
            return prompt
        quoted = max(1, empty_room - prompt_room)
    return empty
