"""Graded training as expert iteration (STaR, Zelikman et al. 2022; ReST-EM, Singh et al.
2023): search with the current model, keep what the grader passes, train a fresh LoRA from
the base on everything kept, hot-load it, evaluate it in one call, repeat. Plus the
label-free mode (Huang et al. 2022, "LLMs can self-improve"): no grader, the samples'
majority answer is kept when its vote share reaches a threshold.

The method's shape and defaults: `steer.training.expert_method`.

Each round: search (Steer's own HTTP API, `ctx.steer`, traces on), keep, train, publish the
round's adapter as a checkpoint `<final>:ckpt-round-<k>` (kind "checkpoint"; its lineage
names the model whose answers it learned, so recursion is visible), evaluate (one greedy call
per validation item on the new adapter, graded by the server with the grader's critic), and
one "metrics" event. The base is evaluated once first (round 0). The final model is the round
with the best validation accuracy (the later one on a tie; the last round with no validation
file), published again under the job's `fine_tuned_model` name (kind "final").

Exceptions: `MethodError(ValueError)` (expert_method: a bad method, `param` names the
field; raised before any work), `ExpertError` (the loop could not go on: every search
request failed, nothing passed the grader), `ExpertCancelled` (the job was cancelled between
or inside stages).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from steer.critics.extract import extractor
from steer.training import graders
from steer.training.expert_method import (
    AgreementGrader,
    Config,
    Hyperparameters,
    MethodError,
    ReinforcementMethod,
    SearchSpec,
    parse_method,
)
from steer.training.rounds import (
    Candidate,
    Pool,
    RoundStats,
    answers_of,
    best_round,
    keep_by_agreement,
    seed_for,
)
from steer.training.rows import to_trl_rows
from steer.training.search_http import Cancelled, SteerCaller


class ExpertError(Exception):
    """The loop cannot go on; the message says why (the job fails with it)."""


ExpertCancelled = Cancelled  # the job was cancelled; the loop stopped cleanly


# -- what the loop needs from the worker (steer.training.worker.JobContext) ------------------


class Context(Protocol):
    job: Any
    steer: Any  # httpx.AsyncClient on the Steer server
    training_lines: list[dict[str, Any]]
    validation_lines: list[dict[str, Any]]

    async def event(self, message: str, data: dict[str, Any] | None = None,
                    level: str = "info", type: str = "message") -> None: ...

    async def cancelled(self) -> bool: ...

    async def train(self, spec_kwargs: dict[str, Any], rows: list[dict[str, Any]],
                    name: str) -> Any: ...

    async def publish(self, adapter_dir: str, name: str, kind: str,
                      lineage: dict[str, Any]) -> str: ...


def final_name(job: Any) -> str:
    """OpenAI's naming: `ft:<base>:<suffix>:<job-id>` (an empty suffix stays empty)."""
    return f"ft:{job.model}:{job.suffix or ''}:{job.id}"


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class _Loop:
    ctx: Context
    cfg: Config
    caller: SteerCaller
    final: str
    rounds: list[RoundStats] = field(default_factory=list)
    lineages: dict[int, dict[str, Any]] = field(default_factory=dict)
    models: dict[int, str] = field(default_factory=dict)  # round -> its published model

    async def check(self) -> None:
        if await self.ctx.cancelled():
            raise ExpertCancelled("cancelled")

    def search_spec(self, item: Mapping[str, Any]) -> dict[str, Any]:
        cfg, spec = self.cfg, self.cfg.steering
        if spec is not None:
            out = spec.model_dump(exclude_none=True)
            if "critic" not in out and not cfg.label_free:
                out["critic"] = self.critic(cfg.grader, item)
        elif cfg.label_free:
            g = cfg.grader
            opts: dict[str, Any] = {"k": cfg.samples, "temperature": cfg.temperature,
                                    "extract": g.extract}
            if g.pattern is not None:
                opts["pattern"] = g.pattern
            out = {"strategy": "self_consistency", "options": opts}
        else:
            out = {"strategy": "best_of_n",
                   "options": {"n": cfg.samples, "temperature": cfg.temperature},
                   "critic": self.critic(cfg.grader, item)}
        return {**out, "trace": True}

    def critic(self, grader: Any, item: Mapping[str, Any]) -> dict[str, Any]:
        return graders.to_critic(grader, dict(item), base_model=self.ctx.job.model)

    async def scored(self, item: Mapping[str, Any], cands: list[Candidate]) -> list[Candidate]:
        """`cands` with a grader score each where one can be had: the search's critic's, else
        graded here (rule graders; one needing a model leaves the candidate unscored)."""
        todo = [c.text for c in cands if c.score is None]
        if not todo or self.cfg.label_free:
            return cands
        question = str(item["messages"][-1].get("content", ""))
        try:
            local = iter(await graders.grade(self.cfg.grader, dict(item), todo, question))
        except graders.GraderError:
            return cands
        return [c if c.score is not None else Candidate(c.text, next(local)) for c in cands]

    def keep(self, item: Mapping[str, Any], cands: list[Candidate]
             ) -> tuple[list[Candidate], int]:
        """(the samples kept, how many passed) for one prompt's candidates."""
        cfg = self.cfg
        if cfg.label_free:
            g = cfg.grader
            kept, _ = keep_by_agreement(cands, extractor(g.extract, g.pattern), g.threshold)
            return kept, len(kept)
        passing = [c for c in cands if c.score is not None and graders.passes(cfg.grader,
                                                                                c.score)]
        return passing, len(passing)

    async def search(self, k: int, model: str, pool: Pool, stats: RoundStats) -> None:
        lines = self.ctx.training_lines
        hp = self.cfg.hp

        async def one(i: int) -> None:
            item = lines[i]
            spec = self.search_spec(item)
            # The trace's scores are the grader's only when the search's critic is the grader.
            own = None if self.cfg.label_free else self.critic(self.cfg.grader, item)
            critic = own["name"] if own is not None and spec.get("critic") == own else None
            body = {"model": model, "messages": item["messages"], "max_tokens": hp.max_tokens,
                    "temperature": self.cfg.temperature,
                    "seed": seed_for(self.ctx.job.seed, k, i), "steering": spec,
                    "store": False}  # the loop's own searches are not traffic to learn from
            got = await self.caller.chat(body)
            if got is None:
                stats.prompts_failed += 1
                return
            stats.search_tokens += got.tokens
            cands = await self.scored(item, answers_of(got.trace, got.content, critic))
            kept, passed = self.keep(item, cands)
            stats.candidates += len(cands)
            stats.passed += passed
            stats.kept_new += pool.add(i, kept, k)

        start = time.monotonic()
        await self.caller.map(one, range(len(lines)))
        stats.prompts = len(lines)
        stats.search_s = time.monotonic() - start
        stats.kept_samples = len(pool)
        stats.prompts_with_kept = pool.prompts()
        if stats.prompts_failed == len(lines):
            raise ExpertError(f"round {k}: every search request failed "
                              f"({self.caller.last_error or 'no answer'})")

    async def evaluate(self, model: str) -> tuple[float | None, int, int]:
        """One-call accuracy on the validation lines: greedy, graded by the server with the
        validation grader's critic; (accuracy, items graded, tokens)."""
        lines = self.ctx.validation_lines
        if not lines:
            return None, 0, 0
        grader = self.cfg.validation_grader
        correct = graded = tokens = 0

        async def one(i: int) -> None:
            nonlocal correct, graded, tokens
            item = lines[i]
            critic = self.critic(grader, item)
            body = {"model": model, "messages": item["messages"],
                    "max_tokens": self.cfg.hp.max_tokens, "temperature": 0.0,
                    "seed": seed_for(self.ctx.job.seed, 0, i),
                    "steering": {"strategy": "best_of_n", "options": {"n": 1, "temperature": 0.0},
                                 "critic": critic, "trace": True}, "store": False}
            got = await self.caller.chat(body)
            if got is None:
                return
            tokens += got.tokens
            cands = answers_of(got.trace, None, critic.get("name"))
            score = cands[0].score if cands else None
            graded += 1
            correct += int(score is not None and graders.passes(grader, score))

        await self.caller.map(one, range(len(lines)))
        if not graded:
            raise ExpertError(f"evaluating {model}: every validation request failed "
                              f"({self.caller.last_error or 'no answer'})")
        return correct / graded, graded, tokens

    async def train(self, k: int, pool: Pool, stats: RoundStats, prompts: list[Any]) -> Any:
        lines = pool.sft_lines(prompts)
        rows = to_trl_rows("sft", lines)
        start = time.monotonic()
        outcome = await self.ctx.train(self.train_kwargs(k), rows, f"round-{k}")
        stats.train_s = time.monotonic() - start
        stats.train_loss = getattr(outcome, "train_loss", None)
        stats.trained_tokens = getattr(outcome, "trained_tokens", None)
        return outcome

    def train_kwargs(self, k: int) -> dict[str, Any]:
        hp = self.cfg.hp
        out: dict[str, Any] = {"method": "sft", "seed": self.ctx.job.seed + k}
        if hp.n_epochs != "auto":
            out["n_epochs"] = hp.n_epochs
        if hp.batch_size != "auto":
            out["batch_size"] = hp.batch_size
        if hp.learning_rate_multiplier != "auto":  # JobContext scales the trainer's default
            out["learning_rate_multiplier"] = hp.learning_rate_multiplier
        return out


