"""A scripted `Engine` for fast unit tests: `enqueue()` answers, read `history` afterwards.

Tokens are whitespace-separated words, so counts in assertions are easy to derive by hand.
Never used instead of the real engine in integration tests.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from steer.engine import (
    AdapterRef,
    Capabilities,
    Engine,
    EngineHealth,
    EngineNotReady,
    Generation,
    Prompt,
    PromptTooLong,
    SamplingParams,
    StreamDelta,
    StreamEnd,
    TokenLogprob,
    TopLogprob,
)


@dataclass(frozen=True)
class Call:
    kind: str  # "generate" or "stream"
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    adapter: AdapterRef | None
    request_id: str | None
    # Tokens of each sequence this call returned, in order; a stream counts them as it
    # yields them, so an abandoned stream shows what it really sent.
    completion_tokens: list[int] = field(default_factory=list)


# llm_judge names fresh verdict words in each prompt (steer.critics.model.verdict_labels).
_VERDICT_WORDS = re.compile(r"If it is, reply with: (\w+)\. If it is not, reply with: (\w+)\.")


def _in_verdict_words(prompt: Prompt | None, text: str) -> str:
    """A scripted "yes"/"no" to a judge prompt, said in that prompt's own verdict words (as a
    model that followed the instruction would), so tests can script verdicts plainly."""
    if prompt is None or isinstance(prompt, str) or text.strip().lower() not in ("yes", "no"):
        return text
    words = _VERDICT_WORDS.search(prompt[-1].content) if prompt else None
    if words is None:
        return text
    return words.group(1 if text.strip().lower() == "yes" else 2)


def _text_of(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return " ".join(m.content for m in prompt)


class FakeEngine(Engine):
    def __init__(self, model_name: str = "fake-model", max_model_len: int = 64) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.capabilities = Capabilities(lora=True)
        self.answers: deque[str | tuple[str, float]] = deque()
        self.history: list[Call] = []
        self.aborted: list[str] = []
        self.started = asyncio.Event()
        self.release_start: asyncio.Event | None = None  # set it to hold start() open
        self.hold: asyncio.Event | None = None  # set it to hold every generation open
        self.alive = True
        self.default_answer = "ok"
        # Optional: answer by looking at the prompt instead of the queue.
        self.respond: Callable[[Prompt, SamplingParams], str] | None = None
        self._adapters: dict[str, AdapterRef] = {}

    def enqueue(self, *answers: str | tuple[str, float]) -> None:
        """Queue answers, served in order; `(text, logprob)` sets every token's logprob."""
        self.answers.extend(answers)

    def _next(self) -> tuple[str, float]:
        answer = self.answers.popleft() if self.answers else self.default_answer
        return answer if isinstance(answer, tuple) else (answer, -0.5)

    async def start(self) -> None:
        if self.release_start is not None:
            await self.release_start.wait()
        self.started.set()

    async def shutdown(self) -> None:
        self.alive = False

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(_text_of(prompt).split())

    def _fit(self, prompt: Prompt, params: SamplingParams) -> int:
        n = self.count_prompt_tokens(prompt)
        room = self.max_model_len - n
        if room <= 0 or (params.max_tokens is not None and params.max_tokens > room):
            raise PromptTooLong(n, params.max_tokens, self.max_model_len)
        return room if params.max_tokens is None else params.max_tokens

    def _answer(
        self, limit: int, prompt: Prompt | None = None, params: SamplingParams | None = None
    ) -> tuple[str, list[str], str, float]:
        """(text, its tokens, finish reason, per-token logprob); text keeps its newlines."""
        if self.respond is not None and prompt is not None and params is not None:
            text, logprob = self.respond(prompt, params), -0.5
        else:
            text, logprob = self._next()
        text = _in_verdict_words(prompt, text)
        words = text.split()
        if len(words) > limit:
            return " ".join(words[:limit]), words[:limit], "length", logprob
        return text, words, "stop", logprob

    @staticmethod
    def _logprobs(
        words: list[str], k: int | None, logprob: float = -0.5
    ) -> tuple[TokenLogprob, ...] | None:
        if k is None:
            return None
        return tuple(
            TokenLogprob(w, logprob, tuple(TopLogprob(f"{w}{j}" if j else w, logprob - j)
                                           for j in range(k)))
            for w in words
        )

    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> list[Generation]:
        if not self.alive:
            raise EngineNotReady("fake engine stopped")
        call = Call("generate", tuple(prompts), params, adapter, request_id)
        self.history.append(call)
        limits = [self._fit(p, params) for p in prompts]
        if self.hold is not None:
            await self.hold.wait()
        gens = []
        for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
            for j in range(params.n):
                text, words, finish, lp = self._answer(limit, prompt, params)
                call.completion_tokens.append(len(words))
                gens.append(Generation(
                    text=text, prompt_tokens=self.count_prompt_tokens(prompt),
                    completion_tokens=len(words), finish_reason=finish,  # type: ignore[arg-type]
                    prompt_index=i, index=j, logprobs=self._logprobs(words, params.logprobs, lp),
                    # one step a word, as the fake streams them (the text, when it is that)
                    pieces=tuple(((" " if k else "") + w, 1) for k, w in enumerate(words)),
                ))
        return gens

    async def stream(
        self,
        prompt: Prompt,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        if not self.alive:
            raise EngineNotReady("fake engine stopped")
        call = Call("stream", (prompt,), params, adapter, request_id)
        self.history.append(call)
        limit = self._fit(prompt, params)
        total = 0
        try:
            for j in range(params.n):
                _, words, finish, lp = self._answer(limit, prompt, params)
                call.completion_tokens.append(0)
                for k, w in enumerate(words):
                    if self.hold is not None:
                        await self.hold.wait()
                    last = k == len(words) - 1
                    total += 1
                    call.completion_tokens[-1] += 1
                    yield StreamDelta(
                        index=j, text=(" " if k else "") + w, new_tokens=1,
                        logprobs=self._logprobs([w], params.logprobs, lp),
                        finish_reason=finish if last else None,  # type: ignore[arg-type]
                    )
        except GeneratorExit:
            self.aborted.append(request_id or "")
            raise
        yield StreamEnd(prompt_tokens=self.count_prompt_tokens(prompt), completion_tokens=total)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        self._adapters[adapter.name] = adapter

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        if self._adapters.get(adapter.name) == adapter:  # not a newer version of the name
            del self._adapters[adapter.name]

    def adapters(self) -> list[AdapterRef]:
        return list(self._adapters.values())

    async def health(self) -> EngineHealth:
        return EngineHealth(ok=self.alive, detail="" if self.alive else "stopped")
