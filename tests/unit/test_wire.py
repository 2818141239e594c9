"""Responses and SSE chunks in OpenAI's exact shape, with usage equal to what was served."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from steer.engine import Message
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
# What OpenAI reports for a plain text answer (and the fake engine reports no prefix cache).
PLAIN_DETAILS = {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                 "rejected_prediction_tokens": 0}


def sse_events(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


async def test_chat_completion_shape_and_usage(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("four words of answer")
    r = await client.post(CHAT, json={
        "model": "fake-model", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "two words"}]},
        ],
    })
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "fake-model"
    assert body["choices"] == [{
        "index": 0,
        "message": {"role": "assistant", "content": "four words of answer", "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }]
    # "be brief" + "two words" = 4 prompt words; 4 completion words
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
        "completion_tokens_details": PLAIN_DETAILS}
    call = fake_engine.history[-1]
    assert call.prompts[0] == [Message("system", "be brief"), Message("user", "two words")]


async def test_sampling_params_reach_the_engine(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    await client.post(CHAT, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "x"}],
        "n": 2, "max_completion_tokens": 7, "temperature": 0.3, "top_p": 0.9, "seed": -5,
        "stop": "END", "top_k": 20, "min_p": 0.1, "repetition_penalty": 1.1,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": True, "top_logprobs": 2,
        "min_tokens": 3,
    })
    p = fake_engine.history[-1].params
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.seed) == (2, 7, 0.3, 0.9, -5)
    assert (p.stop, p.top_k, p.min_p, p.repetition_penalty) == (("END",), 20, 0.1, 1.1)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs, p.min_tokens) == (
        0.5, -0.5, 2, 3)


async def test_min_tokens_beyond_max_tokens_is_refused(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4, "min_tokens": 5,
    })
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "min_tokens"


async def test_defaults_when_fields_are_absent(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    await client.post(CHAT, json={"model": "fake-model", "messages": [{"role": "user",
                                                                       "content": "x"}]})
    p = fake_engine.history[-1].params
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.logprobs) == (
        1, None, 1.0, 1.0, 0, None, None
    )


async def test_n_choices_and_length_finish(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("a b c d e", "f g")
    r = await client.post(CHAT, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "q"}],
        "n": 2, "max_tokens": 3,
    })
    choices = r.json()["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "a b c", "length"), (1, "f g", "stop"),
    ]
    assert r.json()["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6,
        "completion_tokens_details": PLAIN_DETAILS}


async def test_chat_logprobs_shape(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    fake_engine.enqueue("hi there")
    r = await client.post(CHAT, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "q"}],
        "logprobs": True, "top_logprobs": 2,
    })
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["hi", "there"]
    first = content[0]
    assert first["bytes"] == list(b"hi")
    assert [t["token"] for t in first["top_logprobs"]] == ["hi", "hi1"]
    assert set(first["top_logprobs"][0]) == {"token", "logprob", "bytes"}


async def test_chat_stream_chunks(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    fake_engine.enqueue("one two three")
    r = await client.post(CHAT, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "q"}],
        "stream": True, "stream_options": {"include_usage": True},
    })
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks: list[dict[str, Any]] = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4,
        "completion_tokens_details": PLAIN_DETAILS}
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_stream_without_usage_has_no_usage_chunk(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("a b")
    r = await client.post(CHAT, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "q"}], "stream": True,
    })
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all(c["choices"] for c in chunks)


async def test_stream_n2_has_a_role_chunk_per_choice(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("a b", "c")
    r = await client.post(CHAT, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "q"}],
        "stream": True, "n": 2,
    })
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    texts: dict[int, str] = {0: "", 1: ""}
    roles = set()
    for c in chunks:
        choice = c["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if "role" in choice["delta"]:
            roles.add(choice["index"])
    assert texts == {0: "a b", 1: "c"}
    assert roles == {0, 1}


async def test_completions_batch_and_echo(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("x", "y z")
    r = await client.post("/v1/completions", json={
        "model": "fake-model", "prompt": ["p one", "p two three"], "echo": True,
    })
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "p onex"), (1, "p two threey z")
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
        "completion_tokens_details": PLAIN_DETAILS}
    assert fake_engine.history[-1].params.max_tokens == 16  # OpenAI's default here


async def test_completions_logprobs_shape(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("ab cd")
    r = await client.post("/v1/completions", json={
        "model": "fake-model", "prompt": "p", "logprobs": 1,
    })
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["ab", "cd"]
    assert lp["text_offset"] == [0, 2]
    assert lp["top_logprobs"] == [{"ab": -0.5}, {"cd": -0.5}]


async def test_completions_stream(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    fake_engine.enqueue("u v")
    r = await client.post("/v1/completions", json={
        "model": "fake-model", "prompt": "p", "stream": True,
        "stream_options": {"include_usage": True},
    })
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "u v"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


async def test_streaming_many_prompts_is_refused(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={
        "model": "fake-model", "prompt": ["a", "b"], "stream": True,
    })
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"


async def test_models_list(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-model"]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["max_model_len"] == 64
