"""Strategies that sample several answers to one prompt and pick one:
`best_of_n` (a critic picks) and `self_consistency` (a majority vote over final answers).

Both are anytime: with a budget too small for every sample, they sample what fits (keeping
room for the critic's calls) and pick among those, marking the result as cut."""

from __future__ import annotations

import math
from collections import Counter

from pydantic import Field, model_validator

from steer.critics.extract import extractor
from steer.critics.patterns import PatternStr
from steer.search.base import (
    Context,
    Final,
    FinalText,
    Strategy,
    StrategyOptions,
    register_strategy,
)
from steer.search.constrained import answer_extractor
from steer.search.trace import Node


def _mean_lp(node: Node) -> float:
    value = node.meta.get("mean_logprob")
    return float(value) if value is not None else -math.inf


@register_strategy
class BestOfN(Strategy):
    """Sample `n` answers (in waves of `batch_size`), score each wave in one critic batch,
    return the best; stop early once a score reaches `threshold`.

    Under a constraint every sample is an answer, so every sample is decoded under it; a
    JSON constraint's schema also gates the critic (`steer.search.constrained`): a sample
    that fails it scores 0 and is never returned while a valid one exists."""

    name = "best_of_n"
    default_critic = "logprob"

    class Options(StrategyOptions):
        n: int = Field(4, ge=1, le=64)
        temperature: float = Field(0.8, ge=0.0, le=2.0)
        threshold: float | None = Field(None, ge=0.0, le=1.0)
        batch_size: int | None = Field(None, ge=1, le=64)

    def planned_calls(self) -> int:
        opts = self.options
        assert isinstance(opts, BestOfN.Options)
        waves = math.ceil(opts.n / (opts.batch_size or opts.n))
        per_wave = min(opts.n, opts.batch_size or opts.n)
        critic = self.critic.planned_calls(per_wave) if self.critic else 0
        return opts.n + waves * critic

    def _wave_calls(self, k: int) -> int:
        return k + (self.critic.planned_calls(k) if self.critic else 0)

    def min_calls(self) -> int:
        return self._wave_calls(1)

    async def run(self, ctx: Context) -> Final:
        opts = self.options
        assert isinstance(opts, BestOfN.Options)
        batch = opts.batch_size or opts.n
        nodes: list[Node] = []
        wave = 0
        while len(nodes) < opts.n:
            wanted = min(batch, opts.n - len(nodes))
            size = ctx.affordable(wanted, self._wave_calls)
            if size == 0:
                if nodes:
                    break
                raise ctx.session.budget.exhausted("max_model_calls", (
                    f"{ctx.session.model_calls} used, {ctx.session.budget.max_model_calls} "
                    "allowed: not one sample fits"))
            params = ctx.answer_sampling(n=size, temperature=opts.temperature,
                                         logprobs=ctx.answer_logprobs)
            gens = await ctx.session.generate([ctx.messages], params, role="generator")
            fresh = ctx.add_generations(gens, "generator", round=wave)
            nodes.extend(fresh)
            await ctx.score(fresh)
            best = ctx.best
            ctx.note(round=wave, candidates=len(nodes), best_score=best.score if best else None)
            if opts.threshold is not None and best and (best.score or 0) >= opts.threshold:
                ctx.trace.info["early_stop"] = {"round": wave, "score": best.score}
                break
            wave += 1
        chosen = ctx.best or max(nodes, key=_mean_lp)
        for n in nodes:
            n.pruned = n is not chosen
        chosen.chosen = True
        return FinalText(chosen, chosen.meta.get("finish_reason", "stop"))


@register_strategy
class SelfConsistency(Strategy):
    """Sample `k` reasoning paths in one call, extract each final answer, majority vote.
    Ties go to the critic when one is given, else to the higher mean token logprob.

    Under a constraint every path is an answer, decoded under it; under a JSON constraint a
    path that fails the schema gets no vote."""

    name = "self_consistency"

    class Options(StrategyOptions):
        k: int = Field(5, ge=1, le=64)
        temperature: float = Field(0.7, ge=0.0, le=2.0)
        # Unset: `last_number`, or `json` when decoding is constrained to JSON (a tool call,
        # a json_schema answer: the whole answer is the value voted on).
        extract: str = Field("last_number",
                             pattern="^(last_number|answer_line|choice|regex|json)$")
        pattern: PatternStr | None = None

        @model_validator(mode="after")
        def _pattern_for_regex(self) -> SelfConsistency.Options:
            if self.extract == "regex":
                extractor("regex", self.pattern)  # raises ValueError when missing or invalid
            return self

    def planned_calls(self) -> int:
        opts = self.options
        assert isinstance(opts, SelfConsistency.Options)
        return opts.k + (self.critic.planned_calls(opts.k) if self.critic else 0)

    async def run(self, ctx: Context) -> Final:
        opts = self.options
        assert isinstance(opts, SelfConsistency.Options)
        extract = answer_extractor(ctx.constraint, opts.extract, opts.pattern,
                                   chosen="extract" in opts.model_fields_set)
        # The critic only breaks ties, so it gets no room kept: the vote comes first.
        k = ctx.affordable(opts.k, lambda k: k)
        if k == 0:
            raise ctx.session.budget.exhausted("max_model_calls", (
                f"{ctx.session.model_calls} used, {ctx.session.budget.max_model_calls} "
                "allowed: not one sample fits"))
        params = ctx.answer_sampling(n=k, temperature=opts.temperature,
                                     logprobs=ctx.answer_logprobs)
        gens = await ctx.session.generate([ctx.messages], params, role="generator")
        nodes = ctx.add_generations(gens, "generator")
        if ctx.gate is not None:
            await ctx.score(nodes, ctx.gate)
        for n in nodes:
            # An answer that fails the schema the request asked for gets no vote.
            n.meta["answer"] = None if n.id in ctx.failed_gate else extract(n.text)
        votes = Counter(n.meta["answer"] for n in nodes if n.meta["answer"] is not None)
        ctx.trace.info["votes"] = dict(votes.most_common())
        ctx.note(votes=dict(votes.most_common()))
        if not votes:
            ctx.trace.info["tie_break"] = "no answer extracted: highest mean logprob"
            pool = nodes
        else:
            top = max(votes.values())
            winners = [a for a, c in votes.items() if c == top]
            pool = [n for n in nodes if n.meta["answer"] in winners]
            critic = self.critic
            if len(winners) > 1 and critic is not None:
                cost = critic.planned_calls(len(pool))
                if not ctx.affordable(1, lambda _: cost):
                    critic = None  # no room left for the tie-break: the logprob decides
            if len(winners) > 1 and critic is not None:
                await ctx.score(pool)
                ctx.trace.info["tie_break"] = f"critic {critic.name}"
                best_by_answer: dict[str, float] = {}
                for n in pool:
                    a = n.meta["answer"]
                    best_by_answer[a] = max(best_by_answer.get(a, -1.0), n.score or 0.0)
                winner = max(winners, key=lambda a: best_by_answer[a])
                pool = [n for n in pool if n.meta["answer"] == winner]
            elif len(winners) > 1:
                ctx.trace.info["tie_break"] = "mean logprob"
        chosen = max(pool, key=lambda n: (n.score or 0.0, _mean_lp(n)))
        for n in nodes:
            n.pruned = n.meta["answer"] != chosen.meta["answer"]
            n.scores.setdefault("votes", votes.get(n.meta["answer"], 0) / len(nodes))
        chosen.chosen = True
        return FinalText(chosen, chosen.meta.get("finish_reason", "stop"))
