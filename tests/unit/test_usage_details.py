"""Usage as OpenAI reports it, over the scripted engine: `completion_tokens_details.
reasoning_tokens` (what a strategy spent beyond the returned answers; 0 plain) and
`prompt_tokens_details.cached_tokens` (the engine's prefix cache, summed over a search's
calls), in responses and in the final streamed usage chunk, on chat and completions."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from typing import Any

import httpx
import pytest

from steer.engine import (
    AdapterRef,
    Generation,
    Message,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
)
from steer.search import Limits, Steerer, SteeringSpec, TemplateLibrary
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "What is 6 * 7?"}]  # 5 tokens to the fake


class CachingEngine(FakeEngine):
    """The fake, reporting every prompt token but the first as served from the cache."""

    @staticmethod
    def _cached(prompt_tokens: int) -> int:
        return max(0, prompt_tokens - 1)

    async def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                       adapter: AdapterRef | None = None, request_id: str | None = None,
                       ) -> list[Generation]:
        gens = await super().generate(prompts, params, adapter, request_id)
        return [replace(g, cached_tokens=self._cached(g.prompt_tokens)) for g in gens]

    async def stream(self, prompt: Prompt, params: SamplingParams,
                     adapter: AdapterRef | None = None, request_id: str | None = None,
                     ) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        async for item in super().stream(prompt, params, adapter, request_id):
            if isinstance(item, StreamEnd):
                item = replace(item, cached_tokens=self._cached(item.prompt_tokens))
            yield item


@pytest.fixture
def fake_engine() -> FakeEngine:
    return CachingEngine(max_model_len=4096)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MSG, **fields}


def chunks_of(r: httpx.Response) -> list[dict[str, Any]]:
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def details(usage: dict[str, Any]) -> tuple[int, int | None]:
    """(reasoning tokens, cached tokens) of a usage object, checked against OpenAI's shape."""
    completion = usage["completion_tokens_details"]
    assert set(completion) == {"reasoning_tokens", "audio_tokens",
                               "accepted_prediction_tokens", "rejected_prediction_tokens"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= completion["reasoning_tokens"] <= usage["completion_tokens"]
    prompt = usage.get("prompt_tokens_details")
    return completion["reasoning_tokens"], None if prompt is None else prompt["cached_tokens"]


async def test_plain_chat_spends_no_reasoning_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json=chat(max_tokens=8))
    assert r.status_code == 200, r.text
    assert details(r.json()["usage"]) == (0, 4)  # 5 prompt tokens, all but one cached


async def test_plain_stream_usage_chunk_has_the_details(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("one two three")
    r = await client.post(CHAT, json=chat(stream=True, stream_options={"include_usage": True}))
    usage = chunks_of(r)[-1]["usage"]
    assert (usage["completion_tokens"], details(usage)) == (3, (0, 4))


async def test_plain_completion_has_the_details(client: httpx.AsyncClient) -> None:
    r = await client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "a b c"})
    assert r.status_code == 200, r.text
    assert details(r.json()["usage"]) == (0, 2)


async def test_best_of_n_reasoning_is_what_the_unchosen_candidates_cost(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue(("it is 42", -0.1), ("it is not quite 41", -1.0), ("no", -2.0))
    r = await client.post(CHAT, json=chat(steering={"strategy": "best_of_n",
                                                    "options": {"n": 3}}))
    usage = r.json()["usage"]
    assert r.json()["choices"][0]["message"]["content"] == "it is 42"
    assert usage["completion_tokens"] == 3 + 5 + 1
    # Everything but the returned answer's 3 tokens; one call, so one cached prompt.
    assert details(usage) == (9 - 3, 4)
    assert usage["steering"]["model_calls"] == 3


async def test_one_generation_strategies_spend_no_reasoning_tokens(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("the answer is here")
    r = await client.post(CHAT, json=chat(steering={"strategy": "none", "trace": True}))
    usage = r.json()["usage"]
    assert usage["steering"]["model_calls"] == 1
    assert details(usage) == (0, 4)


async def test_a_judged_search_counts_the_judge_and_sums_the_cache(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("answer one", "answer two", "no", "yes")
    r = await client.post(CHAT, json=chat(steering={
        "strategy": "best_of_n", "options": {"n": 2}, "critic": {"name": "llm_judge"}}))
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    assert body["choices"][0]["message"]["content"] == "answer two"
    reasoning, cached = details(usage)
    assert reasoning == usage["completion_tokens"] - 2  # the judge's tokens and "answer one"
    # The samples' call (one prompt) and the judge's call (two prompts): 3 prompts cached,
    # each all but its first token.
    assert cached == usage["prompt_tokens"] - 3


async def test_steered_stream_usage_chunk_has_the_details(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue(("so 7", -0.1), ("7", -0.2), ("8 8 8", -0.3))
    r = await client.post(CHAT, json=chat(
        stream=True, stream_options={"include_usage": True},
        steering={"strategy": "self_consistency", "options": {"k": 3}}))
    usage = chunks_of(r)[-1]["usage"]
    assert usage["completion_tokens"] == 6
    assert details(usage) == (6 - 2, 4)  # the chosen "so 7" is 2 tokens
    assert usage["steering"]["model_calls"] == 3


async def test_a_final_generation_is_the_answer_not_reasoning(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    """A strategy that ends with a streamed generation: that call's tokens are the answer's,
    and its prompt's cache counts with the others."""
    fake_engine.enqueue("one two three four")
    r = await client.post(CHAT, json=chat(
        stream=True, stream_options={"include_usage": True},
        steering={"strategy": "template", "options": {"name": "chain_of_thought"}}))
    assert r.status_code == 200, r.text
    usage = chunks_of(r)[-1]["usage"]
    reasoning, cached = details(usage)
    assert (usage["completion_tokens"], reasoning) == (4, 0)
    assert cached == usage["prompt_tokens"] - 1


async def test_the_search_layer_sums_the_cache_over_calls() -> None:
    engine = CachingEngine(max_model_len=4096)
    steerer = Steerer(engine, Limits(), TemplateLibrary(), lambda name: None)  # type: ignore[arg-type,return-value]
    engine.enqueue("draft answer", "it lacks units", "better answer with units")
    plan = steerer.plan(SteeringSpec(strategy="reflection", options={"max_iters": 1},
                                     critic={"name": "regex", "pattern": "units"}))
    result = await steerer.run(plan, (Message("user", "How far is it?"),),
                               SamplingParams(max_tokens=20), None, "r")
    prompts = [engine.count_prompt_tokens(p) for call in engine.history for p in call.prompts]
    assert result.cached_tokens == sum(n - 1 for n in prompts)
    assert result.answer_tokens == len(result.text.split())
    assert result.reasoning_tokens == result.completion_tokens - result.answer_tokens
