"""Recent steering traces, kept in memory for `GET /v1/steering/traces/{id}`: bounded in
bytes (a ToT trace can be megabytes), in count and in age (TTL), so a busy server never grows
without limit. Traces are kept serialized: what is stored is exactly what is served."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from cachetools import TTLCache

from steer.search import Trace

logger = logging.getLogger(__name__)


class StoredTrace:
    """A trace as JSON text (its size is what the store counts) plus its DOT rendering."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.json = json.dumps(data)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.json)
        return data

    def to_dot(self) -> str:
        return Trace.from_dict(self.to_dict()).to_dot()

    def __len__(self) -> int:
        return len(self.json)


class TraceStore:
    def __init__(self, max_bytes: int, ttl_s: float, max_traces: int = 100_000) -> None:
        self.max_bytes = max_bytes
        self.max_traces = max_traces
        self._cache: TTLCache[str, StoredTrace] = TTLCache(
            maxsize=max(max_bytes, 1), ttl=ttl_s, getsizeof=len
        )
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return int(self._cache.currsize)

    def put(self, trace_id: str, trace: Trace | dict[str, Any]) -> None:
        """Keep `trace` (or its `to_dict()`, when the caller already made it)."""
        stored = StoredTrace(trace.to_dict() if isinstance(trace, Trace) else trace)
        if len(stored) > self.max_bytes:
            logger.info("trace %s (%d bytes) is larger than the trace store; not kept",
                        trace_id, len(stored))
            return
        with self._lock:
            while len(self._cache) >= self.max_traces:
                self._cache.popitem()
            self._cache[trace_id] = stored

    def get(self, trace_id: str) -> StoredTrace | None:
        with self._lock:
            return self._cache.get(trace_id)
