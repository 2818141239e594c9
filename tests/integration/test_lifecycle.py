"""Server lifecycle on dedicated servers: loading -> ready, admission refusals (429) with one
slot and no queue, a SIGTERM drain that lets the in-flight request finish, and SIGTERM while
the model is still loading.

The tests run in file order; the drain test ends the one-slot server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from tests.integration.support import (
    CHAT,
    MODEL,
    ServerFactory,
    ServerProcess,
    error_of,
    openai_client,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.integration

STORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a long story about a dragon who learns to cook."}
]


@pytest.fixture(scope="module")
def small_server(server_factory: ServerFactory) -> ServerProcess:
    srv = server_factory.start(
        "--max-concurrent-requests", "1", "--max-queued-requests", "0",
        "--drain-timeout-s", "60", "--kv-cache-gib", "1",
    )
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def small_http(small_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small_server.url, timeout=60) as client:
        yield client


def _next_event(lines: Iterator[str]) -> str:
    """The payload of the next SSE `data:` line."""
    return next(line for line in lines if line.startswith("data:")).removeprefix("data:").strip()


def test_health_says_loading_before_ready(small_server: ServerProcess) -> None:
    answers = [h for h in small_server.health_seen if h.status is not None]
    assert answers[-1].status == 200
    loading = answers[:-1]
    assert loading, "never saw the server loading"
    assert all(h.status == 503 and h.body_status == "loading" for h in loading), loading


def test_request_beyond_capacity_gets_429(small_http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": STORY, "max_tokens": 300, "stream": True}
    with small_http.stream("POST", CHAT, json=body) as first:
        assert first.status_code == 200
        # subtle: keep the line iterator alive; a dropped one closes the connection.
        lines = first.iter_lines()
        assert _next_event(lines)
        assert scrape(small_http).get("steer_requests_in_flight") == 1  # the only slot

        second = small_http.post(CHAT, json={**body, "stream": False})
        assert second.status_code == 429, second.text
        assert int(second.headers["retry-after"]) >= 1
        error = error_of(second)
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "queue_full"
        assert scrape(small_http).get("steer_requests_rejected_total", reason="queue_full") >= 1
    # The slot comes back once the first client has gone.
    wait_until(lambda: scrape(small_http).get("steer_requests_in_flight") == 0, 20,
               "the slot to be released")


def test_sigterm_drains_then_exits_zero(
    small_server: ServerProcess, small_http: httpx.Client
) -> None:
    children = psutil.Process(small_server.proc.pid).children(recursive=True)
    assert any(c.name() == "VLLM::EngineCore" for c in children)
    with openai_client(small_server) as oai, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            oai.chat.completions.create, model=MODEL, messages=STORY, max_tokens=150,
            temperature=0,
        )
        wait_until(lambda: scrape(small_http).get("steer_engine_requests_running") == 1, 60,
                   "the request to reach the engine")

        small_server.proc.send_signal(signal.SIGTERM)

        # Still listening, but refusing new work.
        health = small_http.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "draining"
        refused = small_http.post(CHAT, json={"model": MODEL, "messages": STORY,
                                              "max_tokens": 4})
        assert refused.status_code == 503, refused.text
        assert error_of(refused)["code"] == "draining"
        with pytest.raises(openai.APIStatusError) as sdk_refused:
            oai.chat.completions.create(model=MODEL, messages=STORY, max_tokens=4)
        assert sdk_refused.value.status_code == 503

        # The request that was already running finishes in full.
        resp: ChatCompletion = in_flight.result(timeout=180)
    assert resp.choices[0].message.content
    assert resp.usage is not None
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.completion_tokens == 150
    else:
        assert resp.choices[0].finish_reason == "stop"

    assert small_server.proc.wait(timeout=60) == 0
    # The engine processes went with it.
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_sigterm_while_loading_exits_promptly(server_factory: ServerFactory) -> None:
    srv = server_factory.start("--kv-cache-gib", "1")
    wait_until(lambda: srv.proc.poll() is not None or srv.poll_health().body_status == "loading",
               120, "the server to answer 'loading'")
    assert srv.proc.poll() is None, srv.log_tail()

    srv.proc.send_signal(signal.SIGTERM)
    try:
        returncode = srv.proc.wait(timeout=30)  # nothing to drain: a hang detector
    except subprocess.TimeoutExpired:
        srv.kill_leftovers()
        srv.proc.wait(timeout=30)
        raise srv.fail("steer serve still running 30s after SIGTERM while loading") from None
    assert returncode == 0, srv.log_tail()
    wait_until(lambda: not _group_members(srv.proc.pid), 20, "the engine processes to exit")


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members
