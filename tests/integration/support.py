"""Helpers for the integration tests: real `steer serve` processes, clients for them, and
Prometheus scraping.

Owns spawning, readiness polling and teardown of server processes (`ServerFactory` stops
whatever a session started); the fixtures that use them live in `conftest.py`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from steer.engine.default_model import DEFAULT_MODEL_NAME, checkpoint_dir
from steer.service.settings import Settings

MODEL = DEFAULT_MODEL_NAME
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
# Hang detectors, not performance expectations: this CPU machine is shared and slow.
STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0

ChatTokenCounter = Callable[[Sequence[Mapping[str, object]]], int]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def model_dir() -> Path:
    """Where `steer serve` puts the converted default model (same settings as the server)."""
    return checkpoint_dir(Settings().cache_dir)  # type: ignore[call-arg]  # env-filled


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds (a hang detector)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class HealthObservation:
    """One `/health` poll: status None when nothing was listening yet."""

    status: int | None
    body_status: str | None


@dataclass
class ServerProcess:
    """A `steer serve` subprocess in its own session (so its engine children can be reaped)."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log: IO[bytes]
    health_seen: list[HealthObservation] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def fail(self, why: str) -> AssertionError:
        return AssertionError(f"{why}\n--- server log tail ({self.log_path}) ---\n"
                              f"{self.log_tail()}")

    def poll_health(self) -> HealthObservation:
        try:
            r = httpx.get(f"{self.url}/health", timeout=5)
        except httpx.TransportError:
            return HealthObservation(None, None)
        body = r.json()
        return HealthObservation(r.status_code, body.get("status"))

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poll /health until 200, recording every answer in `health_seen`."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"steer serve exited with {self.proc.returncode} during startup")
            seen = self.poll_health()
            self.health_seen.append(seen)
            if seen.status == 200:
                return
            if time.monotonic() > deadline:
                raise self.fail(f"steer serve not ready after {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, then SIGKILL the whole process group; return the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout)
            self.kill_leftovers()
        finally:
            self.log.close()
        return self.proc.returncode

    def kill_leftovers(self) -> None:
        # The server runs in its own session: its pid is the group id, and any engine process
        # it left behind is still in that group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def steer_command() -> Path:
    """The `steer` script of the virtualenv running the tests."""
    return Path(sys.executable).parent / "steer"


def spawn_server(log_dir: Path, *extra_args: str) -> ServerProcess:
    """Start `steer serve` on a free port; does not wait for it to be ready."""
    port = free_port()
    log_path = log_dir / f"steer-{port}.log"
    log = log_path.open("wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    cmd = [str(steer_command()), "serve", "--port", str(port), *extra_args]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    return ServerProcess(proc=proc, port=port, log_path=log_path, log=log)


class ServerFactory:
    """Starts extra servers and guarantees they are stopped at the end of the session."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ServerProcess] = []

    def start(self, *args: str) -> ServerProcess:
        server = spawn_server(self.log_dir, *args)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            if not server.log.closed:
                server.stop()


def openai_client(server: ServerProcess, timeout: float = 120) -> openai.OpenAI:
    # No retries: a retried 429/5xx would hide exactly what these tests look at.
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=timeout
    )


# -- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """One scrape of /metrics: sample name + labels -> value."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


def scrape(http: httpx.Client) -> Metrics:
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    return Metrics(samples)


def engine_idle(http: httpx.Client) -> bool:
    m = scrape(http)
    return (m.get("steer_engine_requests_running") == 0
            and m.get("steer_requests_in_flight") == 0)


def error_of(response: httpx.Response) -> dict[str, object]:
    """The OpenAI error object of a response, checking its shape on the way."""
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, object] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error
