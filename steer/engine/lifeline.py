"""The vLLM engine's processes die with the Steer server that started them.

vLLM runs its engine core in a process of its own, and the workers under it. The workers
watch a pipe from the engine core and leave when it dies, but the engine core watches
nothing: when the server is killed without a word (the kernel's OOM killer, a supervisor's
SIGKILL, a SIGTERM whose drain outlasted the supervisor's grace period), nobody stops it, and
engine core and workers live on as orphans holding the model and the KV cache (GBs).

`prctl(PR_SET_PDEATHSIG)` does not fit: it fires when the *thread* that started the child
exits, not the process, and Steer builds its engine in a short-lived loader thread, so the
engine core would be killed right after loading; it also covers only the direct parent.

Instead the server names itself, pid and start time, in `STEER_SERVER_PID` before vLLM starts
its processes (`export_server`). Every vLLM process loads Steer's plugin
(`steer.engine.vllm_patches.apply`), which calls `watch_server`: a daemon thread waits on a
pidfd of the server (a pid the kernel reuses can't fool it, the start time is checked once)
and, when the server is gone, kills this process's children and then itself with SIGKILL.
Nobody is left to answer, so there is nothing to shut down gracefully; multiprocessing's
resource tracker removes the shared memory once the last of them is gone. Processes forked
(not spawned) from a watched process get their own watcher through an at-fork hook, since a
fork child inherits no threads and vLLM does not run its plugins again in it.

Outside a Steer server's process tree (no `STEER_SERVER_PID`) this does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)

ENV = "STEER_SERVER_PID"
POLL_S = 0.5  # only where pidfds are missing (Linux < 5.3)

_watching_in: int | None = None  # the pid of the process whose watcher is running
_fork_hook = False


@dataclass(frozen=True)
class ServerId:
    """A process, told apart from a later one with the same pid by its start time."""

    pid: int
    started: float

    def __str__(self) -> str:
        return f"{self.pid}:{self.started!r}"

    @classmethod
    def parse(cls, text: str) -> ServerId:
        pid, _, started = text.partition(":")
        return cls(int(pid), float(started))

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return bool(proc.create_time() == self.started
                        and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False


def export_server() -> ServerId:
    """Make this process the server that the vLLM processes started from now on must not
    outlive (they inherit the environment)."""
    me = ServerId(os.getpid(), psutil.Process().create_time())
    os.environ[ENV] = str(me)
    return me


def watch_server() -> None:
    """In a process of a Steer server's tree: end this process and its children once the
    server is gone. Idempotent; nothing in the server itself or outside such a tree."""
    global _watching_in, _fork_hook
    text = os.environ.get(ENV)
    if not text or _watching_in == os.getpid():
        return
    server = ServerId.parse(text)
    _watching_in = os.getpid()
    if not _fork_hook:
        os.register_at_fork(after_in_child=watch_server)
        _fork_hook = True
    if server.pid == os.getpid():
        return
    threading.Thread(target=_watch, args=(server,), name="steer-lifeline", daemon=True).start()


def _watch(server: ServerId) -> None:
    try:
        pidfd = os.pidfd_open(server.pid)
    except ProcessLookupError:
        _die(server)
        return
    except OSError:  # no pidfds in this kernel: poll
        while server.alive():
            time.sleep(POLL_S)
        _die(server)
        return
    # subtle: checked after opening the pidfd, so the fd is known to be the server's own.
    if server.alive():
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has exited
        poller.poll()
    _die(server)


def _die(server: ServerId) -> None:
    logger.warning("steer server (pid %d) is gone: killing this engine process (pid %d) and "
                   "its children", server.pid, os.getpid())
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    os.kill(os.getpid(), signal.SIGKILL)
