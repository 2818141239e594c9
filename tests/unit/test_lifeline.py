"""The lifeline: processes of a server's tree die with the server, not with a thread.

A stand-in "server" (a plain Python process, no vLLM) exports itself and starts a child from
a short-lived thread, as Steer builds its engine; the child runs `watch_server` as vLLM's
processes do through Steer's plugin, and starts a grandchild of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from steer.engine import lifeline

CHILD = textwrap.dedent("""
    import subprocess, sys, time
    from steer.engine import lifeline
    lifeline.watch_server()
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(grandchild.pid, flush=True)
    time.sleep(120)
""")

SERVER = textwrap.dedent(f"""
    import subprocess, sys, threading, time
    from steer.engine import lifeline
    lifeline.export_server()
    lifeline.watch_server()  # the server itself: no watcher
    def start():
        child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE)
        print(child.pid, child.stdout.readline().decode().strip(), flush=True)
    loader = threading.Thread(target=start)
    loader.start()
    loader.join()
    print(threading.active_count(), flush=True)
    time.sleep(120)
""")


@pytest.fixture
def server() -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if k != lifeline.ENV}
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the test left alive
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _line(proc: subprocess.Popen[bytes]) -> list[int]:
    assert proc.stdout is not None
    return [int(x) for x in proc.stdout.readline().split()]


def test_children_outlive_the_thread_that_started_them_and_die_with_the_server(
    server: subprocess.Popen[bytes],
) -> None:
    child_pid, grandchild_pid = _line(server)
    [threads] = _line(server)
    assert threads == 1  # the loader thread has ended; the server runs no watcher itself
    family = [psutil.Process(child_pid), psutil.Process(grandchild_pid)]
    time.sleep(1.0)
    assert all(p.is_running() for p in family)

    server.kill()
    server.wait()
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, alive


def test_a_reused_pid_is_not_the_server() -> None:
    me = lifeline.ServerId(os.getpid(), psutil.Process().create_time())
    assert me.alive()
    assert not lifeline.ServerId(me.pid, me.started - 1.0).alive()
    assert lifeline.ServerId.parse(str(me)) == me


def test_outside_a_server_tree_nothing_is_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lifeline.ENV, raising=False)
    before = threading.active_count()
    lifeline.watch_server()
    assert threading.active_count() == before
