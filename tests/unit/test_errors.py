"""Bad input: each case is a 4xx in OpenAI's error shape naming the field, and the app
keeps serving afterwards."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MSG, **fields}


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(max_tokens="5"), "max_tokens"),
        (chat(max_tokens=-1), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(temperature=5), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(n=0), "n"),
        (chat(seed=2**70), "seed"),
        (chat(top_logprobs=50, logprobs=True), "top_logprobs"),
        (chat(stop=["a"] * 17), "stop"),
        ({"model": "fake-model", "messages": []}, "messages"),
        ({"model": "fake-model"}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": "fake-model", "messages": [{"role": "function", "content": "x"}]},
         "messages.0.role"),
        ({"model": "fake-model", "messages": [{"role": "tool", "content": "x"}]},
         "messages.0.tool_call_id"),
        (chat(tools=[]), "tools"),
        ({"model": "fake-model", "messages": [{"role": "user", "content": 5}]},
         "messages.0.content"),
        ({"model": "fake-model", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content.0"),
    ],
)
async def test_invalid_values_name_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    assert_error(await client.post(CHAT, json=body), 400, param)


async def test_unknown_field_is_refused_by_name(client: httpx.AsyncClient) -> None:
    err = assert_error(await client.post(CHAT, json=chat(toolz=[])), 400, "toolz")
    assert "Unrecognized request argument" in err["message"]


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, content=b"{bad", headers={"content-type": "application/json"})
    assert_error(r, 400, None, "invalid_json")


async def test_body_must_be_an_object(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400


async def test_cross_field_rules(client: httpx.AsyncClient) -> None:
    assert_error(await client.post(CHAT, json=chat(top_logprobs=2)), 400, "top_logprobs")
    err = assert_error(
        await client.post(CHAT, json=chat(stream_options={"include_usage": True})), 400,
        "stream_options",
    )
    assert "stream" in err["message"]


async def test_server_caps(client: httpx.AsyncClient) -> None:
    # conftest caps: max_n=4, max_tokens_cap=32
    assert_error(await client.post(CHAT, json=chat(n=5)), 400, "n")
    assert_error(await client.post(CHAT, json=chat(max_tokens=33)), 400, "max_tokens")
    err = assert_error(
        await client.post(CHAT, json=chat(max_completion_tokens=33)), 400, "max_completion_tokens"
    )
    assert "32" in err["message"]


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json={**chat(), "model": "gpt-9"})
    err = assert_error(r, 404, "model", "model_not_found")
    assert "fake-model" in err["message"]


async def test_prompt_longer_than_context(client: httpx.AsyncClient) -> None:
    long_msg = [{"role": "user", "content": "word " * 100}]  # the fake's window is 64 words
    r = await client.post(CHAT, json={"model": "fake-model", "messages": long_msg})
    assert_error(r, 400, "messages", "context_length_exceeded")
    r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "w " * 100})
    assert_error(r, 400, "prompt", "context_length_exceeded")


async def test_max_tokens_beyond_remaining_context(client: httpx.AsyncClient) -> None:
    msg = [{"role": "user", "content": "word " * 40}]
    r = await client.post(CHAT, json={"model": "fake-model", "messages": msg, "max_tokens": 30})
    assert_error(r, 400, "max_tokens", "context_length_exceeded")
    r = await client.post(CHAT, json={"model": "fake-model", "messages": msg,
                                      "max_completion_tokens": 30})
    assert_error(r, 400, "max_completion_tokens", "context_length_exceeded")


async def test_streamed_refusal_is_an_http_error(client: httpx.AsyncClient) -> None:
    long_msg = [{"role": "user", "content": "word " * 100}]
    r = await client.post(CHAT, json={"model": "fake-model", "messages": long_msg, "stream": True})
    assert_error(r, 400, "messages", "context_length_exceeded")


@pytest.mark.parametrize(
    ("steering", "param", "says"),
    [
        ({"strategy": "tot9"}, "steering.strategy", "best_of_n"),
        ({"strategy": "best_of_n", "options": {"m": 2}}, "steering.options.m", "unknown option"),
        ({"strategy": "best_of_n", "options": {"n": "2"}}, "steering.options.n", "integer"),
        ({"strategy": "best_of_n", "options": {"n": 0}}, "steering.options.n", "greater"),
        ({"strategy": "best_of_n", "critic": {"name": "oracle"}}, "steering.critic.name",
         "llm_judge"),
        ({"strategy": "best_of_n", "critic": {"name": "regex"}}, "steering.critic.pattern",
         "required"),
        ({"strategy": "best_of_n", "critic": {"name": "regex", "pattern": "("}},
         "steering.critic.pattern", "invalid regex"),
        ({"strategy": "none", "budget": {"max_model_calls": 0}},
         "steering.budget.max_model_calls", "greater"),
        ({"strategy": "none", "budget": {"max_model_calls": 513}},
         "steering.budget.max_model_calls", "at most 512"),
        ({"strategy": "none", "budget": {"tokens": 1}}, "steering.budget.tokens", "unknown"),
        ({"strategy": "best_of_n", "critic": {"name": "llm_judge"},
          "budget": {"max_model_calls": 1}}, "steering.budget.max_model_calls", "model calls"),
        ({"strategy": "template", "options": {"name": "nope"}}, "steering.options.name",
         "chain_of_thought"),
        ({"strategy": "template", "options": {"name": "few_shot"}},
         "steering.options.variables.examples", "examples"),
        ({"strategy": "none", "bogus": 1}, "steering.bogus", "Unrecognized"),
    ],
)
async def test_steering_is_validated(
    client: httpx.AsyncClient, steering: dict[str, Any], param: str, says: str
) -> None:
    err = assert_error(await client.post(CHAT, json=chat(steering=steering)), 400, param)
    assert says in err["message"]


async def test_steering_none_is_pass_through(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("plain answer")
    r = await client.post(CHAT, json=chat(steering={"strategy": "none"}))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "plain answer"


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing"), 404, None)
    assert_error(await client.put(CHAT), 405, None)  # GET lists stored completions


async def test_server_keeps_serving_after_bad_input(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    for bad in (b"{", b"null", b'{"model": 1}'):
        r = await client.post(CHAT, content=bad, headers={"content-type": "application/json"})
        assert r.status_code == 400
    fake_engine.enqueue("still here")
    r = await client.post(CHAT, json=chat())
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "still here"
