"""A client that goes away must not leave its generation running in the engine.

Each test starts a request far longer than it waits for, drops it, and polls /metrics until
the engine and the admission slots are empty again (the poll timeout is a hang detector).
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.support import CHAT, MODEL, engine_idle, scrape, wait_until

pytestmark = pytest.mark.integration

LONG_ANSWER = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]


def test_closing_a_stream_aborts_the_generation(http: httpx.Client) -> None:
    wait_until(lambda: engine_idle(http), 20, "an idle engine before the test")
    body = {"model": MODEL, "messages": LONG_ANSWER, "max_tokens": 2000, "stream": True}
    with http.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        data = [line for line in (next(lines) for _ in range(8)) if line.startswith("data:")]
        assert len(data) >= 3
        during = scrape(http)
        assert during.get("steer_engine_requests_running") == 1
        assert during.get("steer_requests_in_flight") == 1
    # Leaving the block closed the connection mid-stream.
    wait_until(lambda: engine_idle(http), 20, "the engine to drop the abandoned stream")


def test_client_timeout_aborts_a_non_streamed_generation(http: httpx.Client) -> None:
    wait_until(lambda: engine_idle(http), 20, "an idle engine before the test")
    closed = {"route": CHAT, "status": "499"}
    before = scrape(http).get("steer_requests_total", **closed)
    body = {"model": MODEL, "messages": LONG_ANSWER, "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):
        http.post(CHAT, json=body, timeout=httpx.Timeout(30, read=2))
    wait_until(lambda: engine_idle(http), 20, "the engine to drop the abandoned request")
    # The server noticed the client leaving (499, nginx's "client closed request").
    wait_until(lambda: scrape(http).get("steer_requests_total", **closed) == before + 1, 10,
               "the abandoned request to be counted")
