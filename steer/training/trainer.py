"""The trainer process: one LoRA training run with TRL + peft, driven by a JSON spec.

    python -m steer.training.trainer SPEC.json

Owns `TrainSpec` (the spec), the run (TRL's own script shape: a config, a `datasets.Dataset`,
`SFTTrainer`/`DPOTrainer` with a peft `LoraConfig`, `train()`, `save_model()`), the check that
the saved adapter is one the server will load (`engine.lora_files.inspect_adapter`), and the
stdout protocol. Does not own the rows' conversion (`rows.py`) or the job around the run (the
worker starts this process, streams its events and registers the adapter).

Stdout carries one JSON object per line and nothing else (TRL/transformers chatter and any
C-level output go to stderr: fd 1 is pointed at stderr before torch is imported):
    {"event": "step", "step", "total_steps", "loss", "learning_rate", "epoch", "metrics"}
    {"event": "eval", "step", "epoch", "loss", "metrics"}
    {"event": "checkpoint", "step", "epoch", "adapter"}     (only with `checkpoint_dir`)
    {"event": "done", "adapter", "trained_tokens", "train_loss", "seconds", "steps", "rank"}
    {"event": "error", "message"}                            (and exit status 1)
The adapter is written to a sibling work directory and renamed into `out_dir` only after it
passed the server's checks, so `out_dir` is either absent or a complete, loadable adapter.
It holds just `adapter_config.json` and `adapter_model.safetensors` (the Trainer also writes
`training_args.bin`, a pickle the server refuses, and tokenizer files: dropped).

SFT puts the loss on the completion (the assistant's answer and its `<|im_end|>`) only: TRL
1.16 does that for conversational prompt/completion rows (`completion_only_loss` None means
True for them). DPO with peft uses the base model with the adapter disabled as the reference.

Defaults measured on this CPU (2 threads, SmolLM2-135M-Instruct, fp32, batch 16, LoRA r=8
alpha=16 on q_proj+v_proj, one epoch; SFT on correct two-digit additions written in the
model's own answer shapes; one-call greedy accuracy on 100 held-out additions, base 6%):
    rows  lr    layers  ex/s*  train s  final loss  accuracy
    400   5e-4  all     1.4    285      0.15        57%
    400   1e-3  all     1.1    368      0.10        74%
    400   2e-3  all     2.1    186      0.08        72%
    400   1e-3  top 15  2.6    156      0.13        53%
    800   1e-3  all     1.8    452      0.06        78%
    (*) the machine was shared: alone, all layers run ~2.1 ex/s fp32, ~2.3 ex/s bf16 (same
    losses); ~65 tokens an example, the chat template's system prompt included.
1e-3 is the knee (2e-3 is no better); more rows beat a higher rate; adapting only the top
layers is ~25% cheaper a step but learns far less. Hence lr 1e-3, batch 16, r 8 on q/v, one
epoch, and the loop should feed it ~800+ kept samples (1,500 gave 84% in the issue's run).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from steer.engine.base import InvalidAdapter
from steer.engine.lora_files import CONFIG_FILE, WEIGHTS_FILE, ModelModules, inspect_adapter
from steer.training.rows import RowError, read_rows


class TrainSpec(BaseModel):
    """One training run. Paths are absolute or relative to the process's working dir."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["sft", "dpo"]
    base_model_dir: Path
    train_path: Path = Field(description="JSONL of TRL conversational rows (rows.py)")
    eval_path: Path | None = None
    out_dir: Path = Field(description="where the adapter ends up; must not exist yet")
    checkpoint_dir: Path | None = Field(
        None, description="if set, an adapter is saved under it after every epoch but the last"
    )
    seed: int = 0
    n_epochs: int = Field(1, ge=1, le=50)
    batch_size: int = Field(16, ge=1, le=512)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    beta: float = Field(0.1, gt=0, description="DPO's beta")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                      min_length=1)
    lora_layers: int | None = Field(
        None, ge=1, description="adapt only the top N decoder layers (None: all); the "
        "backward pass then stops at the lowest adapted layer, which makes a step cheaper")
    max_length: int = Field(512, ge=16)
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int = Field(1, ge=1, le=256)
    max_steps: int | None = Field(None, ge=1)
    max_lora_rank: int = Field(16, ge=1, description="the serving limit (--max-lora-rank)")

    @model_validator(mode="after")
    def _rank_fits(self) -> TrainSpec:
        if self.lora_r > self.max_lora_rank:
            raise ValueError(f"lora_r {self.lora_r} exceeds the server's max LoRA rank "
                             f"{self.max_lora_rank}: the adapter could not be served")
        return self


class TrainError(RuntimeError):
    """A run that cannot start or whose result the server would refuse."""


