"""What a LoRA adapter directory must hold before any engine is allowed to read it.

Owns: confining a requested path to the adapter root, reading `adapter_config.json`, reading
safetensors *headers* (names, dtypes, shapes; never the tensors, never a pickle), and checking
the adapter against the served model: every LoRA tensor must sit on a module the model has,
with matching in/out sizes, and its rank must fit `max_lora_rank`. Raises `InvalidAdapter`
with a short machine-readable `reason`. Does not own the registry of loaded adapters
(`adapters.py`) or loading into an engine.

Why the checks live here and not in the engine: a pickled `adapter_model.bin` runs code when
unpickled, and an adapter shaped for another model can take the engine down when it is
applied. Both must be refused before the engine touches the files.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.engine.base import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Files that would be unpickled by someone (torch.load): refused wherever they appear.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$")
# peft's key layout: base_model.model.<module path>.lora_A.weight (or lora_embedding_A).
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A"
    r"|lora_embedding_B)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$"
)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter directory."""

    path: Path  # resolved: no symlinks, no `..`
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None  # as the adapter's config claims; shapes are what is checked
    size_bytes: int


@dataclass(frozen=True)
class ModelModules:
    """The served model's weight shapes by module path (`model.layers.0.self_attn.q_proj`)."""

    shapes: Mapping[str, tuple[int, ...]]

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> ModelModules:
        """Read the shapes from the safetensors headers of a HF checkpoint directory."""
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}")
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            for name, info in read_safetensors_header(f).items():
                if name.endswith(".weight"):
                    shapes[name.removesuffix(".weight")] = info.shape
        return cls(shapes)

    def leaf_names(self) -> frozenset[str]:
        return frozenset(path.rsplit(".", 1)[-1] for path in self.shapes)


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):  # subtle: `$` alone lets a trailing newline in
        raise InvalidAdapter(
            f"Invalid adapter name {name!r}: use 1-128 letters, digits and . _ : / + -, "
            "starting with a letter or digit.",
            reason="invalid_adapter_name", field="name",
        )


def resolve_in_root(root: Path, requested: str) -> Path:
    """The real directory `requested` names, relative to `root` or absolute inside it.

    Refuses `..` anywhere, absolute paths outside the root, and symlinks that lead out of it
    (the check runs on the fully resolved path)."""
    if not requested or "\x00" in requested:
        raise _outside(requested, "an empty or malformed path")
    if ".." in Path(requested).parts:
        raise _outside(requested, "'..' is not allowed in adapter paths")
    if not root.is_dir():
        raise InvalidAdapter(
            f"The adapter root {root} does not exist on the server; runtime loads are "
            "confined to it (STEER_ADAPTER_ROOT).",
            reason="adapter_root_missing", field="path",
        )
    real_root = root.resolve()
    candidate = Path(requested) if Path(requested).is_absolute() else real_root / requested
    real = candidate.resolve()
    if real == real_root or not real.is_relative_to(real_root):
        raise _outside(requested, f"it resolves outside the adapter root {real_root}")
    return real


def _outside(requested: str, why: str) -> InvalidAdapter:
    return InvalidAdapter(
        f"Refused adapter path {requested!r}: {why}.", reason="path_outside_root", field="path"
    )


