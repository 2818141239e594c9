"""Steered chat and text completions over HTTP: which spec a request carries, the choices
it asks for (n searches; for a text completion, n per prompt, the prompt as the question),
and rendering their `SteerResult`s (or their stream) in OpenAI's shapes, with usage details,
`usage.steering` and traces.

The search itself is `steer.search`; this module only parses, admits, renders and counts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request

from steer.engine import AdapterRef, Message, PromptTooLong, SamplingParams, StreamDelta
from steer.search import (
    Plan,
    Progress,
    SearchError,
    Steerer,
    SteeringSpec,
    SteerResult,
    choice_id,
    from_optillm,
    run_many,
    split_model,
    stream_many,
    with_reasoning_effort,
)
from steer.service import structured, tools
from steer.service.admission import Admission
from steer.service.errors import APIError, bad_request, from_engine_error, from_search_error
from steer.service.limits import check_prompts, request_key
from steer.service.metrics import Metrics
from steer.service.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    new_id,
    now,
)
from steer.service.recorder import Finished
from steer.service.serving import (
    CHAT,
    COMPLETIONS,
    Admit,
    ChatRenderer,
    CompletionRenderer,
    GuardedEventSource,
    Serving,
    cancel_on_disconnect,
    guarded_stream,
)
from steer.service.steered_render import (
    SteeredChunks,
    chat_choices,
    completion_choices,
    steered_usage,
)
from steer.service.traces import TraceStore

# The results of a finished stream, handed on for storing (with the returned traces).
OnResults = Callable[[ChatRenderer, list[SteerResult], dict[str, Any] | None], None]


def requested_spec(req: ChatCompletionRequest | CompletionRequest, served: list[str],
                   ) -> tuple[SteeringSpec | None, str]:
    """The steering a request asks for, in any accepted form, and the model it names. A
    text completion takes `steering` and optillm's model prefix (its other forms are chat
    fields)."""
    slug, model = split_model(req.model, served)
    spec: SteeringSpec | None = None
    if req.steering is not None and not req.steering.is_plain():
        s = req.steering
        spec = SteeringSpec(strategy=s.strategy, options=s.options, critic=s.critic,
                            budget=s.budget, template=s.template, trace=s.trace)
    approach = req.optillm_approach if isinstance(req, ChatCompletionRequest) else None
    forms = [name for name, used in (("steering", spec is not None),
                                     ("optillm_approach", approach is not None),
                                     ("model", slug is not None)) if used]
    if len(forms) > 1:
        raise bad_request(f"ask for steering one way only, not {' and '.join(forms)}", forms[1])
    if approach is not None:
        spec = from_optillm(approach, "optillm_approach")
    elif slug is not None:
        spec = from_optillm(slug, "model")
    if isinstance(req, ChatCompletionRequest) and req.reasoning_effort is not None:
        spec = with_reasoning_effort(spec, req.reasoning_effort)
    return spec, model


@dataclass(frozen=True)
class Ask:
    """What differs between a steered chat and a steered text completion."""

    route: str  # CHAT or COMPLETIONS
    prompt_param: str  # the field a too-long prompt is blamed on
    max_tokens: tuple[str, int | None]  # which field set the limit, and its value
    questions: tuple[tuple[Message, ...], ...]  # choice i answers questions[i]
    logprobs: int | None  # the client's top-k, None: not asked
    echo: tuple[str, ...]  # text completions: put before each choice's answer
    user: str | None


def chat_ask(req: ChatCompletionRequest, calls: tools.ToolPlan | None = None) -> Ask:
    messages = tuple(tools.engine_messages(req, calls))
    return Ask(CHAT, "messages", req.max_tokens_field(), (messages,) * req.n,
               (req.top_logprobs or 0) if req.logprobs else None, ("",) * req.n,
               req.end_user())


def completion_ask(req: CompletionRequest) -> Ask:
    prompts = [p for p in req.prompts() for _ in range(req.n)]  # OpenAI's choice order
    return Ask(COMPLETIONS, "prompt", ("max_tokens", req.max_tokens),
               tuple((Message("user", p),) for p in prompts), req.logprobs,
               tuple(p if req.echo else "" for p in prompts), req.user)


@dataclass
class SteeredChat:
    serving: Serving
    steerer: Steerer
    metrics: Metrics
    admission: Admission
    traces: TraceStore

    def _trace(self, result: SteerResult, rid: str, count: int) -> dict[str, Any]:
        """A choice's trace, kept under its own id (the request's when it is the only one)."""
        trace_id = choice_id(rid, result.index, count)
        data = result.trace.to_dict()  # once: kept and returned
        self.traces.put(trace_id, data)
        return {"id": trace_id, **data}

    def _traces(self, results: Sequence[SteerResult], rid: str) -> dict[str, Any]:
        if len(results) == 1:
            return self._trace(results[0], rid, 1)
        return {"id": rid, "strategy": results[0].trace.strategy,
                "choices": [self._trace(r, rid, len(results)) for r in results]}

    async def handle(self, req: ChatCompletionRequest, http: Request) -> Any:
        """Every chat completion: plain ones go straight to the engine, steered ones search."""
        self.serving.check_chat_size(req)
        spec, model = requested_spec(req, self.serving.served_names())
        if spec is None:
            return await self.serving.chat(req, http)
        adapter = self.serving.check_model(model)
        return await self.steered(req, http, spec, model, adapter)

    async def handle_completion(self, req: CompletionRequest, http: Request) -> Any:
        """Every text completion: steered ones search with the prompt as the question."""
        spec, model = requested_spec(req, self.serving.served_names())
        if spec is None:
            return await self.serving.completion(req, http)
        adapter = self.serving.check_model(model)
        return await self.steered_completion(req, http, spec, model, adapter)

    async def _plan(self, spec: SteeringSpec, ask: Ask) -> Plan:
        try:
            plan = self.steerer.plan(spec)
        except SearchError as exc:
            raise from_search_error(exc) from exc
        if ask.logprobs is not None and not plan.strategy.answer_is_generation:
            raise bad_request(
                f"logprobs are not returned with the '{plan.name}' strategy: its answer is "
                "assembled from several generations, so no one generation's logprobs are "
                "the answer's", "logprobs")
        return plan

    async def _admit(self, plan: Plan, params: SamplingParams, ask: Ask) -> Admit:
        """Refuse a question that can't fit the context; weigh every choice's search."""
        engine = self.serving.engine
        searches, most = len(ask.questions), self.serving.settings.max_n
        if searches > most:
            # One search per choice, each with its own budget, all started at once: bounded
            # like n itself, so prompts x n can't multiply a request past admission's cap.
            raise bad_request(
                f"a steered request runs one search per choice: {searches} (prompts x n) "
                f"here, at most {most} on this server", "n")
        lengths: dict[tuple[Message, ...], int] = {}
        for q in ask.questions:
            if q not in lengths:
                lengths[q] = await engine.count_prompt_tokens_async(q)
                if lengths[q] >= engine.max_model_len:
                    raise from_engine_error(PromptTooLong(lengths[q], None, engine.max_model_len),
                                            ask.prompt_param)
        work = sum(self._work(plan, params, lengths[q]) for q in ask.questions)
        lim = self.serving.admission.limits
        if searches > 1 and work > lim.heavy_share * lim.capacity:
            # Admission caps one request's weight at the heavy share (so one big search can
            # still run alone); several searches together must fit under it as they are.
            raise bad_request(
                f"{searches} searches of this size need up to {work} tokens of work together; "
                f"one request may hold at most {int(lim.heavy_share * lim.capacity)} on this "
                "server: lower n, the strategy's size or its budget", "n")
        return Admit(work, request_key(ask.user))

    async def steered_completion(
        self, req: CompletionRequest, http: Request, spec: SteeringSpec, model: str,
        adapter: AdapterRef | None,
    ) -> Any:
        s = self.serving.settings
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported", "echo")
        check_prompts(req.prompts(), s.max_prompts, s.max_prompt_chars)
        if req.stream and len(req.prompts()) > 1:
            raise bad_request("streaming supports one prompt at a time", "prompt")
        ask = completion_ask(req)
        plan = await self._plan(spec, ask)
        params = replace(self.serving.sampling(req, ask.max_tokens, ask.logprobs), n=1)
        await structured.check_request(self.serving.engine, req, params.constraint)
        admit = await self._admit(plan, params, ask)
        rid = new_id("steer")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = stream_many(self.steerer, plan, ask.questions, params, adapter, rid)
            out = SteeredChunks(CompletionRenderer(model, ask.echo[0]))
            return await self._stream(stream, plan, out, len(ask.questions), include_usage,
                                      rid, admit, ask.route)
        results = await self._run(http, plan, ask, params, adapter, rid, admit)
        body = Completion(id=new_id("cmpl"), created=now(), model=model,
                          choices=completion_choices(results, ask.echo),
                          usage=steered_usage(results),
                          steering_trace=self._traces(results, rid) if plan.trace else None)
        return JSONResponse(body.model_dump())

    async def steered(
        self, req: ChatCompletionRequest, http: Request, spec: SteeringSpec, model: str,
        adapter: AdapterRef | None,
    ) -> Any:
        calls = tools.plan_tools(req)
        tools.check_steering(calls, spec.strategy)
        parsers = self.serving.tool_parsers
        answer = tools.answerer(calls, parsers)
        ask = chat_ask(req, calls)
        plan = await self._plan(spec, ask)
        params = tools.with_constraint(
            replace(self.serving.sampling(req, ask.max_tokens, ask.logprobs), n=1), calls)
        await structured.check_request(self.serving.engine, req, params.constraint)
        admit = await self._admit(plan, params, ask)
        rid = new_id("steer")
        adapter_name = adapter.name if adapter else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = stream_many(self.steerer, plan, ask.questions, params, adapter, rid)

            def stored(out: ChatRenderer, results: list[SteerResult],
                       trace: dict[str, Any] | None) -> None:
                self.serving.record(Finished(req, ChatCompletion(
                    id=out.id, created=out.created, model=model, usage=steered_usage(results),
                    service_tier=req.tier_used(), choices=chat_choices(results, answer),
                ), adapter_name, spec, trace or results[0].trace,
                    choice_id(rid, 0, len(results))))

            chunks = SteeredChunks(ChatRenderer(
                model, req.tier_used(), tools.ToolStream(calls, parsers) if calls else None))
            return await self._stream(stream, plan, chunks, len(ask.questions), include_usage,
                                      rid, admit, ask.route,
                                      stored if self.serving.storing(req, True) else None)
        results = await self._run(http, plan, ask, params, adapter, rid, admit)
        body = ChatCompletion(
            id=new_id("chatcmpl"), created=now(), model=model,
            choices=chat_choices(results, answer),
            usage=steered_usage(results), service_tier=req.tier_used(),
            steering_trace=self._traces(results, rid) if plan.trace else None,
        )
        data = body.model_dump()
        # A stored completion keeps the first choice's trace (one search per record).
        first = (body.steering_trace or {}).get("choices", [body.steering_trace])[0]
        self.serving.record(Finished(req, data, adapter_name, spec, first or results[0].trace,
                                     choice_id(rid, 0, len(results))))
        return JSONResponse(data)

    async def _run(
        self, http: Request, plan: Plan, ask: Ask, params: SamplingParams,
        adapter: AdapterRef | None, rid: str, admit: Admit,
    ) -> list[SteerResult]:
        ticket = await self.admission.acquire(admit.work, admit.key)
        start = time.perf_counter()
        try:
            results = await cancel_on_disconnect(
                http, lambda: run_many(self.steerer, plan, ask.questions, params, adapter, rid),
                on_cancel=_nothing,
            )
        except APIError:
            raise
        except Exception as exc:  # search, critic, engine: translated; anything else a 500
            self.metrics.strategy_errors.labels(plan.name).inc()
            raise from_search_error(exc, rid) from exc
        finally:
            self.admission.release(ticket)
        self._count(plan.name, results, time.perf_counter() - start, ask.route)
        return results

    def _work(self, plan: Plan, params: SamplingParams, prompt_tokens: int) -> int:
        """What a search may ask of the engine, known before its first call: its planned
        sequences (at most its call budget), each up to the request's max_tokens with the
        prompt, and never more than its token budget."""
        calls = plan.planned_calls()
        per_call = min(params.max_tokens or self.serving.settings.max_tokens_cap,
                       self.serving.engine.max_model_len) + prompt_tokens
        return min(calls * per_call, plan.budget.max_total_tokens)

    async def _stream(
        self, stream: AsyncGenerator[Progress | StreamDelta | SteerResult, None], plan: Plan,
        out: SteeredChunks, count: int, include_usage: bool, rid: str, admit: Admit,
        route: str, on_results: OnResults | None = None,
    ) -> GuardedEventSource:
        # Validation is done (plan); headers go out now and progress streams as it happens.
        ticket = await self.admission.acquire(admit.work, admit.key)
        start = time.perf_counter()
        name = plan.name

        async def events() -> AsyncGenerator[str, None]:
            for event in out.start(count):
                yield event
            first_token = True
            results: list[SteerResult] = []
            traces: dict[int, dict[str, Any]] = {}
            async for item in stream:
                if isinstance(item, Progress):
                    for event in out.progress(item.event, item.index):
                        yield event
                elif isinstance(item, StreamDelta):
                    if item.text and first_token:
                        first_token = False
                        self.metrics.ttft.labels(route).observe(time.perf_counter() - start)
                    for event in out.delta(item):
                        yield event
                else:
                    results.append(item)
                    trace = self._trace(item, rid, count) if plan.trace else None
                    if trace is not None:
                        traces[item.index] = trace
                    for event in out.finish(item, {"trace": trace} if trace and out.chat
                                            else None):
                        yield event
            results.sort(key=lambda r: r.index)
            self._count(name, results, time.perf_counter() - start, route)
            if on_results is not None and isinstance(out.out, ChatRenderer):
                on_results(out.out, results, traces.get(results[0].index))
            if include_usage:
                yield out.usage(steered_usage(results))

        def translate(exc: Exception) -> APIError:
            self.metrics.strategy_errors.labels(name).inc()
            return from_search_error(exc, rid)

        async def close() -> None:
            try:
                await stream.aclose()  # cancels the searches and aborts their engine calls
            finally:
                self.admission.release(ticket)  # even when aborting fails (a dead engine)

        settings = self.serving.settings
        prompt_param = "messages" if route == CHAT else "prompt"
        return guarded_stream(events(), close, rid, prompt_param, settings, self.metrics,
                              translate)

    def _count(self, name: str, results: Sequence[SteerResult], elapsed: float,
               route: str) -> None:
        m = self.metrics
        m.strategy_requests.labels(name).inc()
        for r in results:
            m.strategy_model_calls.labels(name).inc(r.model_calls)
            m.strategy_tokens.labels(name).inc(r.prompt_tokens + r.completion_tokens)
            m.count_tokens(route, r.prompt_tokens, r.completion_tokens)
        m.strategy_latency.labels(name).observe(elapsed)
        if any(r.budget_exhausted for r in results):
            m.strategy_budget_exhausted.labels(name).inc()


async def _nothing() -> None:
    """Cancelling the search task already aborts its engine calls (see Steerer.stream)."""
