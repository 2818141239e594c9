"""Fitting quoted text into a model's context window.

Strategies and model critics quote text a model wrote (candidates, other agents' answers,
drafts, partial solutions) inside prompts of their own. Those prompts are Steer's, not the
client's, so Steer must make them fit: `fit_prompt` shortens every quote alike, keeping each
one's head and tail around a marker, until the prompt leaves the room its answer needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

P = TypeVar("P")
Cut = Callable[[str], str]


def shorten(text: str, keep: int) -> str:
    """`text` if it has at most `keep` characters, else its head and tail around a marker
    that says how much was cut (the tail often holds the final answer)."""
    if len(text) <= keep:
        return text
    head, tail = (keep + 1) // 2, keep // 2
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[len(text) - tail:]}"


def fit_prompt(build: Callable[[Cut], P], room: Callable[[P], int], need: int) -> P | None:
    """The prompt `build(cut)` (which passes every quote through `cut`) with the longest
    quotes that still leave `need` tokens of `room`; None when even empty quotes don't."""
    lengths: list[int] = []

    def measure(text: str) -> str:
        lengths.append(len(text))
        return text

    full = build(measure)
    if room(full) >= need:
        return full
    best = build(lambda text: shorten(text, 0))
    if room(best) < need:
        return None
    low, high = 0, max(lengths, default=0)  # the most characters per quote that fit
    while low < high:
        mid = (low + high + 1) // 2
        prompt = build(functools.partial(shorten, keep=mid))
        if room(prompt) >= need:
            low, best = mid, prompt
        else:
            high = mid - 1
    return best
