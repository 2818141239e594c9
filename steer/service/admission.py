"""Admission control: a cap on requests being served, a bounded queue behind it, and drain.

Beyond the queue a request is refused at once with 429 and `Retry-After`, never parked
without bound; while draining (SIGTERM) every new request gets 503.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from steer.service.errors import APIError
from steer.service.metrics import Metrics


@dataclass
class Ticket:
    released: bool = False


class Admission:
    def __init__(self, max_active: int, max_queued: int, metrics: Metrics) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_active)
        self._metrics = metrics
        self.active = 0
        self.waiting = 0
        self.draining = False

    @property
    def in_flight(self) -> int:
        return self.active + self.waiting

    def start_draining(self) -> None:
        self.draining = True

    async def acquire(self) -> Ticket:
        if self.draining:
            self._metrics.rejected.labels("draining").inc()
            raise APIError(
                503, "The server is shutting down; retry on another replica.",
                type="service_unavailable", code="draining", headers={"Retry-After": "1"},
            )
        if self._slots.locked() and self.waiting >= self.max_queued:
            self._metrics.rejected.labels("queue_full").inc()
            raise APIError(
                429,
                f"Too many requests: {self.active} in progress and {self.waiting} queued "
                "(the server's limits). Retry shortly.",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"},
            )
        self.waiting += 1
        self._metrics.queued.inc()
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            self._metrics.queued.dec()
        self.active += 1
        self._metrics.in_flight.inc()
        return Ticket()

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.active -= 1
        self._metrics.in_flight.dec()
        self._slots.release()
