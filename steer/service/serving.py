"""OpenAI chat and completions over an `Engine`: request -> engine call -> response or SSE.

Owns the checks only HTTP knows (model name, server caps, the reserved `steering` field),
admission, cancel-on-disconnect and token metrics. Generation itself is the engine's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from steer.engine import (
    AdapterRef,
    Engine,
    EngineError,
    Generation,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
    TokenLogprob,
)
from steer.service import structured, tools
from steer.service.adapters import RequestAdapters
from steer.service.admission import Admission
from steer.service.errors import (
    APIError,
    bad_request,
    from_engine_error,
    internal_error,
    sse_error,
)
from steer.service.fields import logit_bias_pairs, role_violation
from steer.service.limits import check_messages, check_prompts, request_key
from steer.service.metrics import Metrics
from steer.service.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    LogprobEntry,
    SteeringSpec,
    TopLogprobEntry,
    Usage,
    new_id,
    now,
)
from steer.service.recorder import Finished, Recorder
from steer.service.settings import Settings
from steer.service.tools import ParserFactory, ToolStream

T = TypeVar("T")
# A finished stream put back together: (renderer, text per choice, finish per choice, usage).
OnEnd = Callable[["Renderer", dict[int, str], dict[int, str], Usage], None]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
logger = logging.getLogger(__name__)


@dataclass
class Serving:
    engine: Engine
    settings: Settings
    metrics: Metrics
    admission: Admission
    adapters: RequestAdapters | None = None
    recorder: Recorder | None = None
    tool_parsers: ParserFactory | None = None  # reads `tool_choice: auto` calls back

    def load_tool_parsers(self) -> None:
        """Once the engine is up: the configured vLLM tool parser over the engine's own
        tokenizer (an engine without one, or no parser set, leaves `auto` refused)."""
        tokenizer = getattr(self.engine, "tokenizer", None)  # the vLLM engine's
        if self.settings.tool_call_parser and tokenizer is not None:
            self.tool_parsers = tools.vllm_parsers(self.settings.tool_call_parser, tokenizer)

    def record(self, item: Finished) -> None:
        """Hand a finished answer to the store's writer (it decides whether to keep it)."""
        if self.recorder is not None:
            self.recorder.submit(item)

    def storing(self, req: ChatCompletionRequest, steered: bool) -> bool:
        return self.recorder is not None and self.recorder.wanted(req, steered)

    # -- checks ------------------------------------------------------------------------------

    def check_model(self, model: str) -> AdapterRef | None:
        """The adapter a model name selects (None: the base model); 404 for unknown names.
        The adapter stays held (an unload waits) until this request's response is finished."""
        if model == self.engine.model_name:
            return None
        if self.adapters is None:
            raise APIError(
                404,
                f"The model '{model}' does not exist. Available: {self.engine.model_name}",
                type="not_found_error", param="model", code="model_not_found",
            )
        return self.adapters.resolve(model)  # UnknownAdapter: 404 listing what exists

    def check_chat_size(self, req: ChatCompletionRequest) -> None:
        s = self.settings
        check_messages([m.text() for m in req.messages], s.max_messages, s.max_prompt_chars)
        violation = role_violation(req.messages)
        if violation is not None:
            raise bad_request(*violation)

    def work(self, prompt_chars: int, sequences: int, max_tokens: int | None) -> int:
        """Tokens a request may make the engine process: every sequence's new tokens (the
        server's cap when the request sets none) and its prompt (~4 characters a token), a
        sequence never more than the context window (so one sequence is never "heavy")."""
        new = max_tokens or self.settings.max_tokens_cap
        return sequences * min(new + prompt_chars // 4, self.engine.max_model_len)

    def served_names(self) -> list[str]:
        """The names a request's `model` may use: the base model's, then every adapter's."""
        return [self.engine.model_name, *(self.adapters.names() if self.adapters else ())]

    def sampling(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        max_tokens: tuple[str, int | None],
        logprobs: int | None,
    ) -> SamplingParams:
        field, limit = max_tokens
        # Cross-field rules live here, not in the wire model, so the error can name the field.
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")
        if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and (
                not req.logprobs):
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if req.n > self.settings.max_n:
            raise bad_request(f"n must be at most {self.settings.max_n} on this server", "n")
        if limit is not None and limit > self.settings.max_tokens_cap:
            raise bad_request(
                f"{field} must be at most {self.settings.max_tokens_cap} on this server", field
            )
        if req.min_tokens is not None and req.min_tokens > (limit or self.settings.max_tokens_cap):
            raise bad_request(f"min_tokens must be at most {field}", "min_tokens")
        if limit is None:
            limit = self.settings.max_tokens_cap  # and the engine clamps it to the context
            clamp = True
        else:
            clamp = False
        return SamplingParams(
            max_tokens=None if clamp else limit,
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            stop=req.stop_list(),
            seed=req.seed,
            logprobs=logprobs,
            min_tokens=req.min_tokens or 0,
            logit_bias=logit_bias_pairs(req.logit_bias),
            constraint=structured.constraint_of(req),
        )

    @staticmethod
    def check_steering(spec: SteeringSpec | None) -> None:
        if spec is not None and not spec.is_plain():
            raise bad_request(
                "steering strategies run on /v1/chat/completions; this endpoint only takes "
                "{\"strategy\": \"none\"}", "steering",
            )

    # -- chat --------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, http: Request) -> Any:
        """A plain (unsteered) chat completion."""
        self.check_chat_size(req)
        adapter = self.check_model(req.model)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        plan = tools.plan_tools(req)
        tools.require_parser(plan, self.tool_parsers)
        params = tools.with_constraint(self.sampling(req, req.max_tokens_field(), logprobs),
                                       plan)
        await structured.check_request(self.engine, req, params.constraint)
        messages = tools.engine_messages(req, plan)
        admit = Admit(self.work(sum(len(m.content) for m in messages), params.n,
                                params.max_tokens), request_key(req.end_user()))
        adapter_name = adapter.name if adapter else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            calls = tools.ToolStream(plan, self.tool_parsers) if plan is not None else None

            def stored(out: Renderer, texts: dict[int, str], finish: dict[int, str],
                       usage: Usage) -> None:
                assert isinstance(out, ChatRenderer)
                answers = [tools.answer(plan, texts.get(i, ""), finish.get(i, "stop"),
                                        self.tool_parsers) for i in range(params.n)]
                self.record(Finished(req, ChatCompletion(
                    id=out.id, created=out.created, model=req.model, usage=usage,
                    service_tier=req.tier_used(),
                    choices=[ChatChoice(index=i, message=message, finish_reason=reason)
                             for i, (message, reason) in enumerate(answers)],
                ), adapter_name))

            return await self._stream(
                messages, params, CHAT, "messages", include_usage,
                lambda: ChatRenderer(req.model, req.tier_used(), calls), admit, adapter,
                req.max_tokens_field()[0],
                on_end=stored if self.storing(req, steered=False) else None,
            )
        gens = await self._generate(http, [messages], params, CHAT, "messages", admit, adapter,
                                    req.max_tokens_field()[0])
        answers = [tools.answer(plan, g.text, g.finish_reason, self.tool_parsers) for g in gens]
        completion = ChatCompletion(
            id=new_id("chatcmpl"),
            created=now(),
            model=req.model,
            choices=[
                ChatChoice(
                    index=g.index,
                    message=message,
                    logprobs=_chat_logprobs(g.logprobs),
                    finish_reason=reason,
                )
                for g, (message, reason) in zip(gens, answers, strict=True)
            ],
            usage=_usage(gens),
            service_tier=req.tier_used(),
        )
        self.record(Finished(req, completion, adapter_name))
        return completion

    # -- completions -------------------------------------------------------------------------

    async def completion(self, req: CompletionRequest, http: Request) -> Any:
        adapter = self.check_model(req.model)
        self.check_steering(req.steering)
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported", "echo")
        prompts = req.prompts()
        check_prompts(prompts, self.settings.max_prompts, self.settings.max_prompt_chars)
        params = self.sampling(req, ("max_tokens", req.max_tokens), req.logprobs)
        await structured.check_request(self.engine, req, params.constraint)
        admit = Admit(self.work(sum(map(len, prompts)), len(prompts) * params.n,
                                params.max_tokens), request_key(req.user))
        if req.stream:
            if len(prompts) > 1:
                raise bad_request("streaming supports one prompt at a time", "prompt")
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            echo = prompts[0] if req.echo else ""
            return await self._stream(
                prompts[0], params, COMPLETIONS, "prompt", include_usage,
                lambda: CompletionRenderer(req.model, echo), admit, adapter,
            )
        gens = await self._generate(http, list(prompts), params, COMPLETIONS, "prompt", admit,
                                    adapter)
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=req.model,
            choices=[
                CompletionChoice(
                    index=g.prompt_index * params.n + g.index,
                    text=(prompts[g.prompt_index] if req.echo else "") + g.text,
                    logprobs=_completion_logprobs(g.logprobs),
                    finish_reason=g.finish_reason,
                )
                for g in gens
            ],
            usage=_usage(gens),
        )

    # -- plumbing ----------------------------------------------------------------------------

    async def _generate(
        self, http: Request, prompts: list[Prompt], params: SamplingParams, route: str,
        prompt_param: str, admit: Admit, adapter: AdapterRef | None = None,
        max_tokens_param: str = "max_tokens",
    ) -> list[Generation]:
        ticket = await self.admission.acquire(admit.work, admit.key)
        rid = new_id("req")
        start = time.perf_counter()
        try:
            gens = await cancel_on_disconnect(
                http, lambda: self.engine.generate(prompts, params, adapter, request_id=rid),
                on_cancel=lambda: self.engine.abort(rid),
            )
        except EngineError as exc:
            raise from_engine_error(exc, prompt_param, max_tokens_param) from exc
        except APIError:
            raise
        except Exception as exc:
            raise internal_error(exc, rid) from exc
        finally:
            self.admission.release(ticket)
        usage = _usage(gens)
        self.metrics.count_tokens(route, usage.prompt_tokens, usage.completion_tokens)
        # Non-streamed: the first token reaches the client with the last.
        self.metrics.ttft.labels(route).observe(time.perf_counter() - start)
        return gens

    async def _stream(
        self, prompt: Prompt, params: SamplingParams, route: str, prompt_param: str,
        include_usage: bool, renderer: Callable[[], Renderer], admit: Admit,
        adapter: AdapterRef | None = None, max_tokens_param: str = "max_tokens",
        on_end: OnEnd | None = None,
    ) -> EventSourceResponse:
        ticket = await self.admission.acquire(admit.work, admit.key)
        rid = new_id("req")
        start = time.perf_counter()
        stream = self.engine.stream(prompt, params, adapter, request_id=rid)
        try:
            # Pull the first item before answering, so a refusal (prompt too long, engine
            # down) is a proper HTTP error instead of an error inside a 200 stream.
            first = await anext(stream)
        except EngineError as exc:
            self.admission.release(ticket)
            raise from_engine_error(exc, prompt_param, max_tokens_param) from exc
        except Exception as exc:
            self.admission.release(ticket)
            raise internal_error(exc, rid) from exc
        except BaseException:
            self.admission.release(ticket)
            raise
        self.metrics.ttft.labels(route).observe(time.perf_counter() - start)
        out = renderer()

        async def events() -> AsyncGenerator[str, None]:
            for event in out.start(params.n):
                yield event
            item: StreamDelta | StreamEnd | None = first
            texts: dict[int, list[str]] = {}  # only kept when the answer is to be stored
            finish: dict[int, str] = {}
            while item is not None:
                if isinstance(item, StreamEnd):
                    self.metrics.count_tokens(route, item.prompt_tokens, item.completion_tokens)
                    usage = Usage.of(item.prompt_tokens, item.completion_tokens,
                                     cached_tokens=item.cached_tokens)
                    if on_end is not None:
                        on_end(out, {i: "".join(t) for i, t in texts.items()}, finish, usage)
                    if include_usage:
                        yield out.usage(usage)
                    break
                if on_end is not None:
                    texts.setdefault(item.index, []).append(item.text)
                    if item.finish_reason:
                        finish[item.index] = item.finish_reason
                for event in out.delta(item):
                    yield event
                item = await anext(stream, None)

        async def close() -> None:
            try:
                await stream.aclose()  # on a client disconnect this aborts the engine request
            finally:
                self.admission.release(ticket)  # even when aborting fails (a dead engine)

        return guarded_stream(events(), close, rid, prompt_param, self.settings, self.metrics)