class Events:
    """The stdout protocol: one JSON object per line, flushed at once."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        self._stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
        self._stream.flush()


def run(spec: TrainSpec, events: Events) -> dict[str, Any]:
    """Train, save, check; emit step/eval/checkpoint events; return the done event's fields."""
    started = time.perf_counter()
    train_rows = _rows(spec.train_path, spec.method)  # before torch: bad data fails fast
    eval_rows = _rows(spec.eval_path, spec.method) if spec.eval_path else None
    if spec.out_dir.exists():
        raise TrainError(f"out_dir {spec.out_dir} already exists")
    modules = ModelModules.from_checkpoint(spec.base_model_dir)
    missing = sorted(set(spec.target_modules) - modules.leaf_names())
    if missing:
        raise TrainError(f"target_modules not in the base model: {', '.join(missing)}")
    _limit_threads(spec.threads)
    work = spec.out_dir.with_name(f".{spec.out_dir.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        trainer, log = _build(spec, train_rows, eval_rows, work, events)
        trainer.train()
        trainer.save_model(str(work))
        trainer.end()
        _keep_adapter_files(work)
        adapter = inspect_adapter(work, modules, spec.max_lora_rank)
        os.replace(work, spec.out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"adapter": str(spec.out_dir.resolve()), "trained_tokens": log.tokens,
            "train_loss": log.train_loss, "seconds": round(time.perf_counter() - started, 1),
            "steps": log.steps, "rank": adapter.rank}


def _rows(path: Path, method: Literal["sft", "dpo"]) -> list[dict[str, Any]]:
    try:
        return list(read_rows(path, method))
    except RowError as exc:
        raise TrainError(f"bad training data in {path.name}, {exc}") from exc
    except OSError as exc:
        raise TrainError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _limit_threads(threads: int) -> None:
    # subtle: OpenMP/MKL read these once, when torch loads; set_num_threads alone leaves the
    # interop pool and some BLAS paths at the machine's core count.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def _build(spec: TrainSpec, train_rows: list[dict[str, Any]],
           eval_rows: list[dict[str, Any]] | None, work: Path, events: Events
           ) -> tuple[Any, _Log]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    datasets.disable_progress_bars()
    common: dict[str, Any] = dict(
        output_dir=str(work), seed=spec.seed, data_seed=spec.seed,
        num_train_epochs=spec.n_epochs, max_steps=spec.max_steps or -1,
        per_device_train_batch_size=spec.batch_size, per_device_eval_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, max_length=spec.max_length,
        use_cpu=True, bf16=spec.precision == "bf16", fp16=False,
        # A 135M model fits easily; recomputing activations would only cost time.
        gradient_checkpointing=False,
        dataloader_num_workers=0, report_to="none", save_strategy="no",
        logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        eval_strategy=("no" if eval_rows is None else "steps" if spec.max_steps else "epoch"),
        eval_steps=spec.max_steps,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.base_model_dir, dtype=torch.float32)
    n_layers = int(model.config.num_hidden_layers)
    layers = (None if spec.lora_layers is None
              else list(range(max(0, n_layers - spec.lora_layers), n_layers)))
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=spec.target_modules, layers_to_transform=layers,
                      task_type="CAUSAL_LM")
    train_ds = datasets.Dataset.from_list(train_rows)
    eval_ds = datasets.Dataset.from_list(eval_rows) if eval_rows is not None else None
    log = _Log(events, spec.checkpoint_dir)
    trainer: Any
    if spec.method == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tokenizer,
                             peft_config=lora, callbacks=[log.callback()])
    else:
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=spec.beta),
                             train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer, peft_config=lora,
                             callbacks=[log.callback()])
    return trainer, log


class _Log:
    """Turns the Trainer's log dicts into protocol events; keeps what "done" reports."""

    def __init__(self, events: Events, checkpoint_dir: Path | None) -> None:
        self.events, self.checkpoint_dir = events, checkpoint_dir
        self.tokens, self.steps, self.train_loss = 0, 0, None

    def on_log(self, step: int, total: int, logs: dict[str, Any]) -> None:
        logs = dict(logs)
        self.tokens = int(logs.pop("num_tokens", self.tokens))
        epoch = logs.pop("epoch", None)
        if "train_loss" in logs:  # the Trainer's summary at the end of train()
            self.train_loss = logs["train_loss"]
        elif any(k.startswith("eval_") for k in logs):
            metrics = {k.removeprefix("eval_"): v for k, v in logs.items()}
            self.events.emit("eval", step=step, epoch=epoch, loss=metrics.pop("loss", None),
                             metrics=metrics)
        elif "loss" in logs:
            self.steps = step
            self.events.emit("step", step=step, total_steps=total, loss=logs.pop("loss"),
                             learning_rate=logs.pop("learning_rate", None), epoch=epoch,
                             metrics=logs)

    def on_epoch_end(self, model: Any, step: int, epoch: float, last: bool) -> None:
        if self.checkpoint_dir is None or last:
            return
        target = self.checkpoint_dir / f"epoch-{round(epoch)}"
        model.save_pretrained(str(target), safe_serialization=True)
        _keep_adapter_files(target)
        self.events.emit("checkpoint", step=step, epoch=epoch, adapter=str(target.resolve()))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        log = self

        class EventCallback(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                       **kwargs: Any) -> None:
                log.on_log(state.global_step, state.max_steps, logs or {})

            def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                last = state.global_step >= state.max_steps
                log.on_epoch_end(kwargs["model"], state.global_step, state.epoch or 0.0, last)

        return EventCallback()


def _keep_adapter_files(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.name not in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # subtle: keep fd 1 for the protocol and point fd 1 at stderr, so nothing else (tqdm,
    # accelerate's prints, C extensions) can ever interleave with the events.
    events = Events(os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8"))
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        if len(args) != 1:
            raise TrainError("usage: python -m steer.training.trainer SPEC.json")
        spec = TrainSpec.model_validate_json(Path(args[0]).read_text(encoding="utf-8"))
        events.emit("done", **run(spec, events))
        return 0
    except ValidationError as exc:
        events.emit("error", message=f"invalid spec: {_first_error(exc)}")
    except TrainError as exc:
        events.emit("error", message=str(exc))
    except MemoryError:
        events.emit("error", message="out of memory: lower batch_size or max_length")
    except InvalidAdapter as exc:
        events.emit("error", message=f"trained adapter would be refused by the server: {exc}")
    # The last line of defence of a process whose only contract is "events out": whatever
    # broke (a RuntimeError from torch, an OSError on disk, a bug) is reported, not lost.
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        if "allocate memory" in str(exc):  # torch's CPU allocator says OOM this way
            message = f"out of memory (lower batch_size or max_length): {message}"
        events.emit("error", message=message)
    return 1


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


if __name__ == "__main__":
    raise SystemExit(main())
