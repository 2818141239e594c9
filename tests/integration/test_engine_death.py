"""Chaos: the vLLM engine core dies mid-request (SIGKILL) on a dedicated server.

The in-flight request must fail promptly with a 5xx instead of hanging, /health must say so,
and new requests must be refused at once. Client timeouts are hang detectors only.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam

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
    {"role": "user", "content": "Write a very long story about a lighthouse keeper."}
]


def engine_core(server: ServerProcess) -> psutil.Process:
    cores = [c for c in psutil.Process(server.proc.pid).children()
             if c.name() == "VLLM::EngineCore"]
    assert len(cores) == 1, [(c.pid, c.name()) for c in cores]
    return cores[0]


def test_engine_core_killed_mid_request(server_factory: ServerFactory) -> None:
    srv = server_factory.start("--kv-cache-gib", "1")
    srv.wait_ready()
    with (
        httpx.Client(base_url=srv.url, timeout=60) as http,
        openai_client(srv, timeout=60) as oai,
        ThreadPoolExecutor(1) as pool,
    ):
        in_flight = pool.submit(
            # min_tokens: the story can't end (EOS) before the kill lands
            oai.chat.completions.create, model=MODEL, messages=STORY, max_tokens=1000,
            extra_body={"min_tokens": 1000},
        )
        wait_until(lambda: scrape(http).get("steer_engine_requests_running") == 1, 60,
                   "the request to reach the engine")

        engine_core(srv).kill()  # SIGKILL, by pid

        with pytest.raises(openai.APIStatusError) as failed:
            in_flight.result(timeout=90)
        assert failed.value.status_code in {500, 503}, failed.value

        health = http.get("/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] != "ok"

        refused = http.post(CHAT, json={"model": MODEL, "messages": STORY, "max_tokens": 4},
                            timeout=30)
        assert refused.status_code == 503, refused.text
        error_of(refused)
        assert scrape(http).get("steer_engine_up") == 0
        assert scrape(http).get("steer_requests_in_flight") == 0

    assert srv.stop() == 0, srv.log_tail()
