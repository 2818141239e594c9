"""Tiny on-disk LoRA adapters and base checkpoints for tests (safetensors via numpy; no torch).

The tiny base has one layer: q_proj (8x8), v_proj (4x8) and an embedding (16x8), in HF's
`model.layers.0.self_attn.q_proj.weight` layout. `write_adapter` writes a peft-style adapter
for it; its keyword arguments make every way an adapter can be wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from steer.engine.lora_files import ModelModules

BASE_SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.v_proj.weight": (4, 8),
    "model.embed_tokens.weight": (16, 8),
}
FIXTURE_ADAPTERS = Path(__file__).parent / "fixtures" / "adapters"


def write_base(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(s, dtype=np.float32) for k, s in BASE_SHAPES.items()},
              str(directory / "model.safetensors"))
    return directory


def tiny_model(tmp: Path) -> ModelModules:
    return ModelModules.from_checkpoint(write_base(tmp / "base"))


def lora_tensors(rank: int, modules: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """peft's keys for LoRA on `modules` ({module path: (out, in)})."""
    tensors = {}
    for module, (out_dim, in_dim) in modules.items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = np.zeros((rank, in_dim), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.zeros((out_dim, rank), dtype=np.float32)
    return tensors


GOOD_MODULES = {
    "model.layers.0.self_attn.q_proj": (8, 8),
    "model.layers.0.self_attn.v_proj": (4, 8),
}


def write_adapter(
    directory: Path,
    *,
    rank: int = 4,
    modules: dict[str, tuple[int, int]] | None = None,
    config: dict[str, Any] | None = None,
    weights: bool = True,
    pickle: bool = False,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "fake-model",
    }
    cfg.update(config or {})
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    if weights:
        save_file(lora_tensors(rank, modules or GOOD_MODULES),
                  str(directory / "adapter_model.safetensors"))
    if pickle:
        (directory / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle.")
    return directory
