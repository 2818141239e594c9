"""Storing finished chat completions (OpenAI's `store: true`), off the request path.

A route hands a finished answer to `Recorder.submit`, which only decides whether to keep it
(the request's `store`, else the server's `STEER_STORE`) and puts it on a bounded in-process
queue: it never awaits, never blocks, never serializes. A background task (started in the
app's lifespan) drains the queue in batches, turns each answer into a row (request, response,
usage, model/adapter, steering spec, trace, chosen score) and inserts the batch in one
transaction. A full queue drops the answer with a logged warning and a counted metric; a
failed insert is logged and counted; shutdown flushes what is queued.

Not here: the queries (`steer.store.completions`) and the routes (`stored.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from steer.search import SteeringSpec, Trace
from steer.service.metrics import Metrics
from steer.service.protocol import ChatCompletion, ChatCompletionRequest
from steer.store import Database
from steer.store.completions import NewCompletion, insert_completions

logger = logging.getLogger(__name__)
WARN_EVERY_S = 10.0  # a flood of drops logs one line per interval, with the count
FLUSH_TIMEOUT_S = 10.0  # shutdown waits this long for queued completions to be written


@dataclass(frozen=True)
class Finished:
    """An answer as the route had it: nothing is copied or serialized until the writer runs."""

    request: ChatCompletionRequest
    response: ChatCompletion | dict[str, Any]
    adapter: str | None = None
    spec: SteeringSpec | None = None
    trace: Trace | dict[str, Any] | None = None
    trace_id: str | None = None


class Recorder:
    """The bounded queue plus the background writer that empties it."""

    def __init__(self, db: Database, mode: str, metrics: Metrics, max_queue: int = 1024,
                 batch: int = 64, linger_s: float = 0.05) -> None:
        self.db = db
        self.mode = mode
        self.batch = batch
        self.linger_s = linger_s
        self.queue: asyncio.Queue[Finished] = asyncio.Queue(max_queue)
        self.task: asyncio.Task[None] | None = None
        self._dropped_since_warning = 0
        self._last_warning = -WARN_EVERY_S
        r = metrics.registry
        self.dropped = Counter("steer_store_dropped", "Completions not stored: the store's "
                               "queue was full", registry=r)
        self.written = Counter("steer_store_written", "Completions stored", registry=r)
        self.failed = Counter("steer_store_write_errors", "Completions lost to a failed insert",
                              registry=r)
        self.depth = Gauge("steer_store_queue_depth", "Completions waiting to be stored",
                           registry=r)
        self.depth.set_function(self.queue.qsize)

    def wanted(self, req: ChatCompletionRequest, steered: bool) -> bool:
        """Does this request get stored? Its own `store` wins; unset, the server's mode."""
        if req.store is not None:
            return req.store
        return self.mode == "all" or (self.mode == "steered" and steered)

    def submit(self, item: Finished) -> bool:
        """Queue `item` if it is to be stored; never waits. False: not stored (not wanted,
        or dropped because the queue is full)."""
        if not self.wanted(item.request, item.spec is not None):
            return False
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped.inc()
            self._warn_dropped()
            return False
        return True

    def _warn_dropped(self) -> None:
        self._dropped_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            logger.warning("store queue full (%d waiting): %d completion(s) not stored",
                           self.queue.qsize(), self._dropped_since_warning)
            self._last_warning, self._dropped_since_warning = now, 0

    # -- the writer --------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="steer-store-writer")

    async def close(self) -> None:
        """Flush what is queued (up to FLUSH_TIMEOUT_S), then stop the writer."""
        if self.task is None:
            return
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await self.queue.join()
        except TimeoutError:
            logger.warning("store writer: %d completion(s) not flushed at shutdown",
                           self.queue.qsize())
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.task = None

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            # Linger a moment so a busy server writes many answers per transaction.
            await asyncio.sleep(self.linger_s)
            while len(items) < self.batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            try:
                await self.write_batch(items)
            finally:
                for _ in items:
                    self.queue.task_done()

    async def write_batch(self, items: list[Finished]) -> None:
        """One insert for the batch; if the store refuses it, each record alone, so one bad
        record (a duplicate id, a value the database won't take) loses only itself."""
        try:
            await self.write(items)
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # the store is down or refused the batch: the server goes on
            if len(items) == 1:
                self.failed.inc()
                logger.exception("store writer: a completion was not stored")
                return
        for item in items:
            try:
                await self.write([item])
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failed.inc()
                logger.exception("store writer: a completion was not stored")

    async def write(self, items: list[Finished]) -> None:
        rows = [row(item) for item in items]
        await insert_completions(self.db, rows)
        self.written.inc(len(rows))


def row(item: Finished) -> NewCompletion:
    """The stored record of one answer. The response is kept without its inline trace
    (the trace has its own column, served by the trace route)."""
    response = (item.response.model_dump(mode="json")
                if isinstance(item.response, ChatCompletion) else dict(item.response))
    response.pop("steering_trace", None)
    trace = item.trace.to_dict() if isinstance(item.trace, Trace) else item.trace
    if isinstance(trace, Mapping) and "id" in trace:
        trace = {k: v for k, v in trace.items() if k != "id"}
    req = item.request
    return NewCompletion(
        id=response["id"], created=response["created"], model=response["model"],
        request=req.model_dump(mode="json", exclude_none=True), response=response,
        usage=response.get("usage"), adapter=item.adapter,
        strategy=item.spec.strategy if item.spec else None,
        steering=spec_dict(item.spec) if item.spec else None,
        trace_id=item.trace_id if trace is not None else None, trace=trace,
        score=chosen_score(trace), metadata=dict(req.metadata or {}),
    )


def spec_dict(spec: SteeringSpec) -> dict[str, Any]:
    """The steering spec as JSON (its options as the client gave them)."""
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in vars(spec).items()
            if v is not None}


def chosen_score(trace: Mapping[str, Any] | None) -> float | None:
    """The chosen candidate's score (its first critic's), for filtering by quality."""
    for node in (trace or {}).get("nodes", ()):
        if node.get("chosen") and node.get("role") != "final" and node.get("scores"):
            value = next(iter(node["scores"].values()))
            return float(value)
    return None
