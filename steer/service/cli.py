"""The `steer` command: `steer serve`, `steer worker`, `steer models prepare` and
`steer data export`.

Flags override `STEER_*` environment variables; both feed one frozen `Settings`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from steer.engine import Engine, InvalidAdapter
from steer.engine.default_model import ModelPrepError, prepare_default_model
from steer.engine.sequential import SequentialEngine
from steer.engine.vllm_engine import VllmEngine, VllmEngineConfig
from steer.service import data_export, worker_cli
from steer.service.adapters import build_registry
from steer.service.admission import Admission
from steer.service.app import create_app
from steer.service.settings import Settings

logger = logging.getLogger("steer")

# CLI flag -> Settings field, for `steer serve`.
SERVE_FLAGS: dict[str, dict[str, Any]] = {
    "host": {"help": "bind address (default 127.0.0.1)"},
    "port": {"type": int, "help": "port (default 8000)"},
    "model": {"help": "local HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)"},
    "served_model_name": {"help": "model name clients send (default: derived from the model)"},
    "cache_dir": {"help": "where the converted default model lives (~/.cache/steer)"},
    "max_model_len": {"type": int, "help": "context window in tokens (8192)"},
    "kv_cache_gib": {"type": float, "help": "KV cache size on CPU in GiB (2)"},
    "dtype": {"help": "weights dtype (bfloat16)"},
    "max_concurrent_requests": {"type": int, "help": "requests served at once (64)"},
    "max_queued_requests": {"type": int, "help": "requests waiting beyond that (256)"},
    "max_n": {"type": int, "help": "largest n a request may ask for (16)"},
    "max_tokens_cap": {"type": int, "help": "largest max_tokens a request may ask for (4096)"},
    "drain_timeout_s": {"type": float, "help": "SIGTERM: seconds to let requests finish (30)"},
    "max_body_bytes": {"type": int, "help": "larger request bodies get 413 (1048576)"},
    "max_messages": {"type": int, "help": "messages in one chat request (512)"},
    "max_prompt_chars": {"type": int, "help": "characters of prompt text per request (131072)"},
    "max_prompts": {"type": int, "help": "prompts in one /v1/completions request (64)"},
    "max_inflight_tokens": {"type": int,
                            "help": "work admitted at once, in engine tokens (262144)"},
    "max_heavy_share": {"type": float,
                        "help": "share of that work amplified requests may hold (0.75)"},
    "max_key_share": {"type": float, "help": "share of that work one `user` may hold (0.5)"},
    "sse_send_timeout_s": {"type": float,
                           "help": "cut off a stream whose client stops reading (30)"},
    "log_level": {"help": "debug, info, warning (info)"},
    "no_batching": {"action": "store_const", "const": True,
                    "help": "benchmarks only: send every sequence as its own call, one at a time"},
    "enable_lora": {"action": "store_const", "const": True,
                    "help": "serve LoRA adapters (on by itself with --lora or STEER_ADMIN_KEY)"},
    "max_loras": {"type": int, "help": "LoRA adapters resident in one batch (4)"},
    "max_lora_rank": {"type": int, "help": "largest LoRA rank accepted (16)"},
    "max_cpu_loras": {"type": int, "help": "LoRA adapters cached in memory (max-loras)"},
    "adapter_root": {"help": "runtime adapter loads must lie inside it (<cache-dir>/adapters)"},
    "adapter_unload_timeout_s": {"type": float,
                                 "help": "how long an unload waits for requests using it (30)"},
    "structured_outputs_backend": {"help": "vLLM structured-output backend: guidance, xgrammar "
                                           "or outlines (guidance)"},
    "tool_call_parser": {"help": "vLLM tool parser for tool_choice auto (hermes; '' for none)"},
    "tool_chat_template": {"help": "chat template for tools: auto, model, steer, or a path "
                                   "(auto: the model's own if it renders tools, else steer's)"},
}


def engine_config(settings: Settings, model_path: str) -> VllmEngineConfig:
    return VllmEngineConfig(
        model=model_path,
        served_model_name=settings.model_name(),
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=settings.enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_num_seqs=settings.max_num_seqs,
        enable_lora=settings.lora_enabled(),
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        max_cpu_loras=settings.max_cpu_loras,
        structured_outputs_backend=settings.structured_outputs_backend,
        tool_chat_template=settings.tool_chat_template,
    )


def resolve_model(settings: Settings) -> str:
    """A local checkpoint dir, or the default model (converted on first use)."""
    if settings.model:
        return settings.model
    return str(prepare_default_model(settings.cache_dir, progress=print))


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only: 127.0.0.0/8, ::1, localhost."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:  # a host name: it may resolve to anything
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def warn_if_exposed(settings: Settings) -> None:
    """A loud warning when the server listens beyond this machine with no API key: anyone
    who can reach the port can spend its model (the Docker image binds 0.0.0.0)."""
    if settings.api_key is None and not is_loopback(settings.host):
        logger.warning(
            "!!! steer is listening on %s with NO API KEY: anyone who can reach this port can "
            "use the model. Set STEER_API_KEY, or bind 127.0.0.1 (--host). !!!", settings.host
        )


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM first drains: new requests get 503, in-flight ones may finish
    within the drain timeout, then the server exits with status 0. A second signal forces."""

    def __init__(self, config: uvicorn.Config, admission: Admission, drain_timeout: float):
        super().__init__(config)
        self.admission = admission
        self.drain_timeout = drain_timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # subtle: not recorded in _captured_signals, so uvicorn does not re-raise the signal
        # after shutdown and the process exits 0.
        if self.admission.draining or self.loop is None:
            self.should_exit = True
            self.force_exit = self.admission.draining
            return
        logger.info("signal %s: draining (up to %.0fs)", signal.Signals(sig).name,
                    self.drain_timeout)
        self.admission.start_draining()
        self.loop.call_soon_threadsafe(lambda: self.loop and self.loop.create_task(self._drain()))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        while self.admission.in_flight and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.admission.in_flight:
            logger.warning("drain timeout: %d request(s) cut off", self.admission.in_flight)
        self.should_exit = True


