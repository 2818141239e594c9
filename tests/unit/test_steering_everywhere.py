"""Steering wherever it makes sense, over the scripted engine: logprobs of the chosen
generation, `n > 1` as independent searches run together, strategies on /v1/completions,
and streamed answers (live tokens for a final generation, the chosen candidate's pieces)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from steer.engine import Message
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "What is 6 * 7?"}]
BON2 = {"strategy": "best_of_n", "options": {"n": 2}}


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MSG, **fields}


def chunks_of(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# -- logprobs ---------------------------------------------------------------------------------


async def test_best_of_n_returns_the_chosen_candidates_logprobs(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue(("it is 41", -2.0), ("it is 42", -0.1))
    r = await client.post(CHAT, json=chat(logprobs=True, top_logprobs=2, steering=BON2))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "it is 42"
    content = choice["logprobs"]["content"]
    assert [t["token"] for t in content] == ["it", "is", "42"]
    assert {t["logprob"] for t in content} == {-0.1}
    assert all(len(t["top_logprobs"]) == 2 for t in content)
    assert fake_engine.history[0].params.logprobs == 2  # asked of the candidates' call


async def test_without_logprobs_the_candidates_ask_only_for_the_sampled_token(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    r = await client.post(CHAT, json=chat(steering=BON2))
    assert r.json()["choices"][0]["logprobs"] is None
    assert fake_engine.history[0].params.logprobs == 0  # what the logprob critic reads


async def test_a_final_generation_streams_its_logprobs(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue(("one two", -0.25))
    r = await client.post(CHAT, json=chat(
        stream=True, logprobs=True, steering={"strategy": "template",
                                              "options": {"name": "chain_of_thought"}}))
    tokens = [t["token"] for c in chunks_of(r) if c["choices"] and c["choices"][0]["logprobs"]
              for t in c["choices"][0]["logprobs"]["content"]]
    assert tokens == ["one", "two"]


async def test_tot_refuses_logprobs_naming_the_field(client: httpx.AsyncClient,
                                                     fake_engine: FakeEngine) -> None:
    r = await client.post(CHAT, json=chat(logprobs=True, steering={"strategy": "tot"}))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logprobs"
    assert fake_engine.history == []


# -- n > 1 ------------------------------------------------------------------------------------


async def test_n_searches_run_together_and_sum_their_usage(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.respond = lambda prompt, params: "four tokens of answer"
    fake_engine.hold = asyncio.Event()
    task = asyncio.create_task(client.post(CHAT, json=chat(n=2, steering=BON2)))
    while len(fake_engine.history) < 2:  # both searches' first calls are in the engine
        await asyncio.sleep(0.01)
    assert not task.done()
    fake_engine.hold.set()
    r = await task
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert len(fake_engine.history) == 2
    assert {c.params.n for c in fake_engine.history} == {2}
    usage = body["usage"]
    assert usage["steering"] == {"model_calls": 4, "candidates": 4, "pruned": 2,
                                 "budget_exhausted": False}
    assert usage["completion_tokens"] == 16
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 8


async def test_n_searches_stream_each_choice(client: httpx.AsyncClient,
                                             fake_engine: FakeEngine) -> None:
    fake_engine.respond = lambda prompt, params: "same answer"
    r = await client.post(CHAT, json=chat(
        n=2, stream=True, stream_options={"include_usage": True},
        steering={**BON2, "trace": True}))
    chunks = chunks_of(r)
    text = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for choice in c["choices"]:
            text[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = c["steering"]["trace"]["id"]
    assert text == {0: "same answer", 1: "same answer"}
    assert sorted(finishes) == [0, 1] and finishes[0] != finishes[1]
    assert chunks[-1]["usage"]["steering"]["model_calls"] == 4


async def test_n_traces_are_one_per_choice(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json=chat(n=2, steering={**BON2, "trace": True}))
    trace = r.json()["steering_trace"]
    assert [len(t["nodes"]) for t in trace["choices"]] == [2, 2]
    got = await client.get(f"/v1/steering/traces/{trace['choices'][1]['id']}")
    assert got.status_code == 200, got.text


# -- /v1/completions --------------------------------------------------------------------------


async def test_a_steered_completion_answers_the_prompt_as_a_question(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue(("it is 41", -2.0), ("it is 42", -0.1))
    r = await client.post(COMPLETIONS, json={
        "model": "fake-model", "prompt": "What is 6 * 7?", "max_tokens": 8, "logprobs": 1,
        "steering": BON2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["text"] == "it is 42"
    assert choice["logprobs"]["tokens"] == ["it", "is", "42"]
    assert fake_engine.history[0].prompts == ((Message("user", "What is 6 * 7?"),),)
    usage = body["usage"]
    assert usage["steering"]["model_calls"] == 2
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 3


async def test_steered_completions_take_several_prompts_and_n(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.respond = lambda prompt, params: f"re {prompt[-1].content}"  # type: ignore[index,union-attr]
    r = await client.post(COMPLETIONS, json={
        "model": "fake-model", "prompt": ["a", "b"], "n": 2, "echo": True,
        "steering": {"strategy": "self_consistency", "options": {"k": 2}}})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [(c["index"], c["text"]) for c in choices] == [
        (0, "are a"), (1, "are a"), (2, "bre b"), (3, "bre b")]
    assert r.json()["usage"]["steering"]["model_calls"] == 8


async def test_optillms_model_prefix_steers_a_completion(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    r = await client.post(COMPLETIONS, json={"model": "bon-fake-model", "prompt": "x"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["steering"]["model_calls"] > 1


async def test_a_steered_completion_streams(client: httpx.AsyncClient,
                                            fake_engine: FakeEngine) -> None:
    fake_engine.enqueue("one two three")
    r = await client.post(COMPLETIONS, json={
        "model": "fake-model", "prompt": "x", "stream": True,
        "stream_options": {"include_usage": True},
        "steering": {"strategy": "template", "options": {"name": "chain_of_thought"}}})
    chunks = chunks_of(r)
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(pieces) == "one two three"
    assert len([p for p in pieces if p]) == 3  # token by token, as the engine made them
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["steering"]["model_calls"] == 1


async def test_a_steered_completion_refuses_what_a_plain_one_does(
    client: httpx.AsyncClient
) -> None:
    r = await client.post(COMPLETIONS, json={
        "model": "fake-model", "prompt": ["a", "b"], "stream": True, "steering": BON2})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "prompt")


# -- streamed answers -------------------------------------------------------------------------


async def test_a_chosen_candidate_streams_as_the_engine_made_it(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue(("a worse answer here", -2.0), ("the answer is 42", -0.1))
    r = await client.post(CHAT, json=chat(stream=True, logprobs=True, steering=BON2))
    chunks = [c for c in chunks_of(r) if c["choices"] and c["choices"][0]["delta"].get("content")]
    # One chunk per engine step (a word to the fake), not the text re-cut into pieces.
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["the", " answer", " is",
                                                                     " 42"]
    assert [[t["token"] for t in c["choices"][0]["logprobs"]["content"]] for c in chunks] == [
        ["the"], ["answer"], ["is"], ["42"]]


async def test_a_chosen_candidate_streams_without_logprobs_unless_asked(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue(("one two", -0.1), ("three", -1.0))
    r = await client.post(CHAT, json=chat(stream=True, steering=BON2))
    chunks = [c for c in chunks_of(r) if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["one", " two"]
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)



async def test_searches_per_request_are_bounded(client: httpx.AsyncClient,
                                                fake_engine: FakeEngine) -> None:
    # One search per choice: prompts x n searches, at most max_n (4 in these settings).
    r = await client.post(COMPLETIONS, json={"model": "fake-model", "prompt": ["a", "b", "c"],
                                             "n": 2, "max_tokens": 4, "steering": BON2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "n"
    assert fake_engine.history == []


async def test_searches_together_must_fit_one_requests_share(fake_engine: FakeEngine) -> None:
    # Admission caps one request at the heavy share of its capacity; n searches together
    # may not exceed it (one search alone still may: the cap lets it run by itself).
    from steer.service.app import create_app
    from steer.service.settings import Settings
    from tests.asgi import running

    settings = Settings(max_n=4, max_tokens_cap=32, max_inflight_tokens=4000)
    body = {"model": "fake-model", "messages": MSG, "max_tokens": 32,
            "steering": {"strategy": "best_of_n", "options": {"n": 64}}}
    async with running(create_app(settings, fake_engine)) as c:
        r = await c.post(CHAT, json=body | {"n": 2})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "n"
        assert fake_engine.history == []
        r = await c.post(CHAT, json=body)
        assert r.status_code == 200, r.text
