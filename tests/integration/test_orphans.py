"""Chaos: the server process dies while its engine is busy; its vLLM processes must go too.

A kernel OOM kill or a supervisor's SIGKILL gives the server no chance to stop its engine core
and workers; left alone they live on as orphans holding the model and KV cache. Each test
records the server's whole process tree (engine core, workers, multiprocessing's resource
tracker) before the kill, and kills whatever of it is left afterwards, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import httpx
import psutil
import pytest

from tests.integration.support import (
    CHAT,
    MODEL,
    ServerFactory,
    ServerProcess,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.integration

SMALL = ("--kv-cache-gib", "0.5", "--max-model-len", "2048")
LONG_REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
    "max_tokens": 1500,
}
# How long the engine's processes may outlive the server (they are idle-polling or mid-step).
GONE_WITHIN_S = 10.0


def _busy_server(server_factory: ServerFactory, *args: str) -> ServerProcess:
    srv = server_factory.start(*SMALL, *args)
    srv.wait_ready()
    return srv


def _engine_tree(srv: ServerProcess) -> list[psutil.Process]:
    tree = psutil.Process(srv.proc.pid).children(recursive=True)
    names = sorted(p.name() for p in tree)
    assert "VLLM::EngineCore" in names and "VLLM::Worker" in names, names
    return tree


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=GONE_WITHIN_S)
    return [p for p in alive if _running(p)]


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()  # psutil checks the create time: never a reused pid


def _in_flight(pool: ThreadPoolExecutor, srv: ServerProcess) -> Future[httpx.Response]:
    """Send the long request and wait until the engine is working on it."""
    future = pool.submit(httpx.post, srv.url + CHAT, json=LONG_REQUEST, timeout=300)
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        wait_until(lambda: scrape(http).get("steer_engine_requests_running") == 1, 60,
                   "the request to reach the engine")
    return future


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as executor:
        yield executor


def test_sigkilled_server_leaves_no_engine_process(
    server_factory: ServerFactory, pool: ThreadPoolExecutor
) -> None:
    srv = _busy_server(server_factory)
    tree = _engine_tree(srv)
    try:
        request = _in_flight(pool, srv)

        os.kill(srv.proc.pid, signal.SIGKILL)  # the server only, as the OOM killer does
        assert srv.proc.wait(timeout=30) == -signal.SIGKILL
        with pytest.raises(httpx.TransportError):
            request.result(timeout=60)

        left = _alive(tree)
        assert not left, [(p.pid, p.name()) for p in left]
    finally:
        _kill(tree)
        srv.stop()


def test_sigterm_while_busy_stops_the_engine(
    server_factory: ServerFactory, pool: ThreadPoolExecutor
) -> None:
    srv = _busy_server(server_factory, "--drain-timeout-s", "2")
    tree = _engine_tree(srv)
    try:
        request = _in_flight(pool, srv)

        srv.proc.send_signal(signal.SIGTERM)
        try:
            returncode = srv.proc.wait(timeout=60)  # a hang detector
        except subprocess.TimeoutExpired:
            raise srv.fail("steer serve still running 60s after SIGTERM") from None
        assert returncode == 0, srv.log_tail()
        # The drain timeout cut the request off; how the client saw that is another test's.
        wait([request], timeout=60)
        assert request.done()

        left = _alive(tree)
        assert not left, [(p.pid, p.name()) for p in left]
    finally:
        _kill(tree)
        srv.stop()
