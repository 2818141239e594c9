"""/metrics on the real server: request, token and latency series move with each request.

The suite runs tests one at a time, so between two scrapes only this test's requests count.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.support import CHAT, MODEL, Metrics, scrape, wait_until

pytestmark = pytest.mark.integration

OK = {"route": CHAT, "status": "200"}
ROUTE = {"route": CHAT}


def _after_one_more_request(http: httpx.Client, before: Metrics) -> Metrics:
    # subtle: the middleware counts a request after its last byte went out, which can be a
    # moment after the client has the response.
    target = before.get("steer_requests_total", **OK) + 1
    wait_until(lambda: scrape(http).get("steer_requests_total", **OK) >= target, 10,
               "the request to be counted")
    return scrape(http)


def _assert_counted(before: Metrics, after: Metrics, prompt: int, completion: int) -> None:
    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("steer_requests_total", **OK) == 1
    assert delta("steer_prompt_tokens_total", **ROUTE) == prompt
    assert delta("steer_completion_tokens_total", **ROUTE) == completion
    assert delta("steer_request_duration_seconds_count", **ROUTE) == 1
    assert delta("steer_request_duration_seconds_sum", **ROUTE) > 0
    assert delta("steer_time_to_first_token_seconds_count", **ROUTE) == 1


def test_chat_request_is_counted(http: httpx.Client, oai: openai.OpenAI) -> None:
    before = scrape(http)
    resp = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=5
    )
    assert resp.usage is not None
    after = _after_one_more_request(http, before)
    _assert_counted(before, after, resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert after.get("steer_engine_up") == 1


def test_streamed_chat_request_is_counted(http: httpx.Client, oai: openai.OpenAI) -> None:
    before = scrape(http)
    with oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=5,
        stream=True, stream_options={"include_usage": True},
    ) as stream:
        usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1
    after = _after_one_more_request(http, before)
    _assert_counted(before, after, usage[0].prompt_tokens, usage[0].completion_tokens)


def test_refusal_is_counted_by_status(http: httpx.Client) -> None:
    bad = {"route": CHAT, "status": "400"}
    before = scrape(http).get("steer_requests_total", **bad)
    r = http.post(CHAT, json={"model": MODEL, "messages": []})
    assert r.status_code == 400
    wait_until(lambda: scrape(http).get("steer_requests_total", **bad) == before + 1, 10,
               "the refusal to be counted")
