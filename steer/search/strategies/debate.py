"""Multi-agent debate (Du et al. 2023): agents answer, then for each further round every
agent reads the others' latest answers and updates its own.

A round is one batched engine step even when agents use different adapters (their calls are
submitted together). Stops early once all agents' extracted answers agree. The final answer
is the majority (answer extraction as in self-consistency), the critic's pick (`judge`), or
the last round's consensus (falling back to the majority).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from steer.critics.extract import extractor
from steer.critics.patterns import PatternStr
from steer.engine import Generation, Message
from steer.search.base import (
    Context,
    Final,
    FinalText,
    Strategy,
    StrategyOptions,
    register_strategy,
)
from steer.search.session import SteeringInvalid
from steer.search.trace import Node


class Agent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    persona: str | None = Field(None, max_length=2000)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    adapter: str | None = None


@register_strategy
class Debate(Strategy):
    name = "debate"

    class Options(StrategyOptions):
        agents: int | list[Agent] = Field(3)
        rounds: int = Field(2, ge=1, le=8)
        aggregate: Literal["majority", "judge", "consensus"] = "majority"
        extract: str = Field("last_number", pattern="^(last_number|answer_line|choice|regex)$")
        pattern: PatternStr | None = None
        summarize: bool = False
        summary_tokens: int = Field(200, ge=16, le=2048)

        @model_validator(mode="after")
        def _pattern_for_regex(self) -> Debate.Options:
            if self.extract == "regex" and not self.pattern:
                raise ValueError("extract 'regex' needs a 'pattern'")
            return self

    @property
    def opts(self) -> Debate.Options:
        assert isinstance(self.options, Debate.Options)
        return self.options

    @property
    def agents(self) -> list[Agent]:
        a = self.opts.agents
        return [Agent.model_validate({}) for _ in range(a)] if isinstance(a, int) else list(a)

    def check(self) -> None:
        n = len(self.agents)
        if not 1 <= n <= 16:
            raise SteeringInvalid("debate needs 1 to 16 agents", "steering.options.agents")
        if self.opts.aggregate == "judge" and self.critic is None:
            raise SteeringInvalid("aggregate 'judge' needs steering.critic", "steering.critic")

    def planned_calls(self) -> int:
        n, r = len(self.agents), self.opts.rounds
        summaries = (r - 1) * n if self.opts.summarize else 0
        judge = self.critic.planned_calls(n) if self.critic else 0
        return n * r + summaries + judge

    async def run(self, ctx: Context) -> Final:
        o = self.opts
        agents = self.agents
        extract = extractor(o.extract, o.pattern)
        latest: list[Node] = []
        for rnd in range(o.rounds):
            prompts = []
            for i, agent in enumerate(agents):
                base = list(ctx.messages)
                if agent.persona:
                    base = [Message("system", agent.persona), *[m for m in base
                                                                if m.role != "system"]]
                if rnd > 0:
                    others = await self._others(ctx, latest, i)
                    base += [Message("assistant", latest[i].text), Message("user", others)]
                prompts.append(base)
            gens = await self._round(ctx, prompts, agents)
            latest = [
                ctx.trace.add(f"agent-{i}", g.text, round=rnd, tokens=g.completion_tokens,
                              parent=latest[i].id if latest else None,
                              ended_s=round(ctx.session.elapsed(), 4),
                              meta={"answer": extract(g.text), "finish_reason": g.finish_reason})
                for i, g in enumerate(gens)
            ]
            answers = [n.meta["answer"] for n in latest]
            ctx.note(round=rnd, answers=answers)
            if len(agents) > 1 and answers[0] is not None and len(set(answers)) == 1:
                ctx.trace.info["consensus_round"] = rnd
                break
        return await self._aggregate(ctx, latest)

    def adapter_names(self) -> list[str]:
        return [a.adapter for a in self.agents if a.adapter]

    async def _round(self, ctx: Context, prompts: list[list[Message]], agents: list[Agent],
                     ) -> list[Generation]:
        """One engine step: all agents' calls submitted together, grouped per adapter and
        temperature (one batched call per group)."""
        groups: dict[tuple[str, float], list[int]] = {}
        for i, agent in enumerate(agents):
            groups.setdefault((agent.adapter or "", agent.temperature), []).append(i)

        async def call(members: list[int]) -> list[Generation]:
            agent = agents[members[0]]
            params = ctx.sampling(temperature=agent.temperature, logprobs=0)
            return await ctx.session.generate(
                [prompts[i] for i in members], params, role="agent",
                adapter=ctx.adapters.get(agent.adapter or ""),
            )

        results = await asyncio.gather(*(call(m) for m in groups.values()))
        out: list[Generation | None] = [None] * len(agents)
        for members, gens in zip(groups.values(), results, strict=True):
            for member, g in zip(members, gens, strict=True):
                out[member] = g
        return [g for g in out if g is not None]

    async def _others(self, ctx: Context, latest: list[Node], me: int) -> str:
        others = [n.text for j, n in enumerate(latest) if j != me]
        if self.opts.summarize:
            key = ("summary", latest[0].round, me)
            if key not in ctx.cache:
                joined = "\n---\n".join(others)
                ask = [Message("user", "Summarize these answers to the question "
                               f"\"{ctx.question.text}\", keeping each one's final answer "
                               f"and key reasoning:\n{joined}")]
                params = ctx.sampling(temperature=0.0, max_tokens=self.opts.summary_tokens,
                                      logprobs=None, stop=())
                (g,) = await ctx.session.generate([ask], params, role="summary")
                ctx.cache[key] = g.text
            body = str(ctx.cache[key])
        else:
            body = "\n\n".join(f"One agent's solution: {t}" for t in others)
        return (f"These are the solutions to the problem from other agents:\n{body}\n\n"
                "Using their reasoning as additional advice, can you give an updated answer? "
                "Examine your solution and theirs step by step, and end with your final answer.")

    async def _aggregate(self, ctx: Context, latest: list[Node]) -> Final:
        o = self.opts
        votes = Counter(n.meta["answer"] for n in latest if n.meta["answer"] is not None)
        ctx.trace.info["votes"] = dict(votes.most_common())
        if o.aggregate == "judge":
            await ctx.score(latest)
            best = max(latest, key=lambda n: n.score or 0.0)
        elif votes:
            top = votes.most_common(1)[0][0]
            best = next(n for n in latest if n.meta["answer"] == top)
            if o.aggregate == "consensus" and len(votes) > 1:
                ctx.trace.info["consensus"] = False
        else:
            best = latest[0]
        for n in ctx.trace.nodes:
            n.pruned = n.role.startswith("agent") and n not in latest
        for n in latest:
            n.pruned = n.meta["answer"] != best.meta["answer"] if votes else n is not best
        best.chosen = True
        return FinalText(best, best.meta.get("finish_reason", "stop"))