def inspect_adapter(
    path: Path, model: ModelModules | None, max_rank: int, root: Path | None = None
) -> AdapterSpec:
    """Validate the adapter directory at `path`; raise `InvalidAdapter` naming the reason.

    `root`, when given, must contain every file read (a symlinked file is followed only if it
    stays inside). `model` None skips the shape checks (a backend that cannot tell us)."""
    real = path.resolve()
    if not real.is_dir():
        raise InvalidAdapter(f"No adapter directory at {path}.", reason="adapter_not_found",
                             field="path")
    pickled = sorted(p.name for p in real.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise InvalidAdapter(
            f"Refused adapter at {path}: pickled weights ({', '.join(pickled)}) can run code "
            f"when loaded. Convert them to {WEIGHTS_FILE}.",
            reason="pickle_weights_refused", field="path",
        )
    config_path = _file(real, CONFIG_FILE, root)
    weights_path = _file(real, WEIGHTS_FILE, root)
    config = _read_config(config_path)
    rank, alpha, targets = _config_fields(config)
    tensors = read_safetensors_header(weights_path)
    if not tensors:
        raise InvalidAdapter(f"{WEIGHTS_FILE} in {path} holds no tensors.",
                             reason="invalid_weights", field="path")
    tensor_rank = _check_tensors(tensors, model)
    rank = max(rank, tensor_rank, *_ints(config.get("rank_pattern")))
    if rank > max_rank:
        raise InvalidAdapter(
            f"Adapter rank {rank} exceeds this server's max LoRA rank {max_rank} "
            "(--max-lora-rank).", reason="rank_too_large", field="path",
        )
    if model is not None and isinstance(config.get("target_modules"), list):
        missing = sorted(set(targets) - model.leaf_names())
        if missing:
            raise InvalidAdapter(
                f"Adapter targets modules the served model does not have: {', '.join(missing)}"
                " (was it trained for another base model?).",
                reason="base_model_mismatch", field="path",
            )
    base = config.get("base_model_name_or_path")
    return AdapterSpec(
        path=real, rank=rank, alpha=alpha, target_modules=targets,
        base_model=base if isinstance(base, str) else None,
        size_bytes=weights_path.stat().st_size,
    )


def _file(directory: Path, name: str, root: Path | None) -> Path:
    path = directory / name
    if not path.is_file():
        what = "weights" if name == WEIGHTS_FILE else "config"
        raise InvalidAdapter(f"Adapter directory {directory} has no {name} ({what}).",
                             reason=f"missing_{what}", field="path")
    real = path.resolve()
    if root is not None and not real.is_relative_to(root.resolve()):
        raise _outside(str(path), "a symlinked file leads outside the adapter root")
    return real


def _read_config(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _bad_config(path, "file is too large")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad_config(path, f"not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise _bad_config(path, "not a JSON object")
    return config


def _bad_config(path: Path, why: str) -> InvalidAdapter:
    return InvalidAdapter(f"Invalid {path.name} in {path.parent}: {why}.",
                          reason="invalid_adapter_config", field="path")


def _config_fields(config: dict[str, Any]) -> tuple[int, float, tuple[str, ...]]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidAdapter(f"Only LoRA adapters can be served, not {peft_type!r}.",
                             reason="unsupported_adapter", field="path")
    if config.get("use_dora"):
        raise InvalidAdapter("DoRA adapters are not supported by the engine.",
                             reason="unsupported_adapter", field="path")
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get(
        "target_modules")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"adapter_config.json: 'r' must be a positive integer, got "
                             f"{rank!r}.", reason="invalid_adapter_config", field="path")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InvalidAdapter(f"adapter_config.json: 'lora_alpha' must be a number, got "
                             f"{alpha!r}.", reason="invalid_adapter_config", field="path")
    if isinstance(targets, str):
        names: tuple[str, ...] = (targets,)  # a regex; the tensors are checked instead
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        names = tuple(targets)
    else:
        raise InvalidAdapter("adapter_config.json: 'target_modules' must be a non-empty list "
                             "of module names or a regex.", reason="invalid_adapter_config",
                             field="path")
    return rank, float(alpha), names


def _ints(pattern: object) -> list[int]:
    if not isinstance(pattern, dict):
        return []
    return [v for v in pattern.values() if isinstance(v, int)]


def _check_tensors(tensors: Mapping[str, TensorInfo], model: ModelModules | None) -> int:
    """Every tensor is a LoRA A/B matrix on a module the model has, with matching sizes.
    Returns the largest rank found."""
    top = 0
    for key, info in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None or len(info.shape) != 2:
            raise InvalidAdapter(
                f"Unsupported tensor {key!r} in {WEIGHTS_FILE} (only LoRA A/B matrices can "
                "be served).", reason="unsupported_adapter", field="path",
            )
        module, kind = m["module"], m["kind"]
        # lora_A: (r, in); lora_B: (out, r). Embedding variants are transposed: A (r, vocab),
        # B (dim, r) against a (vocab, dim) weight.
        rank = info.shape[0] if kind.endswith("A") else info.shape[1]
        top = max(top, rank)
        if model is None:
            continue
        base = model.shapes.get(module)
        if base is None or len(base) != 2:
            raise InvalidAdapter(
                f"Adapter tensor {key!r} targets {module!r}, which the served model does not "
                "have (was it trained for another base model?).",
                reason="base_model_mismatch", field="path",
            )
        out_dim, in_dim = (base[1], base[0]) if "embedding" in kind else base
        expected = in_dim if kind.endswith("A") else out_dim
        got = info.shape[1] if kind.endswith("A") else info.shape[0]
        if got != expected:
            raise InvalidAdapter(
                f"Adapter tensor {key!r} has shape {list(info.shape)}, but {module!r} in the "
                f"served model is {list(base)} (was it trained for another base model?).",
                reason="base_model_mismatch", field="path",
            )
    return top


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes from a safetensors file's JSON header, checking that every
    tensor's byte range lies inside the file (a truncated file is caught here)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad_weights(path, "file too short")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise _bad_weights(path, "header length out of range")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad_weights(path, f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _bad_weights(path, "header is not a JSON object")
    data_size = size - 8 - n
    result: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(start, int) and isinstance(end, int)
                  and 0 <= start <= end <= data_size)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _bad_weights(path, f"bad entry for tensor {name!r} (truncated file?)")
        result[name] = TensorInfo(dtype, tuple(shape))
    return result


def _bad_weights(path: Path, why: str) -> InvalidAdapter:
    return InvalidAdapter(f"Invalid safetensors file {path.name}: {why}.",
                          reason="invalid_weights", field="path")
