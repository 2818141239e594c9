"""Recent steering traces, kept in memory for `GET /v1/steering/traces/{id}`: bounded in
count and in age (TTL), so a busy server never grows without limit."""

from __future__ import annotations

import threading

from cachetools import TTLCache

from steer.search import Trace


class TraceStore:
    def __init__(self, max_traces: int, ttl_s: float) -> None:
        self._cache: TTLCache[str, Trace] = TTLCache(maxsize=max_traces, ttl=ttl_s)
        self._lock = threading.Lock()

    def put(self, trace_id: str, trace: Trace) -> None:
        with self._lock:
            self._cache[trace_id] = trace

    def get(self, trace_id: str) -> Trace | None:
        with self._lock:
            return self._cache.get(trace_id)
