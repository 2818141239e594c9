"""Steered chat completions over HTTP: which spec a request carries, and rendering a
`SteerResult` (or its stream) in OpenAI's shapes with `usage.steering` and a trace.

The search itself is `steer.search`; this module only parses, admits, renders and counts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from starlette.requests import Request

from steer.engine import AdapterRef, PromptTooLong, SamplingParams, StreamDelta
from steer.search import (
    Plan,
    Progress,
    SearchError,
    Steerer,
    SteeringSpec,
    SteerResult,
    from_optillm,
    split_model,
    with_reasoning_effort,
)
from steer.service.admission import Admission
from steer.service.errors import APIError, bad_request, from_search_error
from steer.service.limits import request_key
from steer.service.metrics import Metrics
from steer.service.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    SteeringUsage,
    Usage,
    new_id,
    now,
)
from steer.service.recorder import Finished
from steer.service.serving import (
    CHAT,
    Admit,
    ChatRenderer,
    GuardedEventSource,
    Serving,
    cancel_on_disconnect,
    guarded_stream,
    to_message,
)
from steer.service.traces import TraceStore


def requested_spec(req: ChatCompletionRequest, served: list[str]) -> tuple[SteeringSpec | None,
                                                                           str]:
    """The steering a request asks for, in any accepted form, and the model it names."""
    slug, model = split_model(req.model, served)
    spec: SteeringSpec | None = None
    if req.steering is not None and not req.steering.is_plain():
        s = req.steering
        spec = SteeringSpec(strategy=s.strategy, options=s.options, critic=s.critic,
                            budget=s.budget, template=s.template, trace=s.trace)
    forms = [name for name, used in (("steering", spec is not None),
                                     ("optillm_approach", req.optillm_approach is not None),
                                     ("model", slug is not None)) if used]
    if len(forms) > 1:
        raise bad_request(f"ask for steering one way only, not {' and '.join(forms)}", forms[1])
    if req.optillm_approach is not None:
        spec = from_optillm(req.optillm_approach, "optillm_approach")
    elif slug is not None:
        spec = from_optillm(slug, "model")
    if req.reasoning_effort is not None:
        spec = with_reasoning_effort(spec, req.reasoning_effort)
    return spec, model


@dataclass
class SteeredChat:
    serving: Serving
    steerer: Steerer
    metrics: Metrics
    admission: Admission
    traces: TraceStore

    def _trace(self, result: SteerResult, rid: str) -> dict[str, Any]:
        data = result.trace.to_dict()  # once: kept and returned
        self.traces.put(rid, data)
        return {"id": rid, **data}

    async def handle(self, req: ChatCompletionRequest, http: Request) -> Any:
        """Every chat completion: plain ones go straight to the engine, steered ones search."""
        self.serving.check_chat_size(req)
        spec, model = requested_spec(req, self.serving.served_names())
        if spec is None:
            return await self.serving.chat(req, http)
        adapter = self.serving.check_model(model)
        return await self.steered(req, http, spec, model, adapter)

    async def steered(
        self, req: ChatCompletionRequest, http: Request, spec: SteeringSpec, model: str,
        adapter: AdapterRef | None,
    ) -> Any:
        if req.n != 1:
            raise bad_request("n must be 1 with a steering strategy", "n")
        if req.logprobs:
            raise bad_request("logprobs are not returned for steered answers", "logprobs")
        try:
            plan = self.steerer.plan(spec)
        except SearchError as exc:
            raise from_search_error(exc) from exc
        params = self.serving.sampling(req, req.max_tokens_field(), None)
        messages = tuple(to_message(m.role, m.text()) for m in req.messages)
        engine = self.serving.engine
        prompt_tokens = await engine.count_prompt_tokens_async(messages)
        if prompt_tokens >= engine.max_model_len:
            raise from_search_error(PromptTooLong(prompt_tokens, None, engine.max_model_len))
        rid = new_id("steer")
        admit = Admit(self._work(plan, params, prompt_tokens), request_key(req.end_user()))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self.steerer.stream(plan, messages, params, adapter, rid)

            def stored(out: ChatRenderer, result: SteerResult,
                       trace: dict[str, Any] | None) -> None:
                self.serving.record(Finished(req, ChatCompletion(
                    id=out.id, created=out.created, model=model, usage=_usage(result),
                    service_tier=req.tier_used(),
                    choices=[ChatChoice(index=0, message=AssistantMessage(content=result.text),
                                        finish_reason=result.finish_reason)],
                ), adapter.name if adapter else None, spec, trace or result.trace, rid))

            return await self._stream(stream, plan.name, model, include_usage, rid,
                                      plan.trace, admit,
                                      stored if self.serving.storing(req, True) else None,
                                      tier=req.tier_used())
        ticket = await self.admission.acquire(admit.work, admit.key)
        start = time.perf_counter()
        try:
            result = await cancel_on_disconnect(
                http, lambda: self.steerer.run(plan, messages, params, adapter, rid),
                on_cancel=_nothing,
            )
        except APIError:
            raise
        except Exception as exc:  # search, critic, engine: translated; anything else a 500
            self.metrics.strategy_errors.labels(plan.name).inc()
            raise from_search_error(exc, rid) from exc
        finally:
            self.admission.release(ticket)
        self._count(plan.name, result, time.perf_counter() - start)
        body = ChatCompletion(
            id=new_id("chatcmpl"), created=now(), model=model,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=result.text),
                                finish_reason=result.finish_reason)],
            usage=_usage(result), service_tier=req.tier_used(),
            steering_trace=self._trace(result, rid) if plan.trace else None,
        )
        data = body.model_dump()
        self.serving.record(Finished(req, data, adapter.name if adapter else None, spec,
                                     body.steering_trace or result.trace, rid))
        return JSONResponse(data)

    def _work(self, plan: Plan, params: SamplingParams, prompt_tokens: int) -> int:
        """What a search may ask of the engine, known before its first call: its planned
        sequences (at most its call budget), each up to the request's max_tokens with the
        prompt, and never more than its token budget."""
        calls = plan.planned_calls()
        per_call = min(params.max_tokens or self.serving.settings.max_tokens_cap,
                       self.serving.engine.max_model_len) + prompt_tokens
        return min(calls * per_call, plan.budget.max_total_tokens)

    async def _stream(
        self, stream: AsyncGenerator[Progress | StreamDelta | SteerResult, None], name: str,
        model: str, include_usage: bool, rid: str, trace: bool, admit: Admit,
        on_result: Callable[[ChatRenderer, SteerResult, dict[str, Any] | None], None] | None
        = None, tier: Literal["default"] | None = None,
    ) -> GuardedEventSource:
        # Validation is done (plan); headers go out now and progress streams as it happens.
        ticket = await self.admission.acquire(admit.work, admit.key)
        start = time.perf_counter()
        out = ChatRenderer(model, tier)

        async def events() -> AsyncGenerator[str, None]:
            for event in out.start(1):
                yield event
            first_token = True
            async for item in stream:
                if isinstance(item, Progress):
                    yield out.progress(item.event)
                elif isinstance(item, StreamDelta):
                    if item.text:
                        if first_token:
                            first_token = False
                            self.metrics.ttft.labels(CHAT).observe(time.perf_counter() - start)
                        yield out.content(item.text)
                else:
                    self._count(name, item, time.perf_counter() - start)
                    extra = {"trace": self._trace(item, rid)} if trace else None
                    if on_result is not None:
                        on_result(out, item, extra["trace"] if extra else None)
                    yield out.finish(item.finish_reason, extra)
                    if include_usage:
                        yield out.usage(_usage(item))

        def translate(exc: Exception) -> APIError:
            self.metrics.strategy_errors.labels(name).inc()
            return from_search_error(exc, rid)

        async def close() -> None:
            try:
                await stream.aclose()  # cancels the search and aborts its engine calls
            finally:
                self.admission.release(ticket)  # even when aborting fails (a dead engine)

        settings = self.serving.settings
        return guarded_stream(events(), close, rid, "messages", settings, self.metrics,
                              translate)

    def _count(self, name: str, result: SteerResult, elapsed: float) -> None:
        m = self.metrics
        m.strategy_requests.labels(name).inc()
        m.strategy_model_calls.labels(name).inc(result.model_calls)
        m.strategy_tokens.labels(name).inc(result.prompt_tokens + result.completion_tokens)
        m.strategy_latency.labels(name).observe(elapsed)
        m.count_tokens(CHAT, result.prompt_tokens, result.completion_tokens)
        if result.budget_exhausted:
            m.strategy_budget_exhausted.labels(name).inc()


async def _nothing() -> None:
    """Cancelling the search task already aborts its engine calls (see Steerer.stream)."""


def _usage(result: SteerResult) -> Usage:
    usage = Usage.of(result.prompt_tokens, result.completion_tokens)
    usage.steering = SteeringUsage(
        model_calls=result.model_calls, candidates=result.candidates, pruned=result.pruned,
        budget_exhausted=result.budget_exhausted,
    )
    return usage

