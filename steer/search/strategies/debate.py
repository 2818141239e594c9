"""Multi-agent debate (Du et al. 2023): agents answer, then for each further round every
agent reads the others' latest answers and updates its own.

A round is one batched engine step even when agents use different adapters (their calls are
submitted together). Stops early once all agents' extracted answers agree. The final answer
is the majority (answer extraction as in self-consistency), the critic's pick (`judge`), or
the last round's consensus (falling back to the majority).

Anytime: the first round seats as many agents as the budget allows (with room left for the
judge), and debate stops before a round that does not fit. Later rounds quote the other
agents' answers; quotes are shortened to fit the context, and when even that cannot fit,
the debate ends with what it has.

Under a constraint every agent's answer, in every round, is decoded under it: any round
can be the last (consensus, budget), and the returned answer is one of them. Summaries are
free text. Votes count the constrained output itself unless `extract` is set; under a JSON
constraint an answer that fails the schema gets no vote (and never wins the judge).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from steer.critics.patterns import PatternStr
from steer.critics.quoting import Cut
from steer.engine import Generation, Message, Prompt
from steer.search.base import (
    Context,
    Final,
    FinalText,
    Strategy,
    StrategyOptions,
    register_strategy,
)
from steer.search.constrained import answer_extractor
from steer.search.session import SteeringInvalid
from steer.search.trace import Node


class Agent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    persona: str | None = Field(None, max_length=2000)
    temperature: float = Field(0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    adapter: str | None = Field(None, min_length=1, max_length=256)


MAX_AGENTS = 16
# Bounded in the schema, so a huge count is refused before a single Agent is built.
AgentCount = Annotated[int, Field(ge=1, le=MAX_AGENTS)]
AgentList = Annotated[list[Agent], Field(min_length=1, max_length=MAX_AGENTS)]
UPDATE = ("These are the solutions to the problem from other agents:\n{body}\n\n"
          "Using their reasoning as additional advice, can you give an updated answer? "
          "Examine your solution and theirs step by step, and end with your final answer.")


@register_strategy
class Debate(Strategy):
    name = "debate"

    class Options(StrategyOptions):
        agents: AgentCount | AgentList = 3
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
        if self.opts.aggregate == "judge" and self.critic is None:
            raise SteeringInvalid("aggregate 'judge' needs steering.critic", "steering.critic")

    def _judge_calls(self, n: int) -> int:
        if self.opts.aggregate != "judge" or self.critic is None:
            return 0
        return self.critic.planned_calls(n)

    def planned_calls(self) -> int:
        n, r = len(self.agents), self.opts.rounds
        summaries = (r - 1) * n if self.opts.summarize else 0
        judge = self.critic.planned_calls(n) if self.critic else 0
        return n * r + summaries + judge

    def min_calls(self) -> int:
        return 1 + self._judge_calls(1)

    def _round_calls(self, rnd: int) -> Callable[[int], int]:
        """What round `rnd` costs with k agents, the final judge's calls included."""
        per_agent = 2 if rnd > 0 and self.opts.summarize else 1
        return lambda k: k * per_agent + self._judge_calls(k)

    async def run(self, ctx: Context) -> Final:
        o = self.opts
        agents = self.agents
        seated = ctx.affordable(len(agents), self._round_calls(0))
        if seated == 0:
            raise ctx.session.budget.exhausted("max_model_calls", (
                f"{ctx.session.model_calls} used, {ctx.session.budget.max_model_calls} "
                "allowed: not one agent fits"))
        agents = agents[:seated]
        extract = answer_extractor(ctx.constraint, o.extract, o.pattern,
                                   chosen="extract" in o.model_fields_set)
        marks = {"constrained": True} if ctx.constraint is not None else {}
        latest: list[Node] = []
        for rnd in range(o.rounds):
            prompts: list[Prompt]
            if rnd == 0:
                prompts = [self._base(ctx, agent) for agent in agents]
            elif self._round_calls(rnd)(len(agents)) > ctx.session.calls_left:
                ctx.cut("max_model_calls", (
                    f"{ctx.session.model_calls} used, {ctx.session.budget.max_model_calls} "
                    f"allowed; stopped before round {rnd + 1} of {o.rounds}"))
                break
            else:
                updates = await self._updates(ctx, agents, latest)
                if updates is None:
                    ctx.trace.info["stopped"] = (f"round {rnd + 1}: the other agents' "
                                                 "answers do not fit the context")
                    break
                prompts = updates
            gens = await self._round(ctx, prompts, agents)
            latest = [
                ctx.trace.add(f"agent-{i}", g.text, round=rnd, tokens=g.completion_tokens,
                              parent=latest[i].id if latest else None,
                              ended_s=round(ctx.session.elapsed(), 4),
                              meta={"answer": extract(g.text), "finish_reason": g.finish_reason,
                                    **marks})
                for i, g in enumerate(gens)
            ]
            if ctx.gate is not None:
                await ctx.score(latest, ctx.gate)
                for n in latest:  # an answer that fails the requested schema gets no vote
                    if n.id in ctx.failed_gate:
                        n.meta["answer"] = None
            answers = [n.meta["answer"] for n in latest]
            ctx.note(round=rnd, answers=answers)
            if len(agents) > 1 and answers[0] is not None and len(set(answers)) == 1:
                ctx.trace.info["consensus_round"] = rnd
                break
        return await self._aggregate(ctx, latest)

    def adapter_names(self) -> list[str]:
        return [a.adapter for a in self.agents if a.adapter]

    @staticmethod
    def _base(ctx: Context, agent: Agent) -> list[Message]:
        """The client's conversation, under the agent's persona if it has one."""
        if not agent.persona:
            return list(ctx.messages)
        return [Message("system", agent.persona), *[m for m in ctx.messages
                                                    if m.role != "system"]]

    async def _updates(self, ctx: Context, agents: list[Agent], latest: list[Node],
                       ) -> list[Prompt] | None:
        """Every agent's next prompt (its answer, then the others'), quotes fitted to the
        context; None when one cannot fit at all. Summaries, if any, are one batch."""
        quotes = await asyncio.gather(*(self._others(ctx, latest, i)
                                        for i in range(len(agents))))
        prompts: list[Prompt] = []
        for i, agent in enumerate(agents):
            base = self._base(ctx, agent)

            def build(cut: Cut, base: list[Message] = base, i: int = i) -> Prompt:
                body = "\n\n".join(f"One agent's solution: {cut(t)}" for t in quotes[i])
                return [*base, Message("assistant", cut(latest[i].text)),
                        Message("user", UPDATE.format(body=body))]

            prompt = await ctx.fit(build, ctx.params.max_tokens)
            if prompt is None:
                return None
            prompts.append(prompt)
        return prompts

    async def _round(self, ctx: Context, prompts: list[Prompt], agents: list[Agent],
                     ) -> list[Generation]:
        """One engine step: all agents' calls submitted together, grouped per adapter and
        temperature (one batched call per group)."""
        groups: dict[tuple[str, float], list[int]] = {}
        for i, agent in enumerate(agents):
            groups.setdefault((agent.adapter or "", agent.temperature), []).append(i)

        async def call(members: list[int]) -> list[Generation]:
            agent = agents[members[0]]
            params = ctx.answer_sampling(temperature=agent.temperature,
                                         logprobs=ctx.answer_logprobs)
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

    async def _others(self, ctx: Context, latest: list[Node], me: int) -> list[str]:
        """What agent `me` is shown of the others: their answers, or a summary of them."""
        others = [n.text for j, n in enumerate(latest) if j != me]
        if not self.opts.summarize:
            return others
        key = ("summary", latest[0].round, me)
        if key not in ctx.cache:
            question = ctx.question.text

            def build(cut: Cut) -> Prompt:
                joined = "\n---\n".join(cut(t) for t in others)
                return [Message("user", "Summarize these answers to the question "
                                f"\"{cut(question)}\", keeping each one's final answer "
                                f"and key reasoning:\n{joined}")]

            ask = await ctx.fit(build, self.opts.summary_tokens)
            if ask is None:  # too long to summarize: quote them (fitted) instead
                return others
            params = ctx.sampling(temperature=0.0, max_tokens=self.opts.summary_tokens,
                                  logprobs=None, stop=())
            (g,) = await ctx.session.generate([ask], params, role="summary")
            ctx.cache[key] = g.text
        return [str(ctx.cache[key])]

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
