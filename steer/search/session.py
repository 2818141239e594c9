"""One steered request's view of the engine: every call counted, budgets enforced, all
in-flight calls abortable together.

`Session.generate` is the only way strategies and critics reach the engine. Before a call
it checks the call budget and clamps `max_tokens` so the token budget can never be passed;
after it, it adds the call's tokens to the request's usage.

Exception tree (see also `steer.search.base`):

    SearchError
    ├── BudgetExhausted     a call would pass max_model_calls or max_total_tokens
    └── SteeringInvalid     the steering spec is wrong (carries the offending `param`)
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace

from steer.engine import (
    AdapterRef,
    Engine,
    Generation,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
)


class SearchError(Exception):
    pass


class BudgetExhausted(SearchError):
    pass


class SteeringInvalid(SearchError):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Budget:
    max_model_calls: int
    max_total_tokens: int
    timeout_s: float


class Session:
    """Budgeted, accounted, abortable access to the engine for one request."""

    def __init__(
        self, engine: Engine, budget: Budget, request_id: str, adapter: AdapterRef | None
    ) -> None:
        self.engine = engine
        self.budget = budget
        self.request_id = request_id
        self.adapter = adapter  # the request's own adapter: the default for every role
        self.model_calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.started = time.perf_counter()
        self._next_call = 0
        self._inflight: set[str] = set()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _reserve(self, prompts: Sequence[Prompt], params: SamplingParams) -> SamplingParams:
        count = len(prompts) * params.n
        if self.model_calls + count > self.budget.max_model_calls:
            raise BudgetExhausted(
                f"max_model_calls: {self.model_calls} used, {count} more needed, "
                f"{self.budget.max_model_calls} allowed"
            )
        lengths = [self.engine.count_prompt_tokens(p) for p in prompts]
        left = self.budget.max_total_tokens - self.total_tokens - sum(lengths)
        room = left // count
        if room < 1:
            raise BudgetExhausted(
                f"max_total_tokens: {self.total_tokens} used of {self.budget.max_total_tokens}"
            )
        context_room = self.engine.max_model_len - max(lengths)
        limit = min(room, context_room) if context_room > 0 else room
        if params.max_tokens is None or params.max_tokens > limit:
            params = replace(params, max_tokens=limit)
        self.model_calls += count
        return params

    def _call_id(self) -> str:
        self._next_call += 1
        return f"{self.request_id}-c{self._next_call}"

    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        role: str,
        adapter: AdapterRef | None = None,
    ) -> list[Generation]:
        """One batched engine call; `adapter=None` means the request's own adapter."""
        if not prompts:
            return []
        params = self._reserve(prompts, params)
        call_id = self._call_id()
        self._inflight.add(call_id)
        try:
            gens = await self.engine.generate(
                prompts, params, adapter=adapter or self.adapter, request_id=call_id
            )
        finally:
            self._inflight.discard(call_id)
        # A prompt's tokens count once per call, however many samples it produced.
        self.prompt_tokens += sum({g.prompt_index: g.prompt_tokens for g in gens}.values())
        self.completion_tokens += sum(g.completion_tokens for g in gens)
        return gens

    async def stream(
        self, prompt: Prompt, params: SamplingParams, adapter: AdapterRef | None = None
    ) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        params = self._reserve([prompt], params)
        call_id = self._call_id()
        self._inflight.add(call_id)
        stream = self.engine.stream(prompt, params, adapter=adapter or self.adapter,
                                    request_id=call_id)
        try:
            async for item in stream:
                if isinstance(item, StreamEnd):
                    self.prompt_tokens += item.prompt_tokens
                    self.completion_tokens += item.completion_tokens
                yield item
        finally:
            await stream.aclose()
            self._inflight.discard(call_id)

    async def abort_all(self) -> None:
        for call_id in list(self._inflight):
            await self.engine.abort(call_id)
        self._inflight.clear()
