"""One steered request's view of the engine: every call counted, budgets enforced, all
in-flight calls abortable together.

`Session.generate` and `Session.stream` are the only ways strategies and critics reach the
engine. Before a call, the session reserves its sequences and its tokens (the prompt plus
`max_tokens` per sequence, clamped to what is left), so calls in flight together can never
pass the budget between them; afterwards it releases the reservation and adds what the call
really used. A stream cut off midway still counts its prompt and every token it streamed.

Exception tree (see also `steer.search.base`):

    SearchError
    ├── BudgetExhausted     a limit ran out (`limit`: which one; `source`: whose it was)
    └── SteeringInvalid     the steering spec is wrong (carries the offending `param`)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from steer.critics.quoting import Cut, fit_prompt
from steer.engine import (
    AdapterRef,
    Engine,
    Generation,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
)

Limit = Literal["max_model_calls", "max_total_tokens", "timeout_s"]
# Who set the limit that ran out: the client's steering.budget, the reasoning_effort preset,
# or the server's own cap (a field the client never set, or a preset clamped to the cap).
Source = Literal["request", "preset", "server"]
_WHOSE = {"request": "the request's budget", "preset": "the reasoning_effort preset",
          "server": "the server's cap"}


class SearchError(Exception):
    pass


class BudgetExhausted(SearchError):
    def __init__(self, message: str, limit: Limit, source: Source) -> None:
        super().__init__(message)
        self.limit: Limit = limit
        self.source: Source = source


class SteeringInvalid(SearchError):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Budget:
    """A request's effective limits, and which of them the request (or a preset) set."""

    max_model_calls: int
    max_total_tokens: int
    timeout_s: float
    requested: frozenset[str] = field(default_factory=frozenset)
    preset: frozenset[str] = field(default_factory=frozenset)

    def source(self, limit: Limit) -> Source:
        if limit in self.requested:
            return "request"
        return "preset" if limit in self.preset else "server"

    def exhausted(self, limit: Limit, what: str) -> BudgetExhausted:
        """`BudgetExhausted` for `limit`, its message saying whose limit it was."""
        source = self.source(limit)
        return BudgetExhausted(f"{limit}: {what} ({_WHOSE[source]})", limit, source)

    def timed_out(self, elapsed: float) -> BudgetExhausted:
        return self.exhausted("timeout_s", f"{self.timeout_s:g} s allowed, ran out after "
                                           f"{elapsed:.2f} s")


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
        self.cached_tokens: int | None = None  # None until the engine reports its cache
        self.started = time.perf_counter()
        self._reserved_tokens = 0  # held by calls in flight, beyond what they have counted
        self._next_call = 0
        self._inflight: set[str] = set()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def calls_left(self) -> int:
        return self.budget.max_model_calls - self.model_calls

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # -- prompts and the context window --------------------------------------------------------

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens `prompt` takes (chat template included)."""
        return self.engine.count_prompt_tokens(prompt)

    async def context_room(self, prompt: Prompt) -> int:
        """Tokens left in the context window after `prompt` (counted off the event loop
        where the engine's tokenizing is slow)."""
        return self.engine.max_model_len - await self.engine.count_prompt_tokens_async(prompt)

    def answer_room(self, max_tokens: int | None) -> int:
        """The room a prompt of Steer's own must leave for its answer: `max_tokens`, but
        never more than a quarter of the context (quotes are cut to leave it)."""
        quarter = max(1, self.engine.max_model_len // 4)
        return quarter if max_tokens is None else max(1, min(max_tokens, quarter))

    async def fit(self, build: Callable[[Cut], Prompt], need: int) -> Prompt | None:
        """`build(cut)` with its quotes shortened so `need` tokens are left for the answer;
        None when even empty quotes leave too little (see `steer.critics.quoting`)."""
        return await fit_prompt(build, self.context_room, need)

    # -- calls ---------------------------------------------------------------------------------

    async def _reserve(
        self, prompts: Sequence[Prompt], params: SamplingParams
    ) -> tuple[SamplingParams, int, list[int]]:
        """Clamp `params` to the budget and hold its sequences and tokens; returns the
        params, the tokens held and each prompt's length."""
        count = len(prompts) * params.n
        self._check_calls(count)  # before counting tokens: a refusal costs nothing
        lengths = [await self.engine.count_prompt_tokens_async(p) for p in prompts]
        # subtle: no await from here on, so checking and holding are one step even when
        # calls of this session run concurrently.
        self._check_calls(count)
        used = self.total_tokens + self._reserved_tokens
        left = self.budget.max_total_tokens - used - sum(lengths)
        room = left // count
        if room < 1:
            held = f", {self._reserved_tokens} held by calls in flight" if (
                self._reserved_tokens) else ""
            raise self.budget.exhausted("max_total_tokens", (
                f"{self.total_tokens} used{held}, {sum(lengths)} more for the prompt, "
                f"{self.budget.max_total_tokens} allowed"))
        context_room = self.engine.max_model_len - max(lengths)
        limit = min(room, context_room) if context_room > 0 else room
        if params.max_tokens is None or params.max_tokens > limit:
            params = replace(params, max_tokens=limit)
        assert params.max_tokens is not None
        held_tokens = sum(lengths) + count * params.max_tokens
        self.model_calls += count
        self._reserved_tokens += held_tokens
        return params, held_tokens, lengths

    def _check_calls(self, count: int) -> None:
        if count > self.calls_left:
            raise self.budget.exhausted("max_model_calls", (
                f"{self.model_calls} used, {count} more needed, "
                f"{self.budget.max_model_calls} allowed"))

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
        params, held, lengths = await self._reserve(prompts, params)
        call_id = self._call_id()
        self._inflight.add(call_id)
        try:
            gens = await self.engine.generate(
                prompts, params, adapter=adapter or self.adapter, request_id=call_id
            )
        except asyncio.CancelledError:
            # subtle: the engine has read the prompts by now; count them, since an aborted
            # call reports nothing.
            self.prompt_tokens += sum(lengths)
            raise
        finally:
            self._reserved_tokens -= held
            self._inflight.discard(call_id)
        # A prompt's tokens count once per call, however many samples it produced.
        self.prompt_tokens += sum({g.prompt_index: g.prompt_tokens for g in gens}.values())
        self.completion_tokens += sum(g.completion_tokens for g in gens)
        for cached in {g.prompt_index: g.cached_tokens for g in gens}.values():
            self._count_cached(cached)
        return gens

    async def stream(
        self, prompt: Prompt, params: SamplingParams, adapter: AdapterRef | None = None
    ) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        """One streamed generation, counted token by token as it arrives."""
        params, held, (length,) = await self._reserve([prompt], params)
        call_id = self._call_id()
        self._inflight.add(call_id)
        stream = self.engine.stream(prompt, params, adapter=adapter or self.adapter,
                                    request_id=call_id)
        streamed, ended = 0, False
        try:
            async for item in stream:
                if isinstance(item, StreamEnd):
                    # The engine's totals replace what was counted on the way.
                    self.prompt_tokens += item.prompt_tokens
                    self.completion_tokens += item.completion_tokens - streamed
                    self._count_cached(item.cached_tokens)
                    ended = True
                else:
                    streamed += item.new_tokens
                    self.completion_tokens += item.new_tokens
                yield item
        finally:
            if not ended:  # cut off (timeout, cancel, client gone): the prompt was read
                self.prompt_tokens += length
            self._reserved_tokens -= held
            await stream.aclose()
            self._inflight.discard(call_id)

    def _count_cached(self, cached: int | None) -> None:
        if cached is not None:
            self.cached_tokens = (self.cached_tokens or 0) + cached

    async def abort_all(self) -> None:
        for call_id in list(self._inflight):
            await self.engine.abort(call_id)
        self._inflight.clear()
