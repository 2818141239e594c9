"""`JobContext`: what a running job may do, for the worker's own supervised/DPO path and for
the expert-iteration loop (`steer.training.expert`) alike. Re-exported by `worker.py`.

- `event(message, data, level, type)`: append a job event (what `/events` lists).
- `cancelled()`: the job was cancelled (or is no longer this worker's).
- `train(spec_kwargs, rows, name)`: write the TRL rows, run the trainer subprocess with the
  worker's thread limit, stream its steps into "metrics" events; a `TrainOutcome`, or
  `TrainerFailed` / `TrainerStopped` (cancelled). `spec_kwargs` are `TrainSpec` fields,
  plus OpenAI's `learning_rate_multiplier` (times the trainer's default learning rate) and
  `lora_rank` (TrainSpec's `lora_r`).
- `publish(adapter_dir, name, kind, lineage)`: record a `TrainedAdapter` (lineage merged
  over the job's own: parent, data files and their sources, method) and wait until the
  server lists it in /v1/models; `PublishFailed` if the server refused it (the reason it
  gave) or never listed it.
- `steer` (httpx client on the server), `base_model_dir`, `training_lines`,
  `validation_lines`, `job`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from steer.store import adapters as adapter_store
from steer.store import jobs as job_store
from steer.store.files import StoredFile
from steer.training.trainer import TrainSpec
from steer.training.trainer_process import TrainerFailed, run_trainer

if TYPE_CHECKING:
    from steer.training.worker import Worker

# OpenAI's metric names for what the trainer reports
_STEP_METRICS = {"mean_token_accuracy": "train_mean_token_accuracy"}
_EVAL_METRICS = {"mean_token_accuracy": "valid_mean_token_accuracy"}


class JobCancelled(Exception):
    """The job was cancelled (or taken from this worker) while it ran."""


class PublishFailed(Exception):
    """The trained adapter could not be served: the server refused it or never listed it."""


@dataclass
class TrainOutcome:
    adapter_dir: str
    train_loss: float | None
    trained_tokens: int | None
    seconds: float | None
    steps: int | None
    hyperparameters: dict[str, Any]
    last_step: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        out = {"train_loss": self.train_loss, "trained_tokens": self.trained_tokens,
               "steps": self.steps, "train_seconds": self.seconds, **self.last_eval}
        return {k: v for k, v in out.items() if v is not None}


class JobContext:
    def __init__(self, worker: Worker, job: job_store.Job, training: StoredFile,
                 validation: StoredFile | None, training_lines: list[dict[str, Any]],
                 validation_lines: list[dict[str, Any]]) -> None:
        self.worker = worker
        self.job = job
        self.training = training
        self.validation = validation
        self.training_lines = training_lines
        self.validation_lines = validation_lines
        self.steer: httpx.AsyncClient = worker.steer
        self.base_model_dir: str = worker.config.base_model_dir
        self.job_dir = worker.config.adapters_dir / "jobs" / job.id
        self.trained_tokens = 0

    async def event(self, message: str, data: dict[str, Any] | None = None,
                    level: str = "info", type: str = "message") -> None:
        await job_store.add_event(self.worker.db, self.job.id, message, level=level,
                                  type=type, data=data)

    async def cancelled(self) -> bool:
        job = await job_store.get_job(self.worker.db, self.job.id)
        return job.status != "running" or job.worker != self.worker.config.name

    async def train(self, spec_kwargs: dict[str, Any], rows: list[dict[str, Any]], name: str,
                    eval_rows: list[dict[str, Any]] | None = None) -> TrainOutcome:
        if await self.cancelled():
            raise JobCancelled("the job was cancelled")
        self.job_dir.mkdir(parents=True, exist_ok=True)
        train_path = self.job_dir / f"{name}.train.jsonl"
        _write_rows(train_path, rows)
        eval_path = None
        if eval_rows:
            eval_path = self.job_dir / f"{name}.eval.jsonl"
            _write_rows(eval_path, eval_rows)
        spec = self._spec(spec_kwargs, name, train_path, eval_path)
        spec_path = self.job_dir / f"{name}.spec.json"
        spec_path.write_text(spec.model_dump_json(indent=1), encoding="utf-8")
        await self.event(f"Training {name}: {spec.method} on {len(rows)} rows, "
                         f"{spec.n_epochs} epoch(s), batch {spec.batch_size}, lr "
                         f"{spec.learning_rate:g}, LoRA rank {spec.lora_r}",
                         data={"name": name, "rows": len(rows)})
        last: dict[str, dict[str, Any]] = {"step": {}, "eval": {}}

        async def on_event(event: dict[str, Any]) -> None:
            kind = event.get("event")
            if kind == "step":
                last["step"] = data = _metrics(event, "train_loss", _STEP_METRICS)
                await self.event(f"Step {event.get('step')}/{event.get('total_steps')}: "
                                 f"training loss={_num(event.get('loss'))}", data=data,
                                 type="metrics")
            elif kind == "eval":
                last["eval"] = data = _metrics(event, "valid_loss", _EVAL_METRICS)
                await self.event(f"Step {event.get('step')}: validation loss="
                                 f"{_num(event.get('loss'))}", data=data, type="metrics")
            elif kind == "checkpoint":
                await self.event(f"Checkpoint at step {event.get('step')}", data=event)

        done = await run_trainer(spec_path, on_event=on_event, should_stop=self.cancelled,
                                 threads=spec.threads, command=self.worker.config.trainer_command,
                                 poll_s=self.worker.config.poll_s)
        tokens = done.get("trained_tokens")
        self.trained_tokens += int(tokens or 0)
        hp = {"n_epochs": spec.n_epochs, "batch_size": spec.batch_size,
              "learning_rate": spec.learning_rate, "lora_rank": spec.lora_r,
              "lora_alpha": spec.lora_alpha, "target_modules": spec.target_modules}
        if spec.method == "dpo":
            hp["beta"] = spec.beta
        return TrainOutcome(adapter_dir=str(done.get("adapter") or spec.out_dir),
                            train_loss=done.get("train_loss"), trained_tokens=tokens,
                            seconds=done.get("seconds"), steps=done.get("steps"),
                            hyperparameters=hp, last_step=last["step"],
                            last_eval={k: v for k, v in last["eval"].items() if k != "step"})

    def _spec(self, kwargs: dict[str, Any], name: str, train_path: Path,
              eval_path: Path | None) -> TrainSpec:
        fields = dict(kwargs)
        multiplier = fields.pop("learning_rate_multiplier", None)
        if multiplier is not None:
            fields["learning_rate"] = TrainSpec.model_fields["learning_rate"].default * multiplier
        if "lora_rank" in fields:
            fields["lora_r"] = fields.pop("lora_rank")
        max_rank = self.worker.config.max_lora_rank
        fields.setdefault("lora_r", min(TrainSpec.model_fields["lora_r"].default, max_rank))
        fields.update(base_model_dir=self.base_model_dir, train_path=train_path,
                      eval_path=eval_path, out_dir=self.job_dir / name,
                      threads=self.worker.config.threads, max_lora_rank=max_rank)
        try:
            return TrainSpec.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise TrainerFailed(f"invalid training settings: {where}: {err['msg']}") from exc

    async def publish(self, adapter_dir: str, name: str, kind: str,
                      lineage: dict[str, Any]) -> str:
        if await self.cancelled():
            raise JobCancelled("the job was cancelled")
        full = {**self.base_lineage(), **lineage}
        db = self.worker.db
        await adapter_store.record_adapter(
            db, name=name, job_id=self.job.id, base_model=self.job.model,
            parent=full.get("parent") or self.job.model, path=adapter_dir, kind=kind,
            lineage=full)
        await self.event(f"Publishing {name}: waiting for the server to load it",
                         data={"model": name, "kind": kind})
        await self._wait_listed(name)
        if kind == "checkpoint":
            metrics = full.get("metrics") or {}
            step = full.get("round") or metrics.get("steps") or 0
            await job_store.add_checkpoint(db, self.job.id, name, int(step), {
                "step": step, **{k: v for k, v in metrics.items()
                                 if isinstance(v, int | float) and not isinstance(v, bool)}})
        await self.event(f"{name} is served", data={"model": name, "kind": kind})
        return name

    async def _wait_listed(self, name: str) -> None:
        deadline = time.monotonic() + self.worker.config.publish_timeout_s
        while True:
            row = await adapter_store.get_adapter(self.worker.db, name)
            if row.status == "refused":
                raise PublishFailed(f"the server refused the trained adapter: {row.error}")
            if row.status != "ready":
                raise PublishFailed(f"the trained adapter {name} was {row.status}")
            if await self._listed(name):
                return
            if await self.cancelled():
                raise JobCancelled("the job was cancelled")
            if time.monotonic() > deadline:
                raise PublishFailed(
                    f"the server at {self.worker.config.server_url} did not list {name} "
                    f"within {self.worker.config.publish_timeout_s:.0f}s")
            await asyncio.sleep(self.worker.config.poll_s)

    async def _listed(self, name: str) -> bool:
        try:
            r = await self.steer.get("/v1/models")
        except httpx.TransportError:  # the server is starting or restarting: wait
            return False
        if r.status_code != 200:
            return False
        return any(card.get("id") == name for card in r.json().get("data", []))

    def base_lineage(self) -> dict[str, Any]:
        """Where this job's priors come from, whatever trains it: the base, the data files
        with their sources, the models whose answers the data holds, the method."""
        job = self.job
        method = str(job.method.get("type"))
        data_models = sorted({m for f in (self.training, self.validation) if f is not None
                              for m in _source_models(f.source_dict)})
        trained_from = [m for m in data_models if m != job.model]
        body = job.method.get(method) or {}
        return {
            "parent": trained_from[0] if len(trained_from) == 1 else job.model,
            "base_model": job.model, "job_id": job.id, "method": method,
            "data": {"training_file": _file(self.training),
                     "validation_file": _file(self.validation) if self.validation else None,
                     "models": data_models},
            "grader": body.get("grader"), "strategy": body.get("steering"), "round": None,
        }


def _file(f: StoredFile) -> dict[str, Any]:
    return {"id": f.id, "filename": f.filename, "lines": f.lines, "kind": f.kind,
            "source": f.source_dict}


def _source_models(source: dict[str, Any] | None) -> list[str]:
    """The models a file's lines were answered by, as far as its source says (a dataset
    built from stored completions filtered by model)."""
    if not source:
        return []
    found = []
    filters = source.get("filters")
    for where in (source, filters if isinstance(filters, dict) else {}):
        value = where.get("model")
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            found.extend(str(v) for v in value)
    return found


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _metrics(event: dict[str, Any], loss_name: str, names: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {"step": event.get("step"), loss_name: event.get("loss")}
    for key in ("total_steps", "learning_rate", "epoch"):
        if event.get(key) is not None:
            data[key] = event[key]
    for key, value in (event.get("metrics") or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            data[names.get(key, key)] = value
    return data


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else str(value)
