"""The vLLM fix plugin: base-model tokens (LoRA index -1) get no LoRA delta on CPU, valid
tokens get exactly what vLLM's own ops give, and the plugin is installed and patches vLLM."""

from __future__ import annotations

import importlib

import pytest
import torch

from steer.engine import vllm_patches

torch.manual_seed(0)
SLOTS, IN, OUT, RANK, TOKENS = 3, 6, 5, 2, 4
INDICES = torch.tensor([-1, 0, 2, -1])  # base, slot 0, slot 2 (the last), base


def vllm_ops():  # type: ignore[no-untyped-def]
    return importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")


def vllm_own(name: str):  # type: ignore[no-untyped-def]
    """vLLM's unpatched op, also when the plugin already patched this process."""
    return getattr(vllm_ops(), "_steer_originals", {}).get(name) or getattr(vllm_ops(), name)


def test_shrink_and_expand_skip_base_tokens() -> None:
    x = torch.randn(TOKENS, IN)
    a = torch.randn(SLOTS, RANK, IN)
    b = torch.randn(SLOTS, OUT, RANK)
    shrunk = torch.zeros(TOKENS, RANK)
    vllm_patches.bgmv_shrink(x, a, shrunk, INDICES, 0.5)
    out = torch.ones(TOKENS, OUT)
    vllm_patches.bgmv_expand(shrunk, b, out, INDICES, add_inputs=True)
    for t, slot in enumerate(INDICES.tolist()):
        if slot < 0:
            assert torch.equal(out[t], torch.ones(OUT))  # untouched: no adapter
        else:
            expected = 1 + b[slot] @ (0.5 * a[slot] @ x[t])
            assert torch.allclose(out[t], expected, atol=1e-5)
    sliced = torch.ones(TOKENS, OUT + 3)
    vllm_patches.bgmv_expand_slice(shrunk, b, sliced, INDICES, 3, OUT, add_inputs=True)
    assert torch.equal(sliced[:, 3:], out)
    assert torch.equal(sliced[:, :3], torch.ones(TOKENS, 3))


@pytest.mark.parametrize("tokens", [8, 128])  # both sides of GROUPED_MIN_TOKENS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("four_d", [False, True])
def test_valid_tokens_match_vllm(tokens: int, dtype: torch.dtype, four_d: bool) -> None:
    # vLLM's own ops are the reference wherever they are right (no -1 index): same values up
    # to rounding (plain matmuls instead of one tiny product per token).
    assert 8 < vllm_patches.GROUPED_MIN_TOKENS <= 128
    x = torch.randn(tokens, IN, dtype=dtype)
    a = torch.randn(SLOTS, RANK, IN, dtype=dtype)
    b = torch.randn(SLOTS, OUT, RANK, dtype=dtype)
    if four_d:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    for valid in (torch.randint(0, SLOTS, (tokens,)), torch.full((tokens,), 1)):
        ours = torch.zeros(tokens, RANK, dtype=dtype)
        theirs = torch.zeros(tokens, RANK, dtype=dtype)
        vllm_patches.bgmv_shrink(x, a, ours, valid, 2.0)
        vllm_own("bgmv_shrink")(x, a, theirs, valid, 2.0)
        assert torch.allclose(ours.float(), theirs.float(), **tol)
        out_ours = torch.ones(tokens, OUT, dtype=dtype)
        out_theirs = torch.ones(tokens, OUT, dtype=dtype)
        vllm_patches.bgmv_expand(theirs, b, out_ours, valid, add_inputs=True)
        vllm_own("bgmv_expand")(theirs, b, out_theirs, valid, add_inputs=True)
        assert torch.allclose(out_ours.float(), out_theirs.float(), **tol)


@pytest.mark.parametrize("repeat", [1, 16])  # 8 and 128 tokens
def test_mixed_slots_and_base_tokens_against_a_reference(repeat: int) -> None:
    indices = torch.tensor([2, -1, 0, 2, 1, -1, 0, 0] * repeat)
    x = torch.randn(len(indices), IN)
    a = torch.randn(SLOTS, RANK, IN)
    got = torch.zeros(len(indices), RANK)
    vllm_patches.bgmv_shrink(x, a, got, indices, 1.0)
    for t, slot in enumerate(indices.tolist()):
        expected = torch.zeros(RANK) if slot < 0 else a[slot] @ x[t]
        assert torch.allclose(got[t], expected, atol=1e-5), t


def test_the_bug_exists_in_this_vllm() -> None:
    # If this starts failing, vLLM fixed it (vllm-project/vllm#48421) and the patch can go.
    x = torch.randn(1, IN)
    a = torch.randn(SLOTS, RANK, IN)
    out = torch.zeros(1, RANK)
    vllm_own("bgmv_shrink")(x, a, out, torch.tensor([-1]), 1.0)
    assert torch.allclose(out[0], a[-1] @ x[0])  # the base token got the last slot's adapter


def test_plugin_is_installed_and_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    assert vllm_patches.registered()
    monkeypatch.setenv("VLLM_PLUGINS", "something_else")
    assert not vllm_patches.registered()
    modules = [vllm_ops(), importlib.import_module("vllm.lora.ops.torch_ops"),
               importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")]
    for module in modules:  # restored after the test
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(vllm_ops(), "_steer_fixed", False, raising=False)
    vllm_patches.apply()
    vllm_patches.apply()  # idempotent
    for module in modules:
        assert module.bgmv_shrink is vllm_patches.bgmv_shrink
        assert module.bgmv_expand is vllm_patches.bgmv_expand


def test_all_base_steps_take_the_fast_path() -> None:
    base = torch.tensor([-1, -1, -1, -1])
    x = torch.randn(TOKENS, IN)
    a = torch.randn(SLOTS, RANK, IN)
    b = torch.randn(SLOTS, OUT, RANK)
    shrunk = torch.full((TOKENS, RANK), 7.0)
    vllm_patches.bgmv_shrink(x, a, shrunk, base, 1.0)
    assert torch.equal(shrunk, torch.zeros(TOKENS, RANK))
    out = torch.ones(TOKENS, OUT)
    vllm_patches.bgmv_expand(shrunk, b, out, base, add_inputs=True)
    assert torch.equal(out, torch.ones(TOKENS, OUT))
    vllm_patches.bgmv_expand(shrunk, b, out, base, add_inputs=False)
    assert torch.equal(out, torch.zeros(TOKENS, OUT))
    sliced = torch.ones(TOKENS, OUT + 2)
    vllm_patches.bgmv_expand_slice(shrunk, b, sliced, base, 2, OUT, add_inputs=False)
    assert torch.equal(sliced[:, 2:], torch.zeros(TOKENS, OUT))
    assert torch.equal(sliced[:, :2], torch.ones(TOKENS, 2))