@dataclass(frozen=True)
class Admit:
    """What admission weighs a request by: its work (tokens) and whom it counts against."""

    work: int
    key: str | None


class GuardedEventSource(EventSourceResponse):
    """An SSE response whose cleanup runs on every path: the events ran out, the client
    left, a send timed out (a client that stopped reading: its socket buffer is full), or
    the response never started (the client left before the first byte)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]],
                 send_timeout: float, metrics: Metrics) -> None:
        super().__init__(content, ping=15, send_timeout=send_timeout)
        self._on_close = on_close
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            # subtle: the client is still connected but reads nothing; keep-alive pings
            # would hold it open forever. Cut it off and free what it held.
            self._metrics.stream_send_timeouts.inc()
            logger.info("stream cut off: the client stopped reading for %.0fs",
                        self.send_timeout or 0)
        finally:
            await self._on_close()


def guarded_stream(
    events: AsyncGenerator[str, None], on_close: Callable[[], Awaitable[None]], request_id: str,
    prompt_param: str, settings: Settings, metrics: Metrics,
    translate: Callable[[Exception], APIError | None] | None = None,
) -> GuardedEventSource:
    """SSE for `events`: any failure after the headers went out ends the stream with an
    error event in OpenAI's shape and `[DONE]`, never a dropped connection. `translate`
    maps the errors a caller knows (else engine errors are translated, the rest are 500s,
    logged with the request id)."""

    async def body() -> AsyncIterator[str]:
        err: APIError | None = None
        try:
            async for event in events:
                yield event
        except Exception as exc:  # after the headers: the error must travel in the stream
            err = translate(exc) if translate else None
            if err is None and isinstance(exc, EngineError):
                err = from_engine_error(exc, prompt_param)
            if err is None:
                err = internal_error(exc, request_id)
        finally:
            await events.aclose()
        if err is not None:
            yield sse_error(err)
        yield "[DONE]"

    return GuardedEventSource(body(), on_close, settings.sse_send_timeout_s, metrics)


async def cancel_on_disconnect(
    http: Request, work: Callable[[], Awaitable[T]], on_cancel: Callable[[], Awaitable[None]],
) -> T:
    """Run `work` until it finishes or the client goes away; then cancel and abort it."""
    task = asyncio.ensure_future(work())

    async def disconnected() -> None:
        # The body is already read: the next ASGI message is the disconnect.
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        await on_cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await on_cancel()
        await asyncio.wait({task})  # let the cancellation land before answering
        raise APIError(499, "client disconnected", type="client_closed_request")
    return task.result()


# -- rendering --------------------------------------------------------------------------------


class Renderer:
    def start(self, n: int) -> list[str]:
        return []

    def delta(self, d: StreamDelta) -> list[str]:
        raise NotImplementedError

    def usage(self, usage: Usage) -> str:
        raise NotImplementedError


class ChatRenderer(Renderer):
    def __init__(self, model: str, service_tier: Literal["default"] | None = None,
                 tools: ToolStream | None = None) -> None:
        self.id, self.created, self.model = new_id("chatcmpl"), now(), model
        self.service_tier = service_tier  # on every chunk, as OpenAI sends it
        self.tools = tools  # a request with tools: text becomes content or call pieces

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None,
               steering: dict[str, Any] | None = None) -> str:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
            service_tier=self.service_tier, steering=steering,
        ).model_dump_json()

    def start(self, n: int) -> list[str]:
        return [
            self._chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            for i in range(n)
        ]

    def delta(self, d: StreamDelta) -> list[str]:
        if self.tools is not None:
            return self.tool_events(d.index, d.text, d.finish_reason, d.logprobs)
        events = []
        if d.text or d.logprobs:
            events.append(self._chunk([ChunkChoice(
                index=d.index, delta=Delta(content=d.text), logprobs=_chat_logprobs(d.logprobs)
            )]))
        if d.finish_reason:
            events.append(self._chunk(
                [ChunkChoice(index=d.index, delta=Delta(), finish_reason=d.finish_reason)]
            ))
        return events

    def tool_events(self, index: int, text: str, finish: str | None,
                    logprobs: tuple[TokenLogprob, ...] | None = None,
                    steering: dict[str, Any] | None = None) -> list[str]:
        """Choice `index`'s new text as content or tool-call chunks (`ToolStream`); with
        `finish`, what the stream held back, then the finish chunk."""
        assert self.tools is not None
        deltas = self.tools.feed(index, text) if text else []
        events = [self._chunk([ChunkChoice(index=index, delta=delta,
                                           logprobs=_chat_logprobs(logprobs) if i == 0 else None)])
                  for i, delta in enumerate(deltas)]
        if finish:
            rest, reason = self.tools.finish(index, finish)
            events.extend(self._chunk([ChunkChoice(index=index, delta=delta)]) for delta in rest)
            events.append(self._chunk(
                [ChunkChoice(index=index, delta=Delta(), finish_reason=reason)], steering=steering))
        return events

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def content(self, text: str) -> str:
        return self._chunk([ChunkChoice(index=0, delta=Delta(content=text))])

    def progress(self, event: dict[str, Any], index: int = 0) -> str:
        return self._chunk([ChunkChoice(index=index, delta=Delta())], steering=event)

    def finish(self, reason: str, steering: dict[str, Any] | None = None, index: int = 0,
               ) -> str:
        return self._chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=reason)],
                           steering=steering)


class CompletionRenderer(Renderer):
    def __init__(self, model: str, echo: str) -> None:
        self.id, self.created, self.model = new_id("cmpl"), now(), model
        self.echo = echo

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        ).model_dump_json()

    def start(self, n: int) -> list[str]:
        if not self.echo:
            return []
        return [
            self._chunk([CompletionChoice(index=i, text=self.echo, finish_reason=None)])
            for i in range(n)
        ]

    def delta(self, d: StreamDelta) -> list[str]:
        return [self._chunk([CompletionChoice(
            index=d.index, text=d.text, logprobs=_completion_logprobs(d.logprobs),
            finish_reason=d.finish_reason,
        )])]

    def finish(self, reason: str, index: int = 0) -> str:
        return self._chunk([CompletionChoice(index=index, text="", finish_reason=reason)])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)


def _usage(gens: list[Generation]) -> Usage:
    # A prompt is counted once however many sequences it produced (OpenAI's convention).
    prompt = sum({g.prompt_index: g.prompt_tokens for g in gens}.values())
    cached = {g.prompt_index: g.cached_tokens for g in gens}
    known = [c for c in cached.values() if c is not None]
    return Usage.of(prompt, sum(g.completion_tokens for g in gens),
                    cached_tokens=sum(known) if known else None)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _chat_logprobs(lps: tuple[TokenLogprob, ...] | None) -> ChoiceLogprobs | None:
    if lps is None:
        return None
    return ChoiceLogprobs(content=[
        LogprobEntry(
            token=t.token, logprob=t.logprob, bytes=_bytes(t.token),
            top_logprobs=[
                TopLogprobEntry(token=x.token, logprob=x.logprob, bytes=_bytes(x.token))
                for x in t.top
            ],
        )
        for t in lps
    ])


def _completion_logprobs(lps: tuple[TokenLogprob, ...] | None) -> CompletionLogprobs | None:
    if lps is None:
        return None
    offsets, pos = [], 0
    for t in lps:
        offsets.append(pos)
        pos += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in lps],
        token_logprobs=[t.logprob for t in lps],
        top_logprobs=[{x.token: x.logprob for x in t.top} for t in lps],
        text_offset=offsets,
    )

