"""Adapter directory checks: paths confined to the root, safetensors only, shapes and rank
against the served model, and every refusal naming its reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from steer.engine import InvalidAdapter
from steer.engine.default_model import prepare_default_model
from steer.engine.lora_files import (
    ModelModules,
    check_name,
    inspect_adapter,
    read_safetensors_header,
    resolve_in_root,
)
from steer.service.settings import Settings
from tests.lora_helpers import FIXTURE_ADAPTERS, tiny_model, write_adapter


def reason(exc: pytest.ExceptionInfo[InvalidAdapter]) -> str:
    return exc.value.reason


@pytest.fixture
def model(tmp_path: Path) -> ModelModules:
    return tiny_model(tmp_path)


def test_a_good_adapter_is_described(tmp_path: Path, model: ModelModules) -> None:
    path = write_adapter(tmp_path / "root" / "good", rank=4)
    spec = inspect_adapter(path, model, max_rank=8)
    assert (spec.rank, spec.alpha, spec.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert spec.path == path.resolve()
    assert spec.base_model == "fake-model"
    assert spec.size_bytes == (path / "adapter_model.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"weights": False}, "missing_weights"),
        ({"pickle": True}, "pickle_weights_refused"),  # even next to a safetensors file
        ({"weights": False, "pickle": True}, "pickle_weights_refused"),
        ({"rank": 16}, "rank_too_large"),
        ({"config": {"rank_pattern": {"q_proj": 32}}}, "rank_too_large"),
        ({"modules": {"model.layers.0.self_attn.q_proj": (8, 16)}}, "base_model_mismatch"),
        ({"modules": {"model.layers.7.self_attn.q_proj": (8, 8)}}, "base_model_mismatch"),
        ({"config": {"target_modules": ["c_attn"]}}, "base_model_mismatch"),
        ({"config": {"peft_type": "IA3"}}, "unsupported_adapter"),
        ({"config": {"use_dora": True}}, "unsupported_adapter"),
        ({"config": {"r": "eight"}}, "invalid_adapter_config"),
        ({"config": {"target_modules": []}}, "invalid_adapter_config"),
    ],
)
def test_bad_adapters_are_refused_with_a_reason(
    tmp_path: Path, model: ModelModules, kwargs: dict[str, object], expected: str
) -> None:
    path = write_adapter(tmp_path / "a", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidAdapter) as exc:
        inspect_adapter(path, model, max_rank=8)
    assert reason(exc) == expected, str(exc.value)
    assert exc.value.field == "path"


def test_missing_dir_and_config(tmp_path: Path, model: ModelModules) -> None:
    with pytest.raises(InvalidAdapter) as exc:
        inspect_adapter(tmp_path / "nope", model, max_rank=8)
    assert reason(exc) == "adapter_not_found"
    path = write_adapter(tmp_path / "a")
    (path / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter) as exc:
        inspect_adapter(path, model, max_rank=8)
    assert reason(exc) == "missing_config"
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapter) as exc:
        inspect_adapter(path, model, max_rank=8)
    assert reason(exc) == "invalid_adapter_config"


def test_truncated_or_foreign_weights_are_refused(tmp_path: Path, model: ModelModules) -> None:
    path = write_adapter(tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(InvalidAdapter) as exc:
        inspect_adapter(path, model, max_rank=8)
    assert reason(exc) == "invalid_weights"
    weights.write_bytes(b"\xff" * 4)
    with pytest.raises(InvalidAdapter):
        read_safetensors_header(weights)


def test_without_a_model_only_rank_is_checked(tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a", modules={"model.layers.9.mlp.up_proj": (3, 5)})
    assert inspect_adapter(path, None, max_rank=8).rank == 4


# -- paths ------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write_adapter(root / "team" / "tone")
    return root


def test_paths_resolve_inside_the_root(root: Path) -> None:
    assert resolve_in_root(root, "team/tone") == (root / "team" / "tone").resolve()
    assert resolve_in_root(root, str(root / "team" / "tone")) == (root / "team/tone").resolve()


@pytest.mark.parametrize("requested", ["../outside", "team/../../outside", "/etc", "", ".",
                                       "team/\x00x"])
def test_traversal_and_outside_paths_are_refused(root: Path, requested: str) -> None:
    (root.parent / "outside").mkdir()
    with pytest.raises(InvalidAdapter) as exc:
        resolve_in_root(root, requested)
    assert reason(exc) == "path_outside_root"


def test_symlinks_out_of_the_root_are_refused(root: Path, tmp_path: Path,
                                              model: ModelModules) -> None:
    outside = write_adapter(tmp_path / "elsewhere")
    os.symlink(outside, root / "sneaky")
    with pytest.raises(InvalidAdapter) as exc:
        resolve_in_root(root, "sneaky")
    assert reason(exc) == "path_outside_root"
    # A symlinked file inside an adapter dir that leads out is refused too.
    inside = root / "half"
    inside.mkdir()
    os.symlink(outside / "adapter_config.json", inside / "adapter_config.json")
    os.symlink(outside / "adapter_model.safetensors", inside / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter) as exc:
        inspect_adapter(resolve_in_root(root, "half"), model, 8, root=root)
    assert reason(exc) == "path_outside_root"


def test_symlinks_within_the_root_are_followed(root: Path) -> None:
    os.symlink(root / "team" / "tone", root / "alias")
    assert resolve_in_root(root, "alias") == (root / "team" / "tone").resolve()


def test_a_missing_root_refuses_everything(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapter) as exc:
        resolve_in_root(tmp_path / "no-root", "x")
    assert reason(exc) == "adapter_root_missing"


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 129, "é", "a\nb", "tone\n"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidAdapter) as exc:
        check_name(name)
    assert (reason(exc), exc.value.field) == ("invalid_adapter_name", "name")


def test_good_names() -> None:
    for name in ("shout", "team/tone-v2", "judge:1.5", "A_b+c"):
        check_name(name)


# -- the checked-in demo adapters -------------------------------------------------------------


@pytest.fixture(scope="module")
def default_checkpoint() -> Path:
    """The default model's checkpoint, converted here if this machine has none yet (about
    40 s once; later runs reuse it), so the test runs on a clean CI machine too."""
    return prepare_default_model(Settings().cache_dir)


@pytest.mark.parametrize("name", ["shout", "signoff"])
def test_demo_adapters_fit_the_default_model(name: str, default_checkpoint: Path) -> None:
    model = ModelModules.from_checkpoint(default_checkpoint)
    spec = inspect_adapter(FIXTURE_ADAPTERS / name, model, max_rank=16)
    manifest = json.loads((FIXTURE_ADAPTERS / "manifest.json").read_text())[name]
    assert spec.rank == manifest["rank"] == 8
    assert spec.size_bytes < 8_000_000
