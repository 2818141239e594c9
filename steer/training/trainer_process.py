"""One trainer subprocess, seen from the worker: start `python -m steer.training.trainer
SPEC.json`, turn its JSON lines into callbacks, stop it when asked, and say why it failed.

The contract is the trainer's stdout protocol (`steer.training.trainer`): `step`, `eval`,
`checkpoint`, then `done` or `error` and a non-zero exit. Its stderr goes to a log file in
the job directory (a pipe nobody reads would fill and block it); the tail of that log is
the reason when it dies without an `error` event (a segfault, the OOM killer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

TRAINER = (sys.executable, "-m", "steer.training.trainer")
STDERR_TAIL = 1500  # characters of stderr quoted in a failure


class TrainerFailed(Exception):
    """The run ended without an adapter; the message says why."""


class TrainerStopped(Exception):
    """The run was stopped because `should_stop` said so (the job was cancelled)."""


OnEvent = Callable[[dict[str, Any]], Awaitable[None]]


async def run_trainer(
    spec_path: Path, *, on_event: OnEvent, should_stop: Callable[[], Awaitable[bool]],
    threads: int, command: Sequence[str] = TRAINER, poll_s: float = 1.0,
) -> dict[str, Any]:
    """Run the trainer on `spec_path`; return its `done` event. Every other event goes to
    `on_event` as it arrives. `should_stop` is polled every `poll_s` seconds; when it says
    so, the process group is killed and `TrainerStopped` raised."""
    log_path = spec_path.with_suffix(".stderr.log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *command, str(spec_path), stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
            start_new_session=True,  # its own group: a kill reaches anything it started
        )
        try:
            done, error = await _read(proc, on_event, should_stop, poll_s)
        except BaseException:
            _kill(proc)
            await proc.wait()
            raise
        code = await proc.wait()
    if done is not None and code == 0:
        return done
    if error is not None:
        raise TrainerFailed(error)
    raise TrainerFailed(f"the trainer {_exit(code)} without a result; stderr: "
                        f"{_tail(log_path) or '(empty)'}")


async def _read(proc: asyncio.subprocess.Process, on_event: OnEvent,
                should_stop: Callable[[], Awaitable[bool]], poll_s: float,
                ) -> tuple[dict[str, Any] | None, str | None]:
    assert proc.stdout is not None
    done: dict[str, Any] | None = None
    error: str | None = None
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(proc.stdout.readline())
            finished, _ = await asyncio.wait({pending}, timeout=poll_s)
            if not finished:
                if await should_stop():
                    raise TrainerStopped("the job was cancelled")
                continue
            line, pending = pending.result(), None
            if not line:
                return done, error
            event = _parse(line)
            if event is None:
                continue
            kind = event.get("event")
            if kind == "done":
                done = event
            elif kind == "error":
                error = str(event.get("message") or "the trainer reported an error")
            else:
                await on_event(event)
            if await should_stop():
                raise TrainerStopped("the job was cancelled")
    finally:
        if pending is not None:
            pending.cancel()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None  # the protocol is JSON lines only; anything else is not ours to act on
    return event if isinstance(event, dict) else None


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):  # it ended between the check and the kill
        os.killpg(proc.pid, signal.SIGKILL)


def _exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the out-of-memory killer?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


def _tail(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    return ("..." + text[-STDERR_TAIL:]) if len(text) > STDERR_TAIL else text
