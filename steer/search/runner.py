"""Turns a validated steering spec into a plan, and runs plans within their budgets.

`Steerer.plan()` checks everything before the first model call: the strategy, its options,
the critic, the template, and the budget: the client's against the server's caps (a preset
is clamped to them), and the least one useful run needs (`min_calls`). The effective budget
(the request's, else the preset's, within the server's caps) is what holds at run time, so a
strategy's worst case (`planned_calls`) is no reason to refuse. `run()` returns a
`SteerResult`; `stream()` yields progress events, then the answer as `StreamDelta`s (real
tokens when the strategy ends with a generation), then the `SteerResult`. When a budget runs
out, the best answer so far is returned, marked; with no answer at all, `BudgetExhausted`
says which limit ran out and whose it was.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steer.critics import CRITICS, Critic
from steer.engine import (
    AdapterRef,
    Engine,
    Generation,
    Message,
    SamplingParams,
    StreamDelta,
    StreamEnd,
    TokenLogprob,
)
from steer.search.base import (
    STRATEGIES,
    Context,
    Final,
    FinalPrompt,
    FinalText,
    SteerResult,
    Strategy,
)
from steer.search.session import Budget, BudgetExhausted, Limit, Session, SteeringInvalid
from steer.search.strategies.basic import TemplateStrategy
from steer.search.templates import PromptTemplate, TemplateLibrary
from steer.search.trace import Node, Trace

AdapterResolver = Callable[[str], AdapterRef]


@dataclass(frozen=True)
class SteeringSpec:
    """The `steering` request field, as the search layer receives it."""

    strategy: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)
    critic: Mapping[str, Any] | None = None
    budget: Mapping[str, Any] | None = None
    template: Mapping[str, Any] | None = None
    trace: bool = False
    # Budget defaults the client chose by name (reasoning_effort), not field by field:
    # clamped to the server's caps, and under any explicit `budget` field.
    preset: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Limits:
    """Server-wide caps; a request may ask for less, never more."""

    max_model_calls: int = 512
    max_total_tokens: int = 262144
    timeout_s: float = 300.0


class _BudgetFields(BaseModel):
    # Bounded here, before the caps are compared, so no absurd value is carried further.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    max_model_calls: int | None = Field(None, ge=1, le=1_000_000)
    max_total_tokens: int | None = Field(None, ge=1, le=1_000_000_000)
    timeout_s: float | None = Field(None, gt=0, le=86_400)


class _TemplateFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=128)
    variables: dict[str, Any] = Field(default_factory=dict, max_length=64)


LIMITS: tuple[Limit, ...] = get_args(Limit)


@dataclass(frozen=True)
class Progress:
    event: dict[str, Any]
    index: int = 0  # the choice whose search reported it


@dataclass(frozen=True)
class Plan:
    name: str
    strategy: Strategy
    budget: Budget
    template: tuple[PromptTemplate, Mapping[str, Any], str] | None
    trace: bool
    adapters: Mapping[str, AdapterRef] = field(default_factory=dict)

    def planned_calls(self) -> int:
        """The most model calls this plan can make: the strategy's worst case, within the
        budget (what admission may weigh before the first call)."""
        return min(self.strategy.planned_calls(), self.budget.max_model_calls)


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNION_TAGS = frozenset({"int", "float", "str", "bool", "list", "dict", "none"})


def _invalid(exc: ValidationError, prefix: str) -> SteeringInvalid:
    errors = exc.errors()
    # With a union (debate's `agents`: a count or a list) pydantic reports every member;
    # the member whose type matched, or else the deepest error, is the one worth showing.
    err = max(errors, key=lambda e: (not e["type"].endswith("_type"), len(e["loc"])))
    parts = [str(p) for p in err["loc"]
             if isinstance(p, int) or (_FIELD.match(p) and p not in _UNION_TAGS)]
    loc = ".".join(parts)
    param = f"{prefix}.{loc}" if loc else prefix
    what = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
    return SteeringInvalid(f"{param}: {what}", param)


class Steerer:
    def __init__(
        self, engine: Engine, limits: Limits, templates: TemplateLibrary,
        resolve_adapter: AdapterResolver,
    ) -> None:
        self.engine = engine
        self.limits = limits
        self.templates = templates
        self.resolve_adapter = resolve_adapter

    # -- planning --------------------------------------------------------------------------

    def plan(self, spec: SteeringSpec) -> Plan:
        cls = STRATEGIES.get(spec.strategy)
        if cls is None:
            raise SteeringInvalid(
                f"Unknown steering strategy '{spec.strategy}'. Strategies available: "
                + ", ".join(sorted(STRATEGIES)), "steering.strategy",
            )
        try:
            options = cls.Options.model_validate(dict(spec.options))
        except ValidationError as exc:
            raise _invalid(exc, "steering.options") from exc
        critic = self._critic(spec.critic, cls.default_critic)
        strategy = cls(options, critic)
        strategy.check()
        budget = self._budget(spec.budget, spec.preset)
        least = strategy.min_calls()
        if least > budget.max_model_calls:
            own = budget.source("max_model_calls") == "request"
            raise SteeringInvalid(
                f"this strategy needs at least {least} model calls for one useful run; "
                f"{budget.max_model_calls} allowed"
                + ("" if own else " by the server (ask for less)"),
                "steering.budget.max_model_calls" if own else "steering.options",
            )
        template = None
        if isinstance(options, TemplateStrategy.Options):
            template = (self.templates.get(options.name, "steering.options.name"),
                        options.variables, "steering.options")
        elif spec.template is not None:
            try:
                fields = _TemplateFields.model_validate(dict(spec.template))
            except ValidationError as exc:
                raise _invalid(exc, "steering.template") from exc
            template = (self.templates.get(fields.name, "steering.template.name"),
                        fields.variables, "steering.template")
        if template is not None:
            template[0].check_variables(template[1], template[2])
        adapters = {}
        for name in strategy.adapter_names():
            try:
                adapters[name] = self.resolve_adapter(name)
            except SteeringInvalid as exc:
                raise SteeringInvalid(str(exc), "steering.options.agents") from exc
        return Plan(spec.strategy, strategy, budget, template, spec.trace, adapters)

    def _critic(self, spec: Mapping[str, Any] | None, default: str | None) -> Critic | None:
        if spec is None:
            return CRITICS[default](CRITICS[default].Options()) if default else None
        spec = dict(spec)
        name = spec.pop("name", None)
        if not isinstance(name, str) or name not in CRITICS:
            raise SteeringInvalid(
                f"Unknown critic {name!r}. Critics available: " + ", ".join(sorted(CRITICS)),
                "steering.critic.name",
            )
        adapter_name = spec.pop("adapter", None)
        adapter = None
        if adapter_name is not None:
            if not isinstance(adapter_name, str):
                raise SteeringInvalid("critic adapter must be a name", "steering.critic.adapter")
            adapter = self.resolve_adapter(adapter_name)
        raw_options = spec.pop("options", {})
        if not isinstance(raw_options, dict):
            raise SteeringInvalid("critic options must be an object", "steering.critic.options")
        cls = CRITICS[name]
        try:
            options = cls.Options.model_validate({**raw_options, **spec})
        except ValidationError as exc:
            raise _invalid(exc, "steering.critic") from exc
        return cls(options, adapter)

    def _budget(self, raw: Mapping[str, Any] | None, preset: Mapping[str, Any] | None,
                ) -> Budget:
        try:
            fields = _BudgetFields.model_validate(dict(raw or {}))
        except ValidationError as exc:
            raise _invalid(exc, "steering.budget") from exc
        defaults = _BudgetFields.model_validate(dict(preset or {}))  # ours: always valid
        values: dict[str, Any] = {}
        requested, preset_set = set(), set()
        for name in LIMITS:
            asked, cap = getattr(fields, name), getattr(self.limits, name)
            if asked is not None:
                if asked > cap:
                    raise SteeringInvalid(
                        f"steering.budget.{name} may be at most {cap} on this server",
                        f"steering.budget.{name}",
                    )
                values[name] = asked
                requested.add(name)
                continue
            default = getattr(defaults, name)
            if default is not None and default < cap:
                values[name] = default
                preset_set.add(name)
            else:  # no preset, or one above what this server allows: the server's cap
                values[name] = cap
        return Budget(**values, requested=frozenset(requested), preset=frozenset(preset_set))

    # -- running ---------------------------------------------------------------------------

    def _context(
        self, plan: Plan, messages: tuple[Message, ...], params: SamplingParams,
        adapter: AdapterRef | None, request_id: str,
    ) -> Context:
        if plan.template is not None:
            template, variables, param = plan.template
            messages = template.apply(messages, variables, param)
        session = Session(self.engine, plan.budget, request_id, adapter)
        trace = Trace(plan.name)
        if plan.template is not None:
            trace.info["template"] = plan.template[0].name
        return Context(session, messages, params, plan.strategy.critic, trace,
                       adapters=dict(plan.adapters))

    async def _search(self, plan: Plan, ctx: Context) -> tuple[Final, bool]:
        deadline = asyncio.timeout(plan.budget.timeout_s)
        try:
            try:
                async with deadline:
                    final = await plan.strategy.run(ctx)
            except TimeoutError as exc:
                if not deadline.expired():
                    raise  # not our deadline: some other timeout inside
                raise plan.budget.timed_out(ctx.session.elapsed()) from exc
        except BudgetExhausted as exc:
            ctx.trace.info["budget_exhausted"] = str(exc)
            return FinalText(_best_so_far(ctx, exc)), True
        return final, ctx.budget_cut is not None

    def _result(self, ctx: Context, text: str, finish: str, exhausted: bool, index: int,
                answer_tokens: int, logprobs: tuple[TokenLogprob, ...] | None) -> SteerResult:
        s = ctx.session
        nodes = ctx.trace.nodes
        ctx.trace.info["elapsed_s"] = round(s.elapsed(), 4)
        return SteerResult(
            text=text, finish_reason=finish, prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens, model_calls=s.model_calls,
            candidates=sum(1 for n in nodes if n.role != "critic"),
            pruned=sum(1 for n in nodes if n.pruned), budget_exhausted=exhausted,
            trace=ctx.trace, cached_tokens=s.cached_tokens,
            answer_tokens=min(answer_tokens, s.completion_tokens),
            logprobs=logprobs if ctx.params.logprobs is not None else None, index=index,
        )

    async def run(
        self, plan: Plan, messages: tuple[Message, ...], params: SamplingParams,
        adapter: AdapterRef | None, request_id: str,
    ) -> SteerResult:
        result: SteerResult | None = None
        async for item in self.stream(plan, messages, params, adapter, request_id,
                                      stream_final=False):
            if isinstance(item, SteerResult):
                result = item
        assert result is not None
        return result

    async def stream(
        self, plan: Plan, messages: tuple[Message, ...], params: SamplingParams,
        adapter: AdapterRef | None, request_id: str, stream_final: bool = True,
        index: int = 0,
    ) -> AsyncGenerator[Progress | StreamDelta | SteerResult, None]:
        """One search: its progress, then its answer (deltas with `index`), then its result."""
        ctx = self._context(plan, messages, params, adapter, request_id)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        ctx.progress = _QueueList(queue)
        task = asyncio.ensure_future(self._search(plan, ctx))
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield Progress(getter.result(), index)
                else:
                    getter.cancel()
            while not queue.empty():
                yield Progress(queue.get_nowait(), index)
            final, exhausted = task.result()
            if isinstance(final, FinalText):
                final.node.chosen = True
                gen = ctx.outputs.get(final.node.id)
                if stream_final:
                    for delta in _answer_deltas(final.node.text, gen, index,
                                                ctx.params.logprobs is not None):
                        yield delta
                yield self._result(
                    ctx, final.node.text, final.finish_reason, exhausted, index,
                    gen.completion_tokens if gen else final.node.tokens,
                    gen.logprobs if gen else None)
                return
            async for item in self._final(plan, ctx, final, stream_final, index):
                yield item
        finally:
            if not task.done():
                task.cancel()
            await ctx.session.abort_all()

    async def _final(
        self, plan: Plan, ctx: Context, final: FinalPrompt, stream_final: bool, index: int,
    ) -> AsyncGenerator[StreamDelta | SteerResult, None]:
        """The last generation: streamed token by token, within what is left of the budget."""
        left = plan.budget.timeout_s - ctx.session.elapsed()
        text, finish, exhausted = "", "stop", ctx.budget_cut is not None
        tokens, logprobs = 0, list[TokenLogprob]()
        deadline = asyncio.timeout(max(left, 0.001))
        try:
            try:
                async with deadline:
                    async for item in ctx.session.stream(final.messages, final.params):
                        if isinstance(item, StreamEnd):
                            tokens = item.completion_tokens
                            continue
                        text += item.text
                        tokens += item.new_tokens
                        logprobs.extend(item.logprobs or ())
                        if item.finish_reason:
                            finish = item.finish_reason
                        if stream_final:
                            yield replace(item, index=index)
            except TimeoutError as exc:
                if not deadline.expired():
                    raise
                raise plan.budget.timed_out(ctx.session.elapsed()) from exc
        except BudgetExhausted as exc:
            ctx.trace.info["budget_exhausted"] = str(exc)
            if not text:
                best = _best_so_far(ctx, exc)
                gen = ctx.outputs.get(best.id)
                text, tokens = best.text, gen.completion_tokens if gen else best.tokens
                logprobs = list(gen.logprobs or ()) if gen else []
                if stream_final:
                    for delta in _answer_deltas(text, gen, index,
                                                ctx.params.logprobs is not None):
                        yield delta
            exhausted, finish = True, "length"
        node = ctx.trace.add("final", text, parent=final.parent, chosen=True, tokens=tokens,
                             ended_s=round(ctx.session.elapsed(), 4))
        node.meta["finish_reason"] = finish
        yield self._result(ctx, text, finish, exhausted, index, tokens, tuple(logprobs))


class _QueueList(list[dict[str, Any]]):
    """`ctx.progress` that also feeds the stream's queue."""

    def __init__(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        super().__init__()
        self.queue = queue

    def append(self, event: dict[str, Any]) -> None:
        super().append(event)
        self.queue.put_nowait(event)


# Trace roles that are never an answer to fall back on.
NOT_ANSWERS = frozenset({"critic", "root", "unparsed"})


def _best_so_far(ctx: Context, exc: BudgetExhausted) -> Node:
    if ctx.best is not None:
        return ctx.best
    answers = [n for n in ctx.trace.candidates() if n.role not in NOT_ANSWERS
               and (ctx.constraint is None or n.meta.get("constrained"))]
    if not answers:
        raise BudgetExhausted(f"the budget ran out before any answer: {exc}", exc.limit,
                              exc.source) from exc
    mean = [(n.meta.get("mean_logprob") or -math.inf, n) for n in answers]
    return max(mean, key=lambda pair: pair[0])[1]


def _answer_deltas(text: str, gen: Generation | None, index: int, with_logprobs: bool,
                   ) -> list[StreamDelta]:
    """An already-chosen answer as deltas for streaming: the engine's own steps (each with
    its tokens' logprobs, when the client asked) when the answer is one generation's text as
    the engine made it; else the text in small chunks. (No tokens counted: the session has
    them already.)"""
    if gen is None or not gen.pieces or "".join(t for t, _ in gen.pieces) != text:
        return [StreamDelta(index=index, text=piece, new_tokens=0) for piece in _pieces(text)]
    deltas, at = [], 0
    for piece, tokens in gen.pieces:
        logprobs = gen.logprobs[at:at + tokens] if with_logprobs and gen.logprobs else None
        deltas.append(StreamDelta(index=index, text=piece, new_tokens=0, logprobs=logprobs))
        at += tokens
    return deltas


def _pieces(text: str, size: int = 16) -> list[str]:
    """Split an already-chosen answer into small chunks for streaming."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]
