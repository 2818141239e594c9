"""A stand-in for `python -m steer.training.trainer SPEC.json` at the subprocess boundary:
speaks the trainer's JSON-line protocol without torch. `FAKE_TRAINER` picks the behaviour:
ok (steps, then copies the adapter at `FAKE_ADAPTER` to the spec's out_dir, then done),
crash (a step, then exit 3 with a traceback on stderr), error (an error event, exit 1),
hang (a step, then sleeps until killed)."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
mode = os.environ.get("FAKE_TRAINER", "ok")


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


print("not a protocol line", flush=True)  # the worker must ignore it
emit(event="step", step=1, total_steps=2, loss=2.5, learning_rate=spec["learning_rate"],
     epoch=0.5, metrics={"mean_token_accuracy": 0.4})
if mode == "crash":
    print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "error":
    emit(event="error", message="out of memory: lower batch_size or max_length")
    sys.exit(1)
if mode == "hang":
    time.sleep(600)
emit(event="step", step=2, total_steps=2, loss=1.25, learning_rate=spec["learning_rate"],
     epoch=1.0, metrics={})
if spec.get("eval_path"):
    emit(event="eval", step=2, epoch=1.0, loss=1.5, metrics={"mean_token_accuracy": 0.5})
shutil.copytree(os.environ["FAKE_ADAPTER"], spec["out_dir"])
emit(event="done", adapter=spec["out_dir"], trained_tokens=123, train_loss=1.875, seconds=0.1,
     steps=2, rank=4)
