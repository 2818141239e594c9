"""Server settings: read once from the environment (prefix `STEER_`) and CLI flags, then frozen.

Per-request knobs never live here; they are fields of the validated request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from steer.engine.default_model import DEFAULT_MODEL_NAME


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEER_", frozen=True, extra="ignore")

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None
    log_level: str = "info"

    # Model and engine
    model: str | None = Field(
        None, description="Local HF checkpoint dir; unset: the embedded SmolLM2-135M-Instruct"
    )
    served_model_name: str | None = None
    cache_dir: Path = Path("~/.cache/steer").expanduser()
    dtype: str = "bfloat16"
    max_model_len: int = Field(8192, ge=16)
    kv_cache_gib: float = Field(2.0, gt=0, description="KV cache size on CPU (GiB)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    max_num_seqs: int = Field(128, ge=1)
    enable_lora: bool = False  # also on when adapters are configured or the admin key is set
    max_loras: int = Field(4, ge=1, description="adapters resident in one batch")
    max_lora_rank: int = Field(16, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1, description="adapters cached in memory")
    # Structured outputs (steer/service/structured.py): vLLM's backend for every request.
    structured_outputs_backend: Literal["guidance", "xgrammar", "outlines"] = "guidance"

    # LoRA adapters: NAME=PATH pairs loaded at startup; the runtime API (admin key) loads more
    lora_modules: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    admin_key: SecretStr | None = None
    adapter_root: Path | None = Field(
        None, description="runtime loads must lie inside it; default <cache_dir>/adapters"
    )
    adapter_unload_timeout_s: float = Field(
        30.0, ge=0, description="how long an unload waits for requests still using it"
    )

    # Tool calling (steer/service/tools.py)
    tool_call_parser: str = Field(
        "hermes", description="vLLM tool parser that reads tool_choice 'auto' calls back "
        "('' for none: 'auto' is then refused); it must match the chat template's call format"
    )
    tool_chat_template: str = Field(
        "auto", description="chat template for requests with tools or tool turns: 'auto' (the "
        "model's own if it renders tools, else Steer's ChatML/Hermes one), 'model', 'steer', "
        "or a path to a Jinja template"
    )

    # Limits
    max_concurrent_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=0)
    max_n: int = Field(16, ge=1)
    max_tokens_cap: int = Field(4096, ge=1)
    max_body_bytes: int = Field(2**20, ge=1024, description="larger bodies: 413")
    max_messages: int = Field(512, ge=1, description="messages in one chat request")
    max_prompt_chars: int = Field(
        131072, ge=1, description="characters of prompt text in one request (all messages)"
    )
    max_prompts: int = Field(64, ge=1, description="prompts in one /v1/completions request")
    # Admission weighs work: tokens the engine may be asked to process (see admission.py).
    max_inflight_tokens: int = Field(262_144, ge=1)
    max_heavy_share: float = Field(
        0.75, gt=0, le=1, description="share of the work amplified requests may hold"
    )
    max_key_share: float = Field(
        0.5, gt=0, le=1, description="share of the work one API key or user may hold"
    )
    sse_send_timeout_s: float = Field(
        30.0, gt=0, description="a stream whose client stops reading this long is cut off"
    )
    drain_timeout_s: float = Field(30.0, ge=0)

    # Steering: server-wide caps on one request's budget (requests may ask for less)
    steer_max_model_calls: int = Field(512, ge=1)
    steer_max_total_tokens: int = Field(262144, ge=1)
    steer_timeout_s: float = Field(300.0, gt=0)
    templates_dir: Path | None = Field(None, description="extra prompt templates (*.toml)")
    no_batching: bool = Field(False, description="benchmarks only: one sequence per call")
    trace_store_size: int = Field(256, ge=0)
    trace_store_bytes: int = Field(64 * 2**20, ge=0, description="serialized traces kept")
    trace_ttl_s: float = Field(3600.0, gt=0)

    # The store (steer/store/) and the amplification loop (steer/training/)
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; unset: SQLite at <cache_dir>/steer.db"
    )
    store: Literal["off", "steered", "all"] = Field(
        "off", description="store chat completions without `store: true`: steered ones, or all"
    )
    max_file_bytes: int = Field(64 * 2**20, ge=1024, description="largest upload to /v1/files")
    fine_tuning: bool = Field(True, description="run an embedded training worker")
    worker_threads: int = Field(1, ge=1, description="torch threads of a training worker")
    adapter_sync_s: float = Field(
        2.0, gt=0, description="how often the server loads adapters the store says are ready"
    )

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _parse_lora_modules(cls, value: object) -> object:
        return parse_lora_modules(value)

    @field_validator("tool_chat_template")
    @classmethod
    def _template_exists(cls, value: str) -> str:
        if value not in ("auto", "model", "steer") and not Path(value).expanduser().is_file():
            raise ValueError(f"tool_chat_template: no such file {value!r} (or auto, model, "
                             "steer)")
        return value

    @model_validator(mode="after")
    def _check_lora(self) -> Settings:
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        return self

    def lora_enabled(self) -> bool:
        return (self.enable_lora or self.fine_tuning or bool(self.lora_modules)
                or self.admin_key is not None)

    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.cache_dir.expanduser()}/steer.db"

    def adapters_dir(self) -> Path:
        return (self.adapter_root or self.cache_dir / "adapters").expanduser()

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return Path(self.model).name or self.model
        return DEFAULT_MODEL_NAME


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts for max_lora_rank


def parse_lora_modules(value: object) -> object:
    """`NAME=PATH` pairs as a list (repeated `--lora`), one string separated by commas or
    spaces (`STEER_LORA_MODULES`), or JSON (an object, or vLLM's list of {name, path})."""
    if isinstance(value, str):
        text = value.strip()
        is_json = text.startswith(("{", "["))
        value = json.loads(text) if is_json else text.replace(",", " ").split()
    if isinstance(value, list):
        pairs: dict[str, str] = {}
        for item in value:
            if isinstance(item, dict):
                name, path = item.get("name"), item.get("path")
            elif isinstance(item, str) and "=" in item:
                name, _, path = item.partition("=")
            else:
                raise ValueError(f"expected NAME=PATH, got {item!r}")
            if not name or not path:
                raise ValueError(f"expected NAME=PATH, got {item!r}")
            if name in pairs:
                raise ValueError(f"adapter {name!r} is given twice")
            pairs[str(name)] = str(path)
        return pairs
    return value
