"""The hostile clients of bench_hostile.py, and the run state every client shares.

Attackers cycle through the body-borne attacks; slow readers stall streams; droppers send a
request and hang up before the response; flooders send amplified best-of-16 streams. Every
request has a timeout and every loop a bound in count and time; whatever the server does
(refuse, hang, reset, die) becomes an `Outcome` label, never an exception here.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from harness import Server
from hostile_attacks import (
    ADMITTED,
    CLIENT_CLOSED,
    CONN_ERROR,
    DROPPED,
    FLOODED,
    STALL_CUT,
    STALL_DONE,
    STALL_OPEN,
    STALLED,
    TIMEOUT,
    UPLOAD_CUT,
    Attack,
    flood_body,
    long_stream_body,
)
from hostile_report import Outcome

MAX_PER_WORKER = 5000  # a bound on every loop, far above what a phase reaches
CAP = 64 * 1024  # bytes of a response body kept (an error may echo a 20 MB input back)
FAILURES = (httpx.HTTPError, OSError, TimeoutError)


@dataclass
class Run:
    """One benchmark run: its options, the server, the phase, and everything recorded."""

    args: argparse.Namespace
    port: int
    server: Server | None
    attacks: list[Attack]
    contacts: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)
    died: dict[str, Any] | None = None
    guard_fired_gib: float | None = None
    peak_rss: dict[str, int] = field(default_factory=dict)  # phase -> bytes, every 0.25 s
    peak_procs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # at that peak
    phase: str = "warm-up"
    phase_end: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # the phase is over
    dead: asyncio.Event = field(default_factory=asyncio.Event)  # the server is gone

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, kind: str, out: Outcome) -> None:
        self.outcomes.setdefault(kind, []).append(out)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        kw.setdefault("timeout", self.args.request_timeout)
        return httpx.AsyncClient(base_url=self.url, trust_env=False, **kw)


def failure(exc: BaseException) -> str:
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return TIMEOUT
    if isinstance(exc, httpx.WriteError):  # the server stopped reading an upload
        return UPLOAD_CUT
    return CONN_ERROR


def error_param(body: bytes) -> str | None:
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    param = err.get("param") if isinstance(err, dict) else None
    return str(param) if param is not None else None


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 2**20):
        yield body[i:i + 2**20]


async def send(run: Run, http: httpx.AsyncClient, attack: Attack) -> Outcome:
    """One attack request, its response read up to CAP bytes."""
    t0 = time.perf_counter()
    content = chunks(attack.body) if attack.chunked else attack.body
    try:
        async with asyncio.timeout(run.args.request_timeout):
            async with http.stream("POST", attack.path, content=content,
                                   headers={"content-type": "application/json"}) as r:
                body = b""
                async for piece in r.aiter_raw():
                    body += piece
                    if len(body) >= CAP:
                        break
        return Outcome(str(r.status_code), time.perf_counter() - t0, error_param(body))
    except FAILURES as exc:
        return Outcome(failure(exc), time.perf_counter() - t0, detail=repr(exc)[:200])


def rounds(run: Run) -> Iterator[Attack]:
    """Every chosen attack once per round, in a fresh seeded order each round; the attackers
    share this one iterator, so a round is spread over them and every kind is reached early."""
    rng = random.Random(run.args.seed)
    kinds = [a for a in run.attacks if a.group in run.args.groups]
    for _ in range(MAX_PER_WORKER):
        rng.shuffle(kinds)
        yield from kinds


async def attacker(run: Run, queue: Iterator[Attack]) -> None:
    async with run.client() as http:
        for attack in itertools.islice(queue, MAX_PER_WORKER):
            if run.stop.is_set():
                return
            run.record(attack.name, await send(run, http, attack))
            await asyncio.sleep(run.args.gap)


async def dropper(run: Run) -> None:
    """Every 2 s, 8 long streamed requests whose clients hang up before any response."""
    body = long_stream_body()
    for _ in range(MAX_PER_WORKER):
        if run.stop.is_set():
            return
        for out in await asyncio.gather(*(drop_unread(run, body) for _ in range(8))):
            run.record(DROPPED, out)
        await asyncio.sleep(2)


async def drop_unread(run: Run, body: bytes) -> Outcome:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(10):
            _, writer = await asyncio.open_connection("127.0.0.1", run.port)
            writer.write(head + body)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        return Outcome(failure(exc), time.perf_counter() - t0, detail=repr(exc)[:200])
    return Outcome(CLIENT_CLOSED, time.perf_counter() - t0)


async def slow_reader(run: Run) -> None:
    """Streams that stop being read (4 KB receive buffer): does the server cut them?"""
    small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    body = long_stream_body(top_logprobs=20)
    for _ in range(MAX_PER_WORKER):
        if run.stop.is_set() or time.monotonic() + run.args.stall + 5 > run.phase_end:
            return
        transport = httpx.AsyncHTTPTransport(socket_options=small)
        async with run.client(transport=transport) as http:
            run.record(STALLED, await stall_once(run, http, body))


async def stall_once(run: Run, http: httpx.AsyncClient, body: bytes) -> Outcome:
    t0 = time.perf_counter()
    req = http.build_request("POST", "/v1/chat/completions", content=body,
                             headers={"content-type": "application/json"})
    try:
        async with asyncio.timeout(run.args.request_timeout):
            r = await http.send(req, stream=True)
    except FAILURES as exc:
        return Outcome(failure(exc), time.perf_counter() - t0, detail=repr(exc)[:200])
    try:
        if r.status_code != 200:
            return Outcome(str(r.status_code), time.perf_counter() - t0)
        await asyncio.sleep(run.args.stall)
        tail, size = b"", 0
        try:
            async with asyncio.timeout(10):
                async for piece in r.aiter_raw():
                    tail, size = (tail + piece)[-4096:], size + len(piece)
        except TimeoutError:
            return Outcome(STALL_OPEN, time.perf_counter() - t0,
                           detail=f"{size} bytes read in 10 s after the stall")
        except (httpx.HTTPError, OSError) as exc:
            return Outcome(STALL_CUT, time.perf_counter() - t0,
                           detail=f"{size} bytes after the stall, then {exc!r}"[:200])
        done = b"[DONE]" in tail and b'"error"' not in tail
        # How much was still buffered says whether the stream outgrew the socket buffers.
        return Outcome(STALL_DONE if done else STALL_CUT, time.perf_counter() - t0,
                       detail=f"{size} bytes after the stall")
    finally:
        await r.aclose()


async def flooder(run: Run) -> None:
    body = flood_body()
    async with run.client() as http:
        for _ in range(MAX_PER_WORKER):
            if run.stop.is_set():
                return
            out = await flood_once(run, http, body)
            run.record(FLOODED, out)
            if out.label != ADMITTED:
                await asyncio.sleep(0.2)  # bounds the request rate (and our own CPU)


async def flood_once(run: Run, http: httpx.AsyncClient, body: bytes) -> Outcome:
    """An admitted flood request is read to its end or the phase's, as an attacker would."""
    t0 = time.perf_counter()
    req = http.build_request("POST", "/v1/chat/completions", content=body,
                             headers={"content-type": "application/json"})
    try:
        async with asyncio.timeout(run.args.request_timeout):
            r = await http.send(req, stream=True)
        try:
            if r.status_code != 200:
                async with asyncio.timeout(run.args.request_timeout):
                    err = await r.aread()
                return Outcome(str(r.status_code), time.perf_counter() - t0, error_param(err))
            stop = asyncio.create_task(run.stop.wait())
            drain = asyncio.create_task(consume(r))
            await asyncio.wait({stop, drain}, timeout=max(0.0, run.phase_end - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            for task in (stop, drain):
                task.cancel()
            await asyncio.gather(stop, drain, return_exceptions=True)
            return Outcome(ADMITTED, time.perf_counter() - t0)
        finally:
            await r.aclose()
    except FAILURES as exc:
        return Outcome(failure(exc), time.perf_counter() - t0, detail=repr(exc)[:200])


async def consume(r: httpx.Response) -> None:
    try:
        async for _ in r.aiter_raw():
            pass
    except (httpx.HTTPError, OSError):
        return
