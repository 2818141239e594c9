"""Steered chat completions over HTTP: which spec a request carries, and rendering a
`SteerResult` (or its stream) in OpenAI's shapes with `usage.steering` and a trace.

The search itself is `steer.search`; this module only parses, admits, renders and counts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.requests import Request

from steer.engine import AdapterRef, EngineError, PromptTooLong, StreamDelta
from steer.search import (
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
from steer.service.errors import bad_request, from_search_error, sse_error
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
from steer.service.serving import (
    CHAT,
    ChatRenderer,
    Serving,
    cancel_on_disconnect,
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
        self.traces.put(rid, result.trace)
        return {"id": rid, **result.trace.to_dict()}

    async def handle(self, req: ChatCompletionRequest, http: Request) -> Any:
        """Every chat completion: plain ones go straight to the engine, steered ones search."""
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
        prompt_tokens = engine.count_prompt_tokens(messages)
        if prompt_tokens >= engine.max_model_len:
            raise from_search_error(PromptTooLong(prompt_tokens, None, engine.max_model_len))
        rid = new_id("steer")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self.steerer.stream(plan, messages, params, adapter, rid)
            return await self._stream(stream, plan.name, model, include_usage,
                                      rid if plan.trace else None)
        ticket = await self.admission.acquire()
        start = time.perf_counter()
        try:
            result = await cancel_on_disconnect(
                http, lambda: self.steerer.run(plan, messages, params, adapter, rid),
                on_cancel=_nothing,
            )
        except (SearchError, EngineError) as exc:
            self.metrics.strategy_errors.labels(plan.name).inc()
            raise from_search_error(exc) from exc
        finally:
            self.admission.release(ticket)
        self._count(plan.name, result, time.perf_counter() - start)
        body = ChatCompletion(
            id=new_id("chatcmpl"), created=now(), model=model,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=result.text),
                                finish_reason=result.finish_reason)],
            usage=_usage(result),
            steering_trace=self._trace(result, rid) if plan.trace else None,
        )
        return JSONResponse(body.model_dump())

    async def _stream(
        self, stream: AsyncGenerator[Progress | StreamDelta | SteerResult, None], name: str,
        model: str, include_usage: bool, trace_id: str | None,
    ) -> EventSourceResponse:
        # Validation is done (plan); headers go out now and progress streams as it happens.
        ticket = await self.admission.acquire()
        start = time.perf_counter()
        out = ChatRenderer(model)

        async def events() -> AsyncIterator[str]:
            try:
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
                                self.metrics.ttft.labels(CHAT).observe(
                                    time.perf_counter() - start)
                            yield out.content(item.text)
                    else:
                        self._count(name, item, time.perf_counter() - start)
                        extra = {"trace": self._trace(item, trace_id)} if trace_id else None
                        yield out.finish(item.finish_reason, extra)
                        if include_usage:
                            yield out.usage(_usage(item))
                yield "[DONE]"
            except (SearchError, EngineError) as exc:
                self.metrics.strategy_errors.labels(name).inc()
                yield sse_error(from_search_error(exc))
            finally:
                await stream.aclose()  # cancels the search and aborts its engine calls
                self.admission.release(ticket)

        return EventSourceResponse(events(), ping=15)

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