async def run(ctx: Context) -> str:
    """Run expert iteration for `ctx.job`; returns the final `fine_tuned_model` name."""
    cfg = parse_method(ctx.job.method)
    if not ctx.training_lines:
        raise ExpertError("the training file has no lines")
    try:
        if not cfg.label_free:
            graders.check_items(cfg.grader, ctx.training_lines, "training_file")
        graders.check_items(cfg.validation_grader, ctx.validation_lines, "validation_file")
    except graders.GraderError as exc:
        raise ExpertError(f"{exc.param}: {exc}") from exc
    caller = SteerCaller(ctx.steer, cfg.hp.concurrency, ctx.cancelled, ctx.event)
    loop = _Loop(ctx, cfg, caller, final_name(ctx.job))
    return await _run(loop)


async def _run(loop: _Loop) -> str:
    ctx, cfg = loop.ctx, loop.cfg
    job = ctx.job
    mode = "agreement (label-free)" if cfg.label_free else f"grader {cfg.grader.type}"
    await ctx.event(f"expert iteration: {cfg.hp.rounds} rounds, {len(ctx.training_lines)} "
                    f"prompts x {cfg.samples} samples, {mode}")
    await loop.check()
    start = time.monotonic()
    acc, graded, tokens = await loop.evaluate(job.model)
    if acc is not None:
        await ctx.event(f"round 0 (base {job.model}): validation accuracy {acc:.1%}",
                        {"round": 0, "model": job.model, "validation_accuracy": acc,
                         "validation_items": graded, "eval_tokens": tokens,
                         "eval_s": time.monotonic() - start}, type="metrics")
    pool = Pool(cfg.hp.keep_per_prompt)
    prompts = [line["messages"] for line in ctx.training_lines]
    model = job.model
    for k in range(1, cfg.hp.rounds + 1):
        await loop.check()
        stats = RoundStats(round=k, model=model)
        round_pool = pool if cfg.hp.accumulate else Pool(cfg.hp.keep_per_prompt)
        await loop.search(k, model, round_pool, stats)
        pool = round_pool
        await ctx.event(f"round {k}: searched {stats.prompts} prompts with {model}, "
                        f"{stats.passed} of {stats.candidates} samples passed, "
                        f"{stats.kept_samples} kept", stats.data())
        await loop.check()
        if len(pool) == 0:
            await ctx.event(f"round {k}: no sample passed; nothing to train on this round",
                            level="warn")
            loop.rounds.append(stats)
            continue
        if cfg.hp.accumulate and stats.kept_new == 0 and loop.models:
            await ctx.event(f"round {k}: no new sample; the round keeps {model}")
            stats.checkpoint = model if model != job.model else None
            loop.rounds.append(stats)
            continue
        outcome = await loop.train(k, pool, stats, prompts)
        await loop.check()
        lineage = _lineage(loop, k, model, stats)
        name = await ctx.publish(outcome.adapter_dir, f"{loop.final}:ckpt-round-{k}",
                                 "checkpoint", lineage)
        stats.checkpoint = name
        loop.lineages[k] = lineage | {"adapter_dir": outcome.adapter_dir}
        loop.models[k] = name
        await loop.check()
        start = time.monotonic()
        stats.validation_accuracy, stats.validation_items, stats.eval_tokens = \
            await loop.evaluate(name)
        stats.eval_s = time.monotonic() - start
        loop.rounds.append(stats)
        acc_text = (f", validation accuracy {stats.validation_accuracy:.1%}"
                    if stats.validation_accuracy is not None else "")
        await ctx.event(f"round {k}: {name}{acc_text}", stats.data(), type="metrics")
        model = name
    trained = [r for r in loop.rounds if r.round in loop.models]
    if not trained:
        raise ExpertError("no sample passed the grader in any round: nothing to train on")
    best = best_round(trained)
    chosen = loop.lineages[best.round]
    # the checkpoint's lineage was written before its evaluation: the final one has it all
    final_lineage = {k: v for k, v in chosen.items() if k != "adapter_dir"} | {
        "selected_round": best.round, "metrics": best.data(),
        "rounds": [r.data() for r in loop.rounds]}
    name = await ctx.publish(chosen["adapter_dir"], loop.final, "final", final_lineage)
    await ctx.event(f"final model {name}: round {best.round}'s adapter"
                    + (f" (validation accuracy {best.validation_accuracy:.1%})"
                       if best.validation_accuracy is not None else ""))
    return name


def _lineage(loop: _Loop, k: int, parent: str, stats: RoundStats) -> dict[str, Any]:
    cfg = loop.cfg
    spec = loop.search_spec(loop.ctx.training_lines[0]) if loop.ctx.training_lines else {}
    spec.pop("critic", None)  # per item (the grader, filled from each line)
    sources = {r.model: r.kept_new for r in [*loop.rounds, stats] if r.kept_new}
    # JobContext.publish merges this over the job's own lineage (base, data files, sources).
    return {
        "method": "reinforcement", "round": k, "parent": parent,
        "grader": _dump(cfg.grader), "strategy": spec,
        "samples_from": sources if cfg.hp.accumulate else {parent: stats.kept_new},
        "kept_samples": stats.kept_samples, "metrics": stats.data(),
    }


def _dump(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value


__all__ = ["AgreementGrader", "Config", "ExpertCancelled", "ExpertError",
           "Hyperparameters", "MethodError", "ReinforcementMethod", "SearchSpec", "final_name",
           "parse_method", "run"]
