"""Recently tokenized prompts, so a prompt counted against a budget is not tokenized again
when it is generated (strategies count every prompt before they send it). Bounded by the
characters it holds, not by entries: one client prompt can be 100k+ characters."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from steer.engine.types import Prompt

MAX_CHARS = 4 * 2**20


def prompt_key(prompt: Prompt) -> tuple[Hashable, int]:
    """A hashable key for a prompt, and its size in characters."""
    if isinstance(prompt, str):
        return prompt, len(prompt)
    messages = tuple(prompt)
    # Tools and calls are part of what the template renders, so of the key and its size.
    return messages, sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls)
                         + sum(len(t.parameters or "") + len(t.description or "")
                               for t in m.tools)
                         for m in messages)


class TokenCache:
    """LRU of prompt -> token ids; safe to use from tokenizer threads."""

    def __init__(self, max_chars: int = MAX_CHARS) -> None:
        self.max_chars = max_chars
        self._items: OrderedDict[Hashable, tuple[list[int], int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> list[int] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, chars: int, ids: list[int]) -> None:
        if chars > self.max_chars:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (ids, chars)
            self._chars += chars
            while self._chars > self.max_chars:
                _, (_, dropped) = self._items.popitem(last=False)
                self._chars -= dropped
