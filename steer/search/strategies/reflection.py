"""Self-Refine (Madaan et al. 2023) and Reflexion (Shinn et al. 2023).

Draft -> feedback -> revision, up to `max_iters` revisions, stopping once the critic's score
reaches `threshold`. Feedback comes from the model (`self`: a feedback prompt), from the
critic (its score and explanation, e.g. a verifier's error), or `both`. With `memory`, every
earlier reflection stays in later revision prompts (Reflexion); without, only the latest
(Self-Refine). Returns the best-scored version, not necessarily the last.

Anytime: it stops before an iteration the budget cannot pay for, and when a prompt quoting
the draft cannot fit the context even with the draft shortened.

Under a constraint the draft and every revision are answers, decoded under it; the feedback
is free text. A JSON constraint's schema gates the critic (a version that fails it is never
returned while a valid one exists), and its error is part of the next feedback.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from steer.critics.quoting import Cut
from steer.engine import Message, Prompt
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

FEEDBACK = ("Review the answer below to the question. List its concrete mistakes or gaps, "
            "briefly. If it is fully correct, say \"No issues.\"")


@register_strategy
class Reflection(Strategy):
    name = "reflection"
    default_critic = "llm_judge"

    class Options(StrategyOptions):
        max_iters: int = Field(3, ge=1, le=10)
        threshold: float | None = Field(None, ge=0.0, le=1.0)
        feedback: Literal["self", "critic", "both"] = "self"
        memory: bool = False
        temperature: float = Field(0.7, ge=0.0, le=2.0)
        feedback_tokens: int = Field(160, ge=8, le=2048)

    @property
    def opts(self) -> Reflection.Options:
        assert isinstance(self.options, Reflection.Options)
        return self.options

    def check(self) -> None:
        if self.opts.feedback in ("critic", "both") and self.critic is None:
            raise SteeringInvalid("feedback from a critic needs steering.critic",
                                  "steering.critic")

    def planned_calls(self) -> int:
        o = self.opts
        versions = 1 + o.max_iters
        critic = self.critic.planned_calls(1) if self.critic else 0
        feedback = 1 if o.feedback in ("self", "both") else 0
        return versions * (1 + critic) + o.max_iters * feedback

    def _version_calls(self) -> int:
        return 1 + (self.critic.planned_calls(1) if self.critic else 0)

    def min_calls(self) -> int:
        return self._version_calls()

    def _iteration_calls(self) -> int:
        return self._version_calls() + (1 if self.opts.feedback in ("self", "both") else 0)

    async def _score(self, ctx: Context, node: Node) -> float | None:
        if self.critic is None and ctx.gate is None:
            return None
        (score,) = await ctx.score([node])
        return score.value

    async def run(self, ctx: Context) -> Final:
        o = self.opts
        params = ctx.answer_sampling(temperature=o.temperature, logprobs=ctx.answer_logprobs)
        (draft,) = await ctx.session.generate([ctx.messages], params, role="generator")
        current = ctx.add_generations([draft], "draft", round=0)[0]
        value = await self._score(ctx, current)
        reflections: list[str] = []
        for it in range(1, o.max_iters + 1):
            if o.threshold is not None and value is not None and value >= o.threshold:
                ctx.trace.info["stopped"] = {"iteration": it - 1, "score": value}
                break
            if not ctx.affordable(1, lambda _: self._iteration_calls()):
                break
            feedback = await self._feedback(ctx, current)
            if feedback is None:
                ctx.trace.info["stopped"] = {"iteration": it - 1,
                                             "reason": "the draft does not fit the context"}
                break
            reflections.append(feedback)
            shown = reflections if o.memory else reflections[-1:]
            answer = current.text

            def build(cut: Cut, answer: str = answer, shown: list[str] = shown) -> Prompt:
                return [*ctx.messages, Message("assistant", cut(answer)), Message("user", (
                    "Feedback on your answer:\n" + "\n---\n".join(cut(f) for f in shown)
                    + "\n\nWrite an improved, complete answer to the original question."))]

            revise = await ctx.fit(build, params.max_tokens)
            if revise is None:
                ctx.trace.info["stopped"] = {"iteration": it - 1,
                                             "reason": "the draft does not fit the context"}
                break
            (gen,) = await ctx.session.generate([revise], params, role="generator")
            current = ctx.add_generations([gen], "revision", round=it, parent=current.id)[0]
            current.meta["feedback"] = feedback
            value = await self._score(ctx, current)
            ctx.note(iteration=it, score=value)
        versions = [n for n in ctx.trace.nodes if n.role in ("draft", "revision")]
        best = ctx.best or versions[-1]
        for n in versions:
            n.pruned = n is not best
        best.chosen = True
        return FinalText(best, best.meta.get("finish_reason", "stop"))

    async def _feedback(self, ctx: Context, node: Node) -> str | None:
        """The critic's and/or the model's feedback on `node`; None when the feedback
        prompt cannot fit the context even with the answer shortened."""
        o = self.opts
        parts = []
        if ctx.gate is not None and node.id in ctx.failed_gate:
            detail = node.meta.get(f"{ctx.gate.name}_detail", "")
            parts.append(f"It does not match the required JSON schema: {detail}".strip())
        if o.feedback in ("critic", "both") and self.critic is not None:
            detail = node.meta.get(f"{self.critic.name}_detail", "")
            score = node.scores.get(self.critic.name)
            parts.append(f"A checker scored it {score:.2f} of 1. {detail}".strip())
        if o.feedback in ("self", "both"):
            question = ctx.question.text

            def build(cut: Cut) -> Prompt:
                return [Message("user", f"{FEEDBACK}\n\nQuestion: {cut(question)}\n\n"
                                        f"Answer:\n{cut(node.text)}")]

            ask = await ctx.fit(build, o.feedback_tokens)
            if ask is None:
                return None
            params = ctx.sampling(temperature=0.0, max_tokens=o.feedback_tokens, logprobs=None,
                                  stop=())
            (gen,) = await ctx.session.generate([ask], params, role="feedback")
            fb = ctx.trace.add("feedback", gen.text, parent=node.id, round=node.round,
                               tokens=gen.completion_tokens)
            parts.append(fb.text.strip())
        return "\n".join(p for p in parts if p)
