"""Graded training as expert iteration (STaR, Zelikman et al. 2022; ReST-EM, Singh et al.
2023): search with the current model, keep what the grader passes, train a fresh LoRA from
the base on everything kept, hot-load it, evaluate it in one call, repeat. Plus the
label-free mode (Huang et al. 2022, "LLMs can self-improve"): no grader, the samples'
majority answer is kept when its vote share reaches a threshold.

The method, in OpenAI's shape with Steer's extras (validated by `parse_method`)::

    {"type": "reinforcement", "reinforcement": {
        "grader": <an OpenAI/Steer grader (steer.training.graders)>
                | {"type": "agreement", "threshold": 0.5, "extract": "last_number"},
        "hyperparameters": {
            # OpenAI's, for each round's supervised training (and the search's width):
            "n_epochs", "batch_size", "learning_rate_multiplier": int/float or "auto",
            "compute_multiplier": scales `samples` ("auto" = 1),
            "eval_interval", "eval_samples": "auto" only (one evaluation per round),
            "reasoning_effort": "default" only,
            # Steer's:
            "rounds": 2, "samples": 8 (per prompt), "temperature": 0.7 (0.4 label-free:
            DESIGN measured self-consistency at 0.4 above 0.8 on the default model),
            "max_tokens": 128, "keep_per_prompt": null (all passing samples, deduped) or k,
            "accumulate": true (train on every round's kept samples; false: this round's
            only, as ReST-EM does), "concurrency": 16 (search requests in flight)},
        "steering": null | a Steer steering spec for the search (strategy, options, critic,
            budget, template); default best_of_n with n=samples and the grader as critic
            (label-free: self_consistency with k=samples)}}

Each round: search (Steer's own HTTP API, `ctx.steer`, traces on), keep, train, publish the
round's adapter as a checkpoint `<final>:ckpt-round-<k>` (kind "checkpoint"; its lineage
names the model whose answers it learned, so recursion is visible), evaluate (one greedy call
per validation item on the new adapter, graded by the server with the grader's critic), and
one "metrics" event. The base is evaluated once first (round 0). The final model is the round
with the best validation accuracy (the later one on a tie; the last round with no validation
file), published again under the job's `fine_tuned_model` name (kind "final").

Exceptions: `MethodError(ValueError)` (a bad method, `param` names the field; raised before
any work), `ExpertError` (the loop could not go on: every search request failed, nothing
passed the grader), `ExpertCancelled` (the job was cancelled between or inside stages).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from steer.critics.extract import extractor
from steer.training import graders
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
from steer.training.trainer import TrainSpec

Auto = Literal["auto"]
# "auto" is the trainer's measured default; a multiplier scales it (OpenAI's meaning).
BASE_LEARNING_RATE = float(TrainSpec.model_fields["learning_rate"].default)


class MethodError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ExpertError(Exception):
    """The loop cannot go on; the message says why (the job fails with it)."""


ExpertCancelled = Cancelled  # the job was cancelled; the loop stopped cleanly


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgreementGrader(_Closed):
    """Label-free: keep the samples whose extracted answer is the majority's, when its share
    of all samples is at least `threshold`. `validation_grader` grades the validation file
    (default: the extracted answer equals `{{item.reference}}`)."""

    type: Literal["agreement"]
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    extract: Literal["last_number", "answer_line", "choice", "regex"] = "last_number"
    pattern: str | None = Field(default=None, max_length=500)
    name: str | None = None
    validation_grader: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _pattern(self) -> AgreementGrader:
        extractor(self.extract, self.pattern)  # ValueError when a regex is missing or bad
        return self


class Hyperparameters(_Closed):
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0.0, le=100.0)] | Auto = "auto"
    compute_multiplier: Annotated[float, Field(gt=0.0, le=8.0)] | Auto = "auto"
    eval_interval: Auto = "auto"
    eval_samples: Auto = "auto"
    reasoning_effort: Literal["default"] = "default"
    rounds: int = Field(default=2, ge=1, le=20)
    samples: int = Field(default=8, ge=1, le=64)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int = Field(default=128, ge=1, le=4096)
    keep_per_prompt: int | None = Field(default=None, ge=1, le=64)
    accumulate: bool = True
    concurrency: int = Field(default=16, ge=1, le=256)


class SearchSpec(_Closed):
    """A `steering` spec as a chat request takes it (the server validates its contents)."""

    strategy: str = "best_of_n"
    options: dict[str, Any] = Field(default_factory=dict)
    critic: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    template: dict[str, Any] | None = None


class ReinforcementMethod(_Closed):
    grader: dict[str, Any]
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    steering: SearchSpec | None = None


@dataclass(frozen=True)
class Config:
    """A validated method: the grader parsed, defaults resolved."""

    grader: Any  # a graders.Grader, or AgreementGrader for the label-free mode
    validation_grader: Any  # what grades the validation file
    hp: Hyperparameters
    steering: SearchSpec | None
    samples: int
    temperature: float

    @property
    def label_free(self) -> bool:
        return isinstance(self.grader, AgreementGrader)


def _parse_grader(raw: Mapping[str, Any], param: str) -> Any:
    try:
        return graders.parse_grader(dict(raw), param)
    except graders.GraderError as exc:
        raise MethodError(str(exc), exc.param) from exc


_BRANCHES = {"int", "float", "str", "bool", "none"}


def _loc(exc: ValidationError) -> str:
    """The first error's field path, without pydantic's union-branch tags
    ("constrained-int", "literal['auto']")."""
    parts = [str(p) for p in exc.errors()[0]["loc"]]
    return ".".join(p for p in parts if not ("-" in p or "[" in p or p in _BRANCHES))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = _loc(exc)
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def parse_method(method: Mapping[str, Any]) -> Config:
    """Validate a reinforcement `method` (MethodError names the bad field)."""
    base = "method.reinforcement"
    if method.get("type") != "reinforcement":
        raise MethodError("method.type must be 'reinforcement' here", "method.type")
    body = method.get("reinforcement")
    if not isinstance(body, Mapping):
        raise MethodError("method.reinforcement must be an object with a grader", base)
    try:
        parsed = ReinforcementMethod.model_validate(body)
    except ValidationError as exc:
        raise MethodError(_first_error(exc), f"{base}.{_loc(exc)}") from exc
    hp = parsed.hyperparameters
    if parsed.grader.get("type") == "agreement":
        try:
            grader: Any = AgreementGrader.model_validate(parsed.grader)
        except (ValidationError, ValueError) as exc:
            message = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
            raise MethodError(message, f"{base}.grader") from exc
        valid = _parse_grader(grader.validation_grader or _reference_grader(grader),
                              f"{base}.grader.validation_grader")
    else:
        grader = valid = _parse_grader(parsed.grader, f"{base}.grader")
    scale = 1.0 if hp.compute_multiplier == "auto" else hp.compute_multiplier
    samples = max(1, min(64, round(hp.samples * scale)))
    label_free = isinstance(grader, AgreementGrader)
    temperature = hp.temperature if hp.temperature is not None else (0.4 if label_free else 0.7)
    return Config(grader, valid, hp, parsed.steering, samples, temperature)


def _reference_grader(g: AgreementGrader) -> dict[str, Any]:
    critic: dict[str, Any] = {"name": "exact_answer", "reference": "{{item.reference}}",
                              "extract": g.extract}
    if g.pattern is not None:
        critic["pattern"] = g.pattern
    return {"type": "steer_critic", "critic": critic, "pass_threshold": 1.0}


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
                out["critic"] = graders.to_critic(cfg.grader, dict(item))
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
                   "critic": graders.to_critic(cfg.grader, dict(item))}
        return {**out, "trace": True}

    def keep(self, item: Mapping[str, Any], cands: list[Candidate],
             critic: str | None) -> tuple[list[Candidate], int]:
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
            critic = None if self.cfg.label_free else spec.get("critic", {}).get("name")
            body = {"model": model, "messages": item["messages"], "max_tokens": hp.max_tokens,
                    "temperature": self.cfg.temperature,
                    "seed": seed_for(self.ctx.job.seed, k, i), "steering": spec}
            got = await self.caller.chat(body)
            if got is None:
                stats.prompts_failed += 1
                return
            stats.search_tokens += got.tokens
            cands = answers_of(got.trace, got.content, critic)
            kept, passed = self.keep(item, [c for c in cands if c.score is not None]
                                     if critic else cands, critic)
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
            critic = graders.to_critic(grader, dict(item))
            body = {"model": model, "messages": item["messages"],
                    "max_tokens": self.cfg.hp.max_tokens, "temperature": 0.0,
                    "seed": seed_for(self.ctx.job.seed, 0, i),
                    "steering": {"strategy": "best_of_n", "options": {"n": 1, "temperature": 0.0},
                                 "critic": critic, "trace": True}}
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
        if hp.learning_rate_multiplier != "auto":
            out["learning_rate"] = BASE_LEARNING_RATE * hp.learning_rate_multiplier
        return out


async def run(ctx: Context) -> str:
    """Run expert iteration for `ctx.job`; returns the final `fine_tuned_model` name."""
    cfg = parse_method(ctx.job.method)
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
    trained_on = -1  # the pool size the last adapter was trained on
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
        if cfg.hp.accumulate and len(pool) == trained_on:
            await ctx.event(f"round {k}: no new sample; the round keeps {model}")
            stats.checkpoint = model if model != job.model else None
            loop.rounds.append(stats)
            continue
        outcome = await loop.train(k, pool, stats, prompts)
        trained_on = len(pool)
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
    final_lineage = {k: v for k, v in chosen.items() if k != "adapter_dir"} | {
        "selected_round": best.round,
        "rounds": [r.data() for r in loop.rounds]}
    name = await ctx.publish(chosen["adapter_dir"], loop.final, "final", final_lineage)
    await ctx.event(f"final model {name}: round {best.round}'s adapter"
                    + (f" (validation accuracy {best.validation_accuracy:.1%})"
                       if best.validation_accuracy is not None else ""))
    return name


def _lineage(loop: _Loop, k: int, parent: str, stats: RoundStats) -> dict[str, Any]:
    job, cfg = loop.ctx.job, loop.cfg
    spec = loop.search_spec(loop.ctx.training_lines[0]) if loop.ctx.training_lines else {}
    spec.pop("critic", None)  # per item (the grader, filled from each line)
    sources = {r.model: r.kept_new for r in [*loop.rounds, stats] if r.kept_new}
    return {
        "method": "reinforcement", "round": k, "parent": parent, "base_model": job.model,
        "training_file": job.training_file, "validation_file": job.validation_file,
        "grader": _dump(cfg.grader), "strategy": spec,
        "samples_from": sources if cfg.hp.accumulate else {parent: stats.kept_new},
        "kept_samples": stats.kept_samples, "metrics": stats.data(),
    }


def _dump(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value

