"""Steered chat requests to the Steer server, many at once, for the expert-iteration loop:
`SteerCaller.chat` sends one (backing off on 429/503 as the server's Retry-After says,
retrying transport errors and 5xx a few times), `SteerCaller.map` runs a coroutine over
items with a fixed number in flight (so the engine batches them) and stops taking new items
once the job is cancelled.

A request that still fails is one failed item (`chat` returns None, `last_error` keeps its
message), never the whole round: one over-long prompt must not fail a job. Whether a round
with every item failed is fatal is the caller's call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

CHAT = "/v1/chat/completions"
BUSY = (429, 503)


@dataclass(frozen=True)
class Answer:
    """What one steered response gives the loop."""

    content: str | None
    trace: dict[str, Any] | None
    tokens: int  # usage.total_tokens: every model call the search made


class Cancelled(Exception):
    """The job was cancelled while requests were being sent."""


def retry_after(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait before retrying: the server's Retry-After (seconds or an HTTP date),
    else exponential backoff from 0.25 s, capped at 10 s."""
    header = response.headers.get("retry-after")
    if header:
        try:
            return min(max(float(header), 0.0), 60.0)
        except ValueError:
            try:
                return min(max(parsedate_to_datetime(header).timestamp() - time.time(), 0.0),
                           60.0)
            except (TypeError, ValueError):
                pass
    return min(0.25 * 2.0**attempt, 10.0)


class SteerCaller:
    def __init__(self, client: httpx.AsyncClient, concurrency: int,
                 cancelled: Callable[[], Awaitable[bool]],
                 event: Callable[..., Awaitable[None]] | None = None,
                 busy_retries: int = 40, error_retries: int = 2, poll_s: float = 1.0) -> None:
        self.client = client
        self.concurrency = concurrency
        self._cancelled = cancelled
        self._event = event
        self.busy_retries = busy_retries
        self.error_retries = error_retries
        self.poll_s = poll_s
        self.last_error: str | None = None
        self.busy_waits = 0  # 429/503 answers waited out
        self._stop = False
        self._polled = 0.0

    async def stopped(self) -> bool:
        """Whether the job was cancelled (asks the store at most once per `poll_s`)."""
        if not self._stop and time.monotonic() - self._polled >= self.poll_s:
            self._polled = time.monotonic()
            self._stop = await self._cancelled()
        return self._stop

    async def chat(self, body: dict[str, Any]) -> Answer | None:
        """One chat completion; None when it failed after its retries or the job was
        cancelled while it waited (`map` raises Cancelled then)."""
        busy = errors = 0
        while True:
            if await self.stopped():
                return None
            try:
                r = await self.client.post(CHAT, json=body)
            except httpx.TransportError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                errors += 1
                if errors > self.error_retries:
                    return None
                await asyncio.sleep(min(0.5 * 2**errors, 5.0))
                continue
            if r.status_code == 200:
                data = r.json()
                choices = data.get("choices") or [{}]
                usage = data.get("usage") or {}
                return Answer((choices[0].get("message") or {}).get("content"),
                              data.get("steering_trace"), int(usage.get("total_tokens") or 0))
            self.last_error = f"HTTP {r.status_code}: {_message(r)}"
            if r.status_code in BUSY and busy < self.busy_retries:
                await asyncio.sleep(retry_after(r, busy))
                busy += 1
                self.busy_waits += 1
                continue
            if r.status_code >= 500 and errors < self.error_retries:
                errors += 1
                await asyncio.sleep(min(0.5 * 2**errors, 5.0))
                continue
            return None

    async def map(self, fn: Callable[[int], Awaitable[None]], items: Iterable[int]) -> None:
        """Run `fn` on every item, `concurrency` at a time; raises Cancelled after the
        requests in flight end when the job is cancelled."""
        queue = list(items)
        queue.reverse()

        async def worker() -> None:
            while queue:
                if await self.stopped():
                    return
                if queue:  # subtle: another worker may have taken the last item meanwhile
                    await fn(queue.pop())

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(queue)))))
        if self._stop:
            raise Cancelled("cancelled")


def _message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error") or {}
        return str(err.get("message") or r.text[:200])
    except ValueError:
        return r.text[:200]
