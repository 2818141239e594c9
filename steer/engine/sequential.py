"""An engine decorator that undoes batching: every sequence is its own call, one at a time.

For benchmarks only (`steer serve --no-batching`): the same strategies, run the way a proxy
that calls the model one request at a time would, to measure what batching buys.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace

from steer.engine.base import Engine
from steer.engine.types import (
    AdapterRef,
    EngineHealth,
    Generation,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
)


class SequentialEngine(Engine):
    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.max_model_len = inner.max_model_len
        self.capabilities = inner.capabilities
        self._one_at_a_time = asyncio.Lock()  # across roles and adapter groups too

    async def start(self) -> None:
        await self.inner.start()
        self.max_model_len = self.inner.max_model_len

    async def shutdown(self) -> None:
        await self.inner.shutdown()

    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> list[Generation]:
        out: list[Generation] = []
        one = replace(params, n=1)
        for p_index, prompt in enumerate(prompts):
            for index in range(params.n):
                sub = f"{request_id}-{p_index}-{index}" if request_id else None
                async with self._one_at_a_time:
                    (gen,) = await self.inner.generate([prompt], one, adapter, sub)
                out.append(replace(gen, prompt_index=p_index, index=index))
        return out

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        return self.inner.stream(prompt, params, adapter, request_id)

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def health(self) -> EngineHealth:
        return await self.inner.health()

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return self.inner.count_prompt_tokens(prompt)

    async def count_prompt_tokens_async(self, prompt: Prompt) -> int:
        return await self.inner.count_prompt_tokens_async(prompt)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        await self.inner.load_adapter(adapter)

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        await self.inner.unload_adapter(adapter)

    def adapters(self) -> list[AdapterRef]:
        return self.inner.adapters()
