"""Shared plumbing for the strategy benchmarks and evaluations in loadtests/.

Starts and stops servers as subprocess groups on free 127.0.0.1 ports (Steer via its CLI,
vLLM's own OpenAI server, an optillm proxy), waits for /health, samples their memory, and
formats markdown tables and Wilson intervals. It talks to servers over HTTP only and never
imports `steer`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS_DIR = ROOT / "loadtests" / "results"
MODEL = "smollm2-135m-instruct"
T = TypeVar("T")
DEFAULT_CACHE = os.environ.get("STEER_CACHE_DIR", str(Path.home() / ".cache/steer"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    port: int
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> float:
        """Start the process group and wait for GET /health == 200; returns seconds taken."""
        t0 = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._sample, daemon=True).start()
        with httpx.Client(trust_env=False, timeout=5) as http:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); "
                                       f"see {self.log}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.base_url}/health").status_code == 200:
                        return time.monotonic() - t0
                time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log}")

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: (HTTP front-end process, engine processes below it)."""
        secs = []
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                secs.append(sum(p.cpu_times()[:2]))
        return (secs[0], sum(secs[1:])) if secs else (0.0, 0.0)

    def rss_by_process(self) -> list[tuple[int, str, int]]:
        """(pid, name, resident bytes) of every process in the tree now."""
        out = []
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                out.append((p.pid, p.name(), p.memory_info().rss))
        return out

    def rss(self) -> int:
        """Resident memory of the whole process tree now, in bytes."""
        return sum(rss for _, _, rss in self.rss_by_process())

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak_rss = max(self.peak_rss, self.rss())

    def stop(self) -> None:
        self._stop.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        procs = self.tree()
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for p in procs:  # children that left the group (none expected)
            with contextlib.suppress(psutil.Error):
                p.kill()


def base_env() -> dict[str, str]:
    """The environment for servers: offline, no STEER_* leaking in, no HTTP proxies."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STEER_") and "proxy" not in k.lower()}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                  "VLLM_CPU_KVCACHE_SPACE": "2", "NO_PROXY": "127.0.0.1,localhost"}


def prepare_model(cache_dir: str) -> str:
    out = subprocess.run([str(BIN / "steer"), "models", "prepare", "--cache-dir", cache_dir],
                         check=True, capture_output=True, text=True, timeout=1800).stdout
    return out.strip().splitlines()[-1].strip()


def steer_server(name: str, cache_dir: str, logdir: Path, *extra: str,
                 kv_cache_gib: int = 2) -> Server:
    port = free_port()
    cmd = [str(BIN / "steer"), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--kv-cache-gib", str(kv_cache_gib), *extra]
    return Server(name, port, cmd, base_env() | {"STEER_CACHE_DIR": cache_dir},
                  logdir / f"{name}.log")


def vllm_server(name: str, model_path: str, logdir: Path, kv_cache_gib: int = 2) -> Server:
    """vLLM's own OpenAI server with the engine settings Steer uses on CPU."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model_path, "--served-model-name", MODEL, "--dtype", "bfloat16",
           "--max-model-len", "8192", "--enforce-eager", "--enable-prefix-caching",
           "--max-num-seqs", "128", "--no-enable-chunked-prefill",
           "--max-num-batched-tokens", "8192", "--host", "127.0.0.1", "--port", str(port),
           "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    env = base_env() | {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    return Server(name, port, cmd, env, logdir / f"{name}.log")


def async_client(port: int, timeout: float) -> AsyncOpenAI:
    http = DefaultAsyncHttpxClient(trust_env=False)  # 127.0.0.1 only: never via a proxy
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                       max_retries=0, timeout=timeout, http_client=http)


def steering_usage(resp: Any) -> dict[str, Any]:
    extra = (resp.usage.model_extra or {}) if resp.usage else {}
    return dict(extra.get("steering") or {})


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks stop the servers."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
            "mem_available_gib": psutil.virtual_memory().available / 2**30,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def add_server_args(p: argparse.ArgumentParser, request_timeout: float) -> None:
    """The options of a script that starts its own Steer (or uses a running one)."""
    p.add_argument("--port", type=int, default=0,
                   help="use a running Steer on this port instead of starting one")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--start-timeout", type=float, default=400)
    p.add_argument("--request-timeout", type=float, default=request_timeout)
    p.add_argument("--deadline-min", type=float, default=60,
                   help="stop starting requests after this many minutes")


def run_on_steer(args: argparse.Namespace, name: str,
                 work: Callable[[int], Coroutine[Any, Any, T]]) -> tuple[T, dict[str, Any]]:
    """`work(port)` against args.port, or against a Steer started (and stopped) here; returns
    its result and the run's facts (machine, elapsed seconds, the server's peak RSS)."""
    on_sigterm()
    server: Server | None = None
    t0 = time.monotonic()
    try:
        port = args.port
        if not port:
            prepare_model(args.cache_dir)
            server = steer_server(name, args.cache_dir, RESULTS_DIR,
                                  kv_cache_gib=args.kv_cache_gib)
            print(f"starting steer on :{server.port} (log {server.log})", flush=True)
            server.start(args.start_timeout)
            port = server.port
        result = asyncio.run(work(port))
    finally:
        if server:
            server.stop()
    return result, {"machine": machine(), "elapsed_s": time.monotonic() - t0,
                    "peak_rss_mib": server.peak_rss / 2**20 if server else None}
