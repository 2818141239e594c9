"""The trainer's pure parts: OpenAI lines -> TRL rows, the rows-file check, TrainSpec, and the
stdout protocol of the process on input it refuses (fast: it fails before importing torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from steer.training.rows import RowError, read_rows, to_trl_rows
from steer.training.trainer import TrainSpec


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def test_sft_line_becomes_prompt_and_completion() -> None:
    line = {"messages": [{"role": "system", "content": "Be brief."}, user("What is 2 + 3?"),
                         assistant("2 + 3 = 5")]}
    assert to_trl_rows("sft", [line]) == [{
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "What is 2 + 3?"}],
        "completion": [{"role": "assistant", "content": "2 + 3 = 5"}],
    }]


def test_every_trained_assistant_message_gets_its_own_row_and_weight_0_is_context() -> None:
    line = {"messages": [user("hi"), assistant("hello", weight=0), user("2 + 2?"),
                         assistant("4", weight=1), user("and 3 + 3?"), assistant("6")]}
    rows = to_trl_rows("sft", [line])
    assert [r["completion"][0]["content"] for r in rows] == ["4", "6"]
    # the weight-0 answer stays in the context, without its weight key
    assert rows[0]["prompt"] == [user("hi"), assistant("hello"), user("2 + 2?")]
    assert rows[1]["prompt"][-1] == user("and 3 + 3?")
    assert len(rows[1]["prompt"]) == 5


def test_a_line_whose_only_answer_has_weight_0_yields_no_row() -> None:
    assert to_trl_rows("sft", [{"messages": [user("x"), assistant("y", weight=0)]}]) == []


def test_text_parts_are_joined_and_developer_is_system() -> None:
    line = {"messages": [{"role": "developer", "content": "rules"},
                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]},
                         assistant("c")]}
    (row,) = to_trl_rows("sft", [line])
    assert row["prompt"] == [{"role": "system", "content": "rules"},
                             {"role": "user", "content": "ab"}]


def test_preference_line_becomes_prompt_chosen_rejected() -> None:
    line = {"input": {"messages": [user("2 + 2?")]},
            "preferred_output": [assistant("4")], "non_preferred_output": [assistant("5")]}
    assert to_trl_rows("preference", [line]) == [{
        "prompt": [user("2 + 2?")], "chosen": [assistant("4")], "rejected": [assistant("5")],
    }]


@pytest.mark.parametrize(("kind", "line", "says"), [
    ("sft", {"messages": []}, "'messages' must be a non-empty list"),
    ("sft", {"messages": [user("x"), assistant("y", weight=2)]}, "weight must be 0 or 1"),
    ("sft", {"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
    ("sft", {"messages": [user("x"), {"role": "assistant", "content": None}]},
     "content must be a string"),
    ("preference", {"input": {"messages": [user("x")]}, "preferred_output": [user("y")],
                    "non_preferred_output": [assistant("z")]}, "must be an assistant message"),
    ("preference", {"input": {}, "preferred_output": [], "non_preferred_output": []},
     "'input.messages' must be a non-empty list"),
])
def test_unconvertible_lines_name_the_line(kind: Any, line: dict[str, Any], says: str) -> None:
    good = {"messages": [user("a"), assistant("b")]} if kind == "sft" else {
        "input": {"messages": [user("a")]}, "preferred_output": [assistant("b")],
        "non_preferred_output": [assistant("c")]}
    with pytest.raises(RowError) as caught:
        to_trl_rows(kind, [good, line])
    assert caught.value.line == 2
    assert says in caught.value.message


def test_read_rows_checks_the_shape_per_method(tmp_path: Path) -> None:
    sft = {"prompt": [user("a")], "completion": [assistant("b")]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(sft) + "\n\n")
    assert read_rows(path, "sft") == [sft]
    with pytest.raises(RowError, match="exactly the keys"):
        read_rows(path, "dpo")
    path.write_text(json.dumps(sft) + "\n" + json.dumps(
        {"prompt": [user("a")], "completion": [assistant("b"), assistant("c")]}) + "\n")
    with pytest.raises(RowError, match="line 2: 'completion' must be one assistant"):
        read_rows(path, "sft")
    path.write_text("")
    with pytest.raises(RowError, match="no training rows"):
        read_rows(path, "sft")


def spec_dict(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {"method": "sft", "base_model_dir": str(tmp_path / "model"),
            "train_path": str(tmp_path / "train.jsonl"), "out_dir": str(tmp_path / "out"),
            **overrides}


def test_spec_defaults_and_refusals(tmp_path: Path) -> None:
    spec = TrainSpec.model_validate(spec_dict(tmp_path))
    assert spec.lora_r <= spec.max_lora_rank
    assert spec.max_steps is None
    with pytest.raises(ValidationError, match="exceeds the server's max LoRA rank 16"):
        TrainSpec.model_validate(spec_dict(tmp_path, lora_r=32, max_lora_rank=16))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainSpec.model_validate(spec_dict(tmp_path, epochs=3))
    with pytest.raises(ValidationError, match="method"):
        TrainSpec.model_validate(spec_dict(tmp_path, method="ppo"))


def run_trainer(spec: dict[str, Any], tmp_path: Path) -> tuple[int, list[dict[str, Any]]]:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "steer.training.trainer", str(path)],
                          capture_output=True, text=True, timeout=60)
    # stdout is the protocol: every line is one JSON event
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]


def test_broken_dataset_is_one_error_event_and_a_non_zero_exit(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"prompt": [user("a")], "completion": [assistant("b")]}) + "\n{oops\n")
    code, events = run_trainer(spec_dict(tmp_path), tmp_path)
    assert code == 1
    assert events == [{"event": "error", "message": events[0]["message"]}]
    assert "train.jsonl" in events[0]["message"]
    assert "line 2: not valid JSON" in events[0]["message"]
    assert not (tmp_path / "out").exists()


def test_a_spec_above_the_rank_limit_is_refused_before_training(tmp_path: Path) -> None:
    code, events = run_trainer(spec_dict(tmp_path, lora_r=64, max_lora_rank=16), tmp_path)
    assert code == 1
    assert [e["event"] for e in events] == ["error"]
    assert "invalid spec" in events[0]["message"]
    assert "max LoRA rank 16" in events[0]["message"]
