"""Admission control, weighed in work: what a request will ask of the engine, not how many
HTTP requests there are.

A request's work is the tokens it may make the engine process (sequences x max new tokens,
plus its prompt), known before its first engine call. Rules, checked on arrival:

- the server runs at most `capacity` tokens of work at once (queued requests wait, bounded
  by count: `max_queued`);
- heavy requests (more than `light_work`, e.g. an amplified best-of-16) together hold at most
  `heavy_share` of it, so plain requests always find room while a flood of amplified ones is
  refused;
- one key (API key or `user`) holds at most `key_share` of it;
- at most `max_active` requests run at once, `max_queued` wait behind them.

Beyond any of these a request is refused at once with 429 and `Retry-After`, never parked
without bound; while draining (SIGTERM) every new request gets 503. A single request larger
than the heavy share is admitted alone (it is clamped), so nothing the caps allow is refused
forever.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from steer.service.errors import APIError
from steer.service.metrics import Metrics


@dataclass
class Ticket:
    work: int
    heavy: bool
    key: str | None
    released: bool = False


@dataclass(frozen=True)
class WorkLimits:
    capacity: int
    light_work: int
    heavy_share: float = 0.75
    key_share: float = 0.5


class Admission:
    def __init__(self, max_active: int, max_queued: int, metrics: Metrics,
                 limits: WorkLimits | None = None) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.limits = limits or WorkLimits(capacity=2**62, light_work=2**62)
        self._metrics = metrics
        self.active = 0
        self.waiting = 0
        self.work = 0  # admitted and queued
        self.heavy_work = 0
        self._by_key: dict[str, int] = {}
        self._queue: deque[tuple[asyncio.Future[None], Ticket]] = deque()
        self._running_work = 0
        self.draining = False

    @property
    def in_flight(self) -> int:
        return self.active + self.waiting

    def start_draining(self) -> None:
        self.draining = True

    def _refuse(self, reason: str, message: str) -> APIError:
        self._metrics.rejected.labels(reason).inc()
        return APIError(429, message, type="rate_limit_error", code=reason,
                        headers={"Retry-After": "1"})

    def _check(self, work: int, heavy: bool, key: str | None) -> None:
        lim = self.limits
        if self.draining:
            self._metrics.rejected.labels("draining").inc()
            raise APIError(
                503, "The server is shutting down; retry on another replica.",
                type="service_unavailable", code="draining", headers={"Retry-After": "1"},
            )
        if key is not None and self._by_key.get(key, 0) and (
                self._by_key[key] + work > lim.key_share * lim.capacity):
            raise self._refuse("key_limit", (
                f"Too much work in flight for this key: {self._by_key[key]} tokens running or "
                f"queued, this request asks for {work} more, a key may hold "
                f"{int(lim.key_share * lim.capacity)}. Retry shortly."))
        if heavy and self.heavy_work and (
                self.heavy_work + work > lim.heavy_share * lim.capacity):
            raise self._refuse("server_busy", (
                f"The server is busy with amplified requests ({self.heavy_work} tokens of work "
                f"in flight; this request asks for {work}). Retry shortly, or ask for less."))
        if self.active < self.max_active and self._fits(work) and not self._queue:
            return
        if self.waiting >= self.max_queued:
            raise self._refuse("queue_full", (
                f"Too many requests: {self.active} in progress and {self.waiting} queued "
                "(the server's limits). Retry shortly."))

    def _fits(self, work: int) -> bool:
        return self._running_work == 0 or self._running_work + work <= self.limits.capacity

    async def acquire(self, work: int = 1, key: str | None = None) -> Ticket:
        lim = self.limits
        work = max(1, min(work, int(lim.heavy_share * lim.capacity)))
        heavy = work > lim.light_work
        self._check(work, heavy, key)
        ticket = Ticket(work, heavy, key)
        self._hold(ticket, +1)
        if self.active < self.max_active and self._fits(work) and not self._queue:
            self._start(ticket)
            return ticket
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (future, ticket)
        self._queue.append(entry)
        self.waiting += 1
        self._metrics.queued.inc()
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self._stop(ticket)  # admitted just as we were cancelled: give it back
            elif entry in self._queue:
                self._queue.remove(entry)
            self._hold(ticket, -1)
            ticket.released = True
            self._wake()
            raise
        finally:
            self.waiting -= 1
            self._metrics.queued.dec()
        return ticket

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self._stop(ticket)
        self._hold(ticket, -1)
        self._wake()

    # -- bookkeeping -----------------------------------------------------------------------

    def _hold(self, ticket: Ticket, sign: int) -> None:
        self.work += sign * ticket.work
        if ticket.heavy:
            self.heavy_work += sign * ticket.work
        if ticket.key is not None:
            held = self._by_key.get(ticket.key, 0) + sign * ticket.work
            if held:
                self._by_key[ticket.key] = held
            else:
                self._by_key.pop(ticket.key, None)
        self._metrics.admitted_work.set(self.work)

    def _start(self, ticket: Ticket) -> None:
        self.active += 1
        self._running_work += ticket.work
        self._metrics.in_flight.inc()

    def _stop(self, ticket: Ticket) -> None:
        self.active -= 1
        self._running_work -= ticket.work
        self._metrics.in_flight.dec()

    def _wake(self) -> None:
        """Admit queued requests in arrival order while they fit."""
        while self._queue and self.active < self.max_active:
            future, ticket = self._queue[0]
            if future.done():  # cancelled while waiting; its waiter removes it
                self._queue.popleft()
                continue
            if not self._fits(ticket.work):
                return
            self._queue.popleft()
            self._start(ticket)
            future.set_result(None)
