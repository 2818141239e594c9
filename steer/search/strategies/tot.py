"""Tree-of-Thoughts (Yao et al. 2023), following princeton-nlp/tree-of-thought-llm.

BFS keeps a beam of `breadth` states per level for `depth` levels; DFS goes deep first,
prunes children valued under `threshold`, backtracks, and stops at the first final state
or after `max_states`. Each level's expansions are one batch of engine calls, and each
level's evaluations another. States are valued by the paper's value prompt (sure/likely/
impossible -> 20/1/0.001, `n_evaluate` samples summed), by votes, or by any critic.

Anytime: a level expands only the states the budget can pay for and values only the children
it can pay for (the rest score 0); once the budget is cut the search answers from what it
has. Prompts quote the partial solution; a long one is shortened (head and tail) to fit the
context, and a state whose prompt cannot fit at all is not expanded (or scores 0).

Under a constraint, thoughts and their values are free text (steps are not the requested
format); the answer is always one more generation, decoded under the constraint and written
from the best state, with one call kept back for it from the start.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import Field, model_validator

from steer.critics import Question
from steer.critics.quoting import Cut
from steer.engine import Message, Prompt
from steer.search.base import (
    Context,
    Final,
    FinalPrompt,
    FinalText,
    Strategy,
    StrategyOptions,
    register_strategy,
)
from steer.search.session import SteeringInvalid
from steer.search.tasks import TASKS, Task
from steer.search.trace import Node


@register_strategy
class TreeOfThoughts(Strategy):
    name = "tot"
    answer_is_generation = False  # a state is a chain of steps from several calls

    class Options(StrategyOptions):
        search: Literal["bfs", "dfs"] = "bfs"
        breadth: int = Field(5, ge=1, le=16)
        depth: int = Field(3, ge=1, le=8)
        generator: Literal["propose", "sample"] = "propose"
        n_generate: int | None = Field(None, ge=1, le=16)
        evaluator: Literal["value", "vote", "critic"] = "value"
        n_evaluate: int = Field(3, ge=1, le=10)
        selection: Literal["greedy", "sample"] = "greedy"
        task: str = Field("steps", max_length=64)
        temperature: float = Field(0.7, ge=0.0, le=2.0)
        max_proposals: int = Field(8, ge=1, le=16)
        threshold: float = Field(1.0, ge=0.0, le=1000.0,
                                 description="dfs: prune states valued below")
        max_states: int = Field(64, ge=1, le=1024, description="dfs: states visited at most")
        step_tokens: int = Field(160, ge=8, le=2048)
        value_tokens: int = Field(64, ge=1, le=1024)
        seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)

        @model_validator(mode="after")
        def _known_task(self) -> TreeOfThoughts.Options:
            if self.task not in TASKS:
                raise ValueError(f"unknown task; tasks: {', '.join(sorted(TASKS))}")
            return self

    @property
    def opts(self) -> TreeOfThoughts.Options:
        assert isinstance(self.options, TreeOfThoughts.Options)
        return self.options

    def check(self) -> None:
        if self.opts.evaluator == "critic" and self.critic is None:
            raise SteeringInvalid("evaluator 'critic' needs steering.critic", "steering.critic")

    @property
    def n_generate(self) -> int:
        return self.opts.n_generate or (1 if self.opts.generator == "propose" else 3)

    def levels(self, task: Task) -> int:
        return self.opts.depth + (1 if task.extra_final_step else 0)

    def planned_calls(self) -> int:
        o = self.opts
        task = TASKS[o.task]()
        per_state = o.max_proposals if o.generator == "propose" else self.n_generate
        if o.evaluator == "value":
            evals = per_state * o.n_evaluate
        elif o.evaluator == "vote":
            evals = o.n_evaluate
        else:
            evals = self.critic.planned_calls(per_state) if self.critic else 0
        per_expansion = self.n_generate + evals
        if o.search == "dfs":
            return o.max_states * per_expansion
        return self.levels(task) * o.breadth * per_expansion

    def min_calls(self) -> int:
        return self.n_generate  # the root's expansion: a search that takes one step

    async def _fitted(self, ctx: Context, make: Callable[[Question, str], list[Message]],
                state: str, max_tokens: int | None) -> Prompt | None:
        """`make(question, state)` with the question and the partial solution it quotes
        shortened to fit the context (None: not even shortened)."""
        text = ctx.question.text

        def build(cut: Cut) -> Prompt:
            return make(Question((Message("user", cut(text)),)), cut(state))

        return await ctx.fit(build, max_tokens)

    # -- one level: expand, evaluate -----------------------------------------------------------

    async def expand(self, ctx: Context, task: Task, states: Sequence[Node], level: int,
                     ) -> list[Node]:
        """All of `states`' children, from one batched engine call."""
        o = self.opts
        make = task.propose_prompt if o.generator == "propose" else task.sample_prompt
        fitted = [(s, await self._fitted(ctx, make, s.text, o.step_tokens)) for s in states]
        for s, p in fitted:
            if p is None:
                s.meta["not_expanded"] = "its prompt does not fit the context"
        ready = [(s, p) for s, p in fitted if p is not None]
        ready = ready[: ctx.affordable(len(ready), lambda k: k * self.n_generate)]
        if not ready:
            return []
        states = [s for s, _ in ready]
        prompts = [p for _, p in ready if p is not None]
        params = ctx.sampling(n=self.n_generate, temperature=o.temperature,
                              max_tokens=o.step_tokens, logprobs=None, stop=())
        gens = await ctx.session.generate(prompts, params, role="generator")
        children: list[Node] = []
        for g in gens:
            parent = states[g.prompt_index]
            steps = task.parse_proposals(g.text)[: o.max_proposals if o.generator == "propose"
                                                   else 1]
            if not steps:  # kept in the trace, so a search that found nothing can be read
                ctx.trace.add("unparsed", g.text, parent=parent.id, round=level, pruned=True,
                              tokens=g.completion_tokens, meta={"depth": level + 1})
            for step in steps:
                children.append(ctx.trace.add(
                    "thought", parent.text + step + "\n", parent=parent.id, round=level,
                    tokens=g.completion_tokens, ended_s=round(ctx.session.elapsed(), 4),
                    meta={"step": step, "depth": level + 1},
                ))
        return children

    async def evaluate(self, ctx: Context, task: Task, nodes: Sequence[Node],
                       cache: dict[str, float]) -> None:
        """Score every node in one batch; duplicates within a level are worth 0 (paper)."""
        o = self.opts
        if not nodes:
            return
        if o.evaluator == "critic":
            critic = self.critic
            scored = list(nodes)
            if critic is not None:
                scored = scored[: ctx.affordable(len(scored), critic.planned_calls)]
                await ctx.score(scored, gated=False)  # thoughts, not answers
            for n in nodes:
                n.scores["value"] = n.scores.get(critic.name, 0.0) if critic else 0.0
            return
        if o.evaluator == "vote":
            await self._vote(ctx, task, nodes)
            return
        seen: set[str] = set()
        todo: list[Node] = []
        for n in nodes:
            if n.text in seen:
                n.scores["value"] = 0.0
                n.meta["duplicate"] = True
            elif n.text in cache:
                n.scores["value"] = cache[n.text]
            else:
                todo.append(n)
            seen.add(n.text)
        ready: list[tuple[Node, Prompt]] = []
        for n in todo:
            prompt = await self._fitted(ctx, task.value_prompt, n.text, o.value_tokens)
            if prompt is None:
                n.scores["value"] = 0.0
                n.meta["unvalued"] = "its value prompt does not fit the context"
            else:
                ready.append((n, prompt))
        affordable = ctx.affordable(len(ready), lambda k: k * o.n_evaluate)
        for n, _ in ready[affordable:]:
            n.scores["value"] = 0.0
            n.meta["unvalued"] = "the budget ran out"
        todo = [n for n, _ in ready[:affordable]]
        if todo:
            params = ctx.sampling(n=o.n_evaluate, temperature=o.temperature,
                                  max_tokens=o.value_tokens, logprobs=None, stop=())
            prompts = [p for _, p in ready[:affordable]]
            gens = await ctx.session.generate(prompts, params, role="critic")
            outputs: list[list[str]] = [[] for _ in todo]
            for g in gens:
                outputs[g.prompt_index].append(g.text)
            for n, outs in zip(todo, outputs, strict=True):
                value = task.parse_value(n.text, outs)
                cache[n.text] = value
                n.scores["value"] = value
                n.meta["value_outputs"] = outs
        for n in nodes:
            ctx.offer(n)

    async def _vote(self, ctx: Context, task: Task, nodes: Sequence[Node]) -> None:
        o = self.opts
        text = ctx.question.text

        def build(cut: Cut) -> Prompt:
            return task.vote_prompt(Question((Message("user", cut(text)),)),
                                    [cut(n.text) for n in nodes])

        prompt = await ctx.fit(build, o.value_tokens * 2)
        samples = ctx.affordable(o.n_evaluate, lambda k: k) if prompt is not None else 0
        gens = []
        if prompt is not None and samples:
            params = ctx.sampling(n=samples, temperature=o.temperature,
                                  max_tokens=o.value_tokens * 2, logprobs=None, stop=())
            gens = await ctx.session.generate([prompt], params, role="critic")
        votes = [0] * len(nodes)
        for g in gens:
            choice = task.parse_vote(g.text, len(nodes))
            if choice is not None:
                votes[choice] += 1
        for n, v in zip(nodes, votes, strict=True):
            n.scores["value"] = float(v)
            ctx.offer(n)

    def dead(self, node: Node) -> bool:
        """A state not worth expanding whatever the beam's room: one a critic scored 0 (for a
        verifier such as `game24`: a state that breaks the rules). The value and vote
        evaluators keep the paper's rule: the best `breadth`, whatever their values."""
        return self.opts.evaluator == "critic" and node.scores.get("value", 0.0) <= 0.0

    def select(self, nodes: Sequence[Node], rng: random.Random) -> list[Node]:
        o = self.opts
        alive = [n for n in nodes if not self.dead(n)]
        values = [n.scores.get("value", 0.0) for n in alive]
        if o.selection == "sample" and sum(values) > 0:
            # The paper samples with replacement in proportion to value.
            picked = rng.choices(range(len(alive)), weights=values, k=o.breadth)
            keep = [alive[i] for i in dict.fromkeys(picked)]
        else:
            order = sorted(range(len(alive)), key=lambda i: values[i], reverse=True)
            keep = [alive[i] for i in order[: o.breadth]]
        for n in nodes:
            n.pruned = n not in keep
        return keep

    # -- search ------------------------------------------------------------------------------

    async def run(self, ctx: Context) -> Final:
        o = self.opts
        task = TASKS[o.task]()
        root = ctx.trace.add("root", "", meta={"depth": 0})
        cache: dict[str, float] = {}
        rng = random.Random(o.seed)
        if ctx.constraint is not None:
            ctx.reserved_calls = 1  # the constrained answer, written after the search
        if o.search == "bfs":
            states = await self._bfs(ctx, task, root, cache, rng)
        else:
            states = await self._dfs(ctx, task, root, cache)
        return await self._finish(ctx, task, states)

    async def _bfs(self, ctx: Context, task: Task, root: Node, cache: dict[str, float],
                   rng: random.Random) -> list[Node]:
        states = [root]
        for level in range(self.levels(task)):
            open_ = [s for s in states if not task.is_final(s.text)]
            done = [s for s in states if task.is_final(s.text)]
            if not open_:
                break
            children = await self.expand(ctx, task, open_, level)
            await self.evaluate(ctx, task, children, cache)
            kept = self.select(done + children, rng)
            ctx.note(level=level, expanded=len(open_), generated=len(children),
                     kept=[n.id for n in kept],
                     values=[round(n.scores.get("value", 0.0), 3) for n in kept])
            if not kept:  # nothing new worth keeping: answer from the last level's states
                break
            states = kept
            if ctx.budget_cut is not None:
                break
        return states

    async def _dfs(self, ctx: Context, task: Task, root: Node, cache: dict[str, float],
                   ) -> list[Node]:
        o = self.opts
        visited = 0
        finals: list[Node] = []
        explored: list[Node] = []

        async def visit(node: Node, level: int) -> bool:
            nonlocal visited
            if task.is_final(node.text):
                finals.append(node)
                return True
            if (level >= self.levels(task) or visited >= o.max_states
                    or ctx.budget_cut is not None):
                return False
            visited += 1
            children = await self.expand(ctx, task, [node], level)
            await self.evaluate(ctx, task, children, cache)
            explored.extend(children)
            ranked = sorted(children, key=lambda n: n.scores.get("value", 0.0), reverse=True)
            ctx.note(level=level, node=node.id, generated=len(children), visited=visited)
            for child in ranked:
                if child.scores.get("value", 0.0) < o.threshold:
                    child.pruned = True
                    continue
                if await visit(child, level + 1):
                    return True
                child.meta["backtracked"] = True
            return False

        await visit(root, 0)
        ctx.trace.info["visited"] = visited
        return finals or sorted(explored, key=lambda n: n.scores.get("value", 0.0),
                                reverse=True)[:1]

    async def _finish(self, ctx: Context, task: Task, states: Sequence[Node]) -> Final:
        finals = [s for s in states if task.is_final(s.text)]
        pool = finals or [s for s in states if s.role != "root"]
        if not pool:
            # Not one usable step: answer the question directly, as without a search.
            ctx.trace.info["fallback"] = "no usable step; answered directly"
            return FinalPrompt(ctx.messages, ctx.params)
        best = max(pool, key=lambda n: n.scores.get("value", 0.0))
        best.chosen = True
        if ctx.constraint is not None:
            return await self._constrained_answer(ctx, best)
        if finals or task.conclude_prompt(ctx.question, best.text) is None:
            return FinalText(best)
        if not ctx.affordable(1, lambda k: k):
            return FinalText(best)  # no call left to write the answer: the best steps

        def build(cut: Cut) -> Prompt:
            ask = task.conclude_prompt(Question((Message("user", cut(ctx.question.text)),)),
                                       cut(best.text))
            assert ask is not None
            return (*ctx.messages[:-1], ask)

        # No state reached an answer: one last generation writes it from the best steps.
        prompt = await ctx.fit(build, ctx.params.max_tokens)
        if prompt is None or isinstance(prompt, str):
            return FinalText(best)
        return FinalPrompt(tuple(prompt), ctx.params, parent=best.id)

    async def _constrained_answer(self, ctx: Context, best: Node) -> Final:
        """Under a constraint the answer is one more generation, decoded under it, written
        from the best state (a final one too: a state is steps, not the requested format)."""
        ctx.reserved_calls = 0
        if not ctx.affordable(1, lambda k: k):
            raise ctx.session.budget.exhausted("max_model_calls", (
                f"{ctx.session.model_calls} used, {ctx.session.budget.max_model_calls} "
                "allowed: no call left to write the constrained answer"))

        def build(cut: Cut) -> Prompt:
            return (*ctx.messages[:-1], Message("user", (
                f"{cut(ctx.question.text)}\n\nUse these steps:\n{cut(best.text).strip()}"
                "\n\nGive the final answer.")))

        prompt = await ctx.fit(build, ctx.params.max_tokens)
        if prompt is None or isinstance(prompt, str):
            ctx.trace.info["fallback"] = "the best steps do not fit: answered directly"
            return FinalPrompt(ctx.messages, ctx.params)
        return FinalPrompt(tuple(prompt), ctx.params, parent=best.id)