def serve(settings: Settings) -> int:
    try:
        model_path = resolve_model(settings)
    except ModelPrepError as exc:
        print(f"steer: {exc}", file=sys.stderr)
        return 2
    engine: Engine = VllmEngine(engine_config(settings, model_path))
    if settings.no_batching:
        engine = SequentialEngine(engine)
    try:
        # Startup adapters are checked now, before the engine loads: a bad --lora fails fast.
        adapters = build_registry(settings, engine, Path(model_path), check_startup=True)
    except InvalidAdapter as exc:
        print(f"steer: --lora: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, engine, adapters)
    warn_if_exposed(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=5, access_log=False,
    )
    server = DrainingServer(config, app.state.admission, settings.drain_timeout_s)
    assert threading.current_thread() is threading.main_thread()
    worker = worker_cli.start_embedded(settings, model_path) if settings.fine_tuning else None
    try:
        server.run()
    finally:
        if worker is not None:
            worker_cli.stop_embedded(worker)
    return 0


def prepare(settings: Settings) -> int:
    try:
        path = prepare_default_model(settings.cache_dir, progress=print)
    except ModelPrepError as exc:
        print(f"steer: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steer", description="Steer: OpenAI-compatible inference-time steering over vLLM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    for name, kw in SERVE_FLAGS.items():
        serve_p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)
    serve_p.add_argument(
        "--lora", dest="lora_modules", action="append", default=None, metavar="NAME=PATH",
        help="serve the LoRA adapter at PATH as model NAME (repeatable; STEER_LORA_MODULES)",
    )
    models_p = sub.add_parser("models", help="manage models")
    models_sub = models_p.add_subparsers(dest="models_command", required=True)
    prep_p = models_sub.add_parser(
        "prepare", help="convert the embedded default model once (idempotent)"
    )
    prep_p.add_argument("--cache-dir", dest="cache_dir", default=None)
    data_export.add_parser(sub)
    worker_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data":  # its flags are not server settings
        return data_export.export(args, Settings())  # type: ignore[call-arg]  # env-filled
    if args.command == "worker":  # likewise
        return worker_cli.run(args)
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k not in ("command", "models_command")}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        return serve(settings)
    return prepare(settings)


if __name__ == "__main__":
    sys.exit(main())
