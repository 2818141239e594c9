"""The trainer process on the real default model: a few SFT and DPO steps, the protocol on
stdout, and an adapter directory the server's own checks accept. Run it under the shared lock
(`flock /tmp/steer-heavy.lock ...`): it trains on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from steer.engine.default_model import prepare_default_model
from steer.engine.lora_files import ModelModules, inspect_adapter
from steer.service.settings import Settings
from steer.training.rows import to_trl_rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_model_dir() -> Path:
    return prepare_default_model(Settings().cache_dir)  # type: ignore[call-arg]  # env-filled


def additions(n: int) -> list[tuple[int, int]]:
    return [(11 + 7 * i, 23 + 5 * i) for i in range(n)]


def train(tmp_path: Path, base: Path, method: str, rows: list[dict[str, Any]],
          **overrides: Any) -> tuple[int, list[dict[str, Any]], str]:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"method": method, "base_model_dir": str(base), "train_path": str(data),
            "out_dir": str(tmp_path / "adapter"), "threads": 2, "batch_size": 4, **overrides}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "steer.training.trainer", str(tmp_path / "spec.json")],
        capture_output=True, text=True, timeout=120,
    )
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def check_run(code: int, events: list[dict[str, Any]], stderr: str, steps: int, base: Path,
              rank: int, evals: int = 0) -> dict[str, Any]:
    assert code == 0, stderr[-3000:]
    kinds = [e["event"] for e in events]
    assert kinds == ["step"] * steps + ["eval"] * evals + ["done"], events
    for i, event in enumerate(events[:steps], start=1):
        assert event["step"] == i
        assert event["total_steps"] == steps
        assert isinstance(event["loss"], float)
        assert event["loss"] == event["loss"]  # not NaN
        assert event["learning_rate"] > 0
    done = events[-1]
    assert done["steps"] == steps
    assert done["rank"] == rank
    assert done["trained_tokens"] > 0
    assert isinstance(done["train_loss"], float)
    adapter = Path(done["adapter"])
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == rank
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    spec = inspect_adapter(adapter, ModelModules.from_checkpoint(base), max_rank=rank)
    assert spec.rank == rank
    return done


def test_sft_steps_events_and_a_servable_adapter(tmp_path: Path, base_model_dir: Path) -> None:
    lines = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                           {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}
             for a, b in additions(8)]
    rows = to_trl_rows("sft", lines)
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    code, events, stderr = train(tmp_path, base_model_dir, "sft", rows, max_steps=3, lora_r=4,
                                 max_lora_rank=8, eval_path=str(held_out))
    done = check_run(code, events, stderr, 3, base_model_dir, rank=4, evals=1)
    assert events[3]["step"] == 3
    assert isinstance(events[3]["loss"], float)
    assert not (tmp_path / ".adapter.partial").exists()
    assert done["adapter"] == str((tmp_path / "adapter").resolve())


def test_dpo_steps_events_and_a_servable_adapter(tmp_path: Path, base_model_dir: Path) -> None:
    lines = [{"input": {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}]},
              "preferred_output": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
              "non_preferred_output": [{"role": "assistant",
                                        "content": f"{a} + {b} = {a + b + 10}"}]}
             for a, b in additions(8)]
    code, events, stderr = train(tmp_path, base_model_dir, "dpo",
                                 to_trl_rows("preference", lines), max_steps=2, lora_r=8)
    done = check_run(code, events, stderr, 2, base_model_dir, rank=8)
    # DPO's own metrics ride along on each step
    assert any("rewards/margins" in k for k in events[0]["metrics"]), events[0]
    assert done["train_loss"] > 0
