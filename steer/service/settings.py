"""Server settings: read once from the environment (prefix `STEER_`) and CLI flags, then frozen.

Per-request knobs never live here; they are fields of the validated request.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    enable_lora: bool = False
    max_loras: int = Field(4, ge=1)
    max_lora_rank: int = Field(16, ge=1)

    # Limits
    max_concurrent_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=0)
    max_n: int = Field(16, ge=1)
    max_tokens_cap: int = Field(4096, ge=1)
    drain_timeout_s: float = Field(30.0, ge=0)

    # Steering: server-wide caps on one request's budget (requests may ask for less)
    steer_max_model_calls: int = Field(512, ge=1)
    steer_max_total_tokens: int = Field(262144, ge=1)
    steer_timeout_s: float = Field(300.0, gt=0)
    templates_dir: Path | None = Field(None, description="extra prompt templates (*.toml)")
    no_batching: bool = Field(False, description="benchmarks only: one sequence per call")
    trace_store_size: int = Field(256, ge=0)
    trace_ttl_s: float = Field(3600.0, gt=0)

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return Path(self.model).name or self.model
        return DEFAULT_MODEL_NAME
