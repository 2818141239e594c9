"""Hostile clients: can one client's abuse hurt another client's plain requests?

One live `steer serve` (default settings). A normal client streams plain chat requests one
after another (short prompts, max_tokens 32, greedy) for --seconds alone (baseline), then for
--seconds again while hostile clients send the attack set of issue 9 (loadtests/
hostile_attacks.py): ReDoS patterns (regex critic, `extract: "regex"`, the JSON-schema
`pattern` keyword), JSON-schema `$ref`s to a canary listener on 127.0.0.1 (which must never be
contacted) and to file:///etc/passwd, huge integers (n 10^9, agents 10^9, budgets 10^18, a
5,000-digit number), huge lists (100,000 prompts, messages, content parts, stop strings,
personas, few-shot examples; 1,000 prompts x n 16), huge bodies (20 MB with and without
Content-Length, JSON nested 100,000 deep), slow readers (streams whose reader takes the headers,
then stops reading for --stall seconds with a 4 KB receive buffer; requests dropped before the
response) and a flood of best_of_n n=16 x max_tokens 4096 streams. --attackers workers cycle
through the body-borne kinds in shuffled order (--gap seconds apart), --slow-readers and
--flood-workers run beside them (a flood worker that gets a 429 waits 0.2 s). Every loop is
bounded in time and count; every request has a timeout.

Throughout, /health is polled every 150 ms. Reported: the normal client's p50/p99 latency in
both phases and their ratio (target: p50 within 1.2x), the longest /health response (target:
< 1 s), each attack kind's outcomes (target: all refused with a 4xx/429, or run harmlessly
where that is right; 5xx, timeouts and connection errors counted apart), whether the canary
listener was contacted, requests still in flight once the attackers stop, whether the server
survived, and the server's peak memory (RSS of its process tree; a guard kills the server if it
passes --rss-limit-gib, so that a runaway can't take the machine). Target misses are reported,
not failed: the exit status is non-zero only when the benchmark itself fails. JSON in
loadtests/results/bench_hostile.json. Traffic goes to 127.0.0.1 only.

Run:  .venv/bin/python loadtests/bench_hostile.py            (~6 min + startup: 2 x 150 s)
      .venv/bin/python loadtests/bench_hostile.py --quick    (smoke run: 2 x 20 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from harness import (
    MODEL,
    RESULTS_DIR,
    Server,
    add_server_args,
    machine,
    on_sigterm,
    prepare_model,
    steer_server,
)
from hostile_attacks import (
    ADMITTED,
    CLIENT_CLOSED,
    CONN_ERROR,
    FLOOD,
    GROUPS,
    SLOW,
    STALL_CUT,
    STALL_DONE,
    STALL_OPEN,
    TIMEOUT,
    UPLOAD_CUT,
    Attack,
    catalogue,
    flood_body,
    long_stream_body,
)
from hostile_report import Outcome, report

RESULTS = RESULTS_DIR / "bench_hostile.json"
NORMAL_PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 7 times 8?",
                  "Give me a word that rhymes with cat.", "What day comes after Monday?",
                  "Name a large animal.", "What is water made of?", "Say hello in Spanish."]
STALLED = "stalled stream (reads headers, then stops)"
DROPPED = "dropped before the response (x8)"
FLOODED = "best_of_n n 16 x 4096 tokens, streamed"
MAX_PER_WORKER = 5000  # a bound on every loop, far above what a phase reaches
CAP = 64 * 1024  # bytes of a response body kept (an error may echo a 20 MB input back)


@dataclass
class Run:
    """Shared state of one benchmark run: clients, the server, and everything recorded."""

    args: argparse.Namespace
    port: int
    server: Server | None
    attacks: list[Attack]
    listener_port: int
    contacts: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)
    died: dict[str, Any] | None = None
    guard_fired: float | None = None
    phase: str = "startup"
    peak_rss: dict[str, int] = field(default_factory=dict)
    dead: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    phase_end: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, kind: str, out: Outcome) -> None:
        self.outcomes.setdefault(kind, []).append(out)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, trust_env=False,
                                 timeout=self.args.request_timeout, **kw)


def failure(exc: BaseException) -> str:
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return TIMEOUT
    if isinstance(exc, httpx.WriteError):
        return UPLOAD_CUT
    return CONN_ERROR


def error_param(body: bytes) -> str | None:
    try:
        err = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        return None
    return str(err.get("param")) if isinstance(err, dict) else None


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 2**20):
        yield body[i:i + 2**20]


async def send(run: Run, http: httpx.AsyncClient, attack: Attack) -> Outcome:
    """One attack request, its body read up to CAP; never raises for the server's doing."""
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
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        return Outcome(failure(exc), time.perf_counter() - t0)


async def normal_once(run: Run, http: httpx.AsyncClient, i: int) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user",
                                          "content": NORMAL_PROMPTS[i % len(NORMAL_PROMPTS)]}],
            "max_tokens": run.args.max_tokens, "temperature": 0, "stream": True,
            "user": "normal"}
    t0 = time.perf_counter()
    row: dict[str, Any] = {"t": time.monotonic(), "phase": run.phase, "ttft": None}
    label, done = "no [DONE]", False
    try:
        async with asyncio.timeout(run.args.request_timeout):
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    label = str(r.status_code)
                else:
                    async for line in r.aiter_lines():
                        data = line.removeprefix("data:").strip()
                        if not line.startswith("data:") or not data:
                            continue
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            label = "error event"
                        elif row["ttft"] is None and any(
                                (c.get("delta") or {}).get("content")
                                for c in chunk.get("choices") or []):
                            row["ttft"] = time.perf_counter() - t0
                    if done and label == "no [DONE]":
                        label = "ok"
    except ValueError:
        label = "bad stream"
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        label = failure(exc)
    return row | {"latency": time.perf_counter() - t0, "label": label}


async def normal_client(run: Run, rows: list[dict[str, Any]]) -> None:
    async with run.client() as http:
        for i in range(MAX_PER_WORKER):
            if run.stop.is_set():
                return
            rows.append(await normal_once(run, http, i))


async def health_poller(run: Run, rows: list[dict[str, Any]]) -> None:
    async with run.client(timeout=run.args.health_timeout) as http:
        for _ in range(100_000):
            if run.stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                label = str((await http.get("/health")).status_code)
            except (httpx.HTTPError, OSError) as exc:
                label = failure(exc)
            dt = time.perf_counter() - t0
            rows.append({"t": time.monotonic(), "phase": run.phase, "latency": dt,
                         "label": label})
            await asyncio.sleep(max(0.0, 0.15 - dt))


async def attacker(run: Run, wid: int) -> None:
    rng = random.Random(run.args.seed + wid)
    kinds = [a for a in run.attacks if a.group in run.args.groups]
    async with run.client(limits=httpx.Limits(max_connections=8)) as http:
        for _ in range(MAX_PER_WORKER):
            rng.shuffle(kinds)
            for attack in kinds:
                if run.stop.is_set():
                    return
                run.record(attack.name, await send(run, http, attack))
                await asyncio.sleep(run.args.gap)
            if SLOW in run.args.groups and not run.stop.is_set():
                for out in await asyncio.gather(*(drop_unread(run) for _ in range(8))):
                    run.record(DROPPED, out)


async def drop_unread(run: Run) -> Outcome:
    """Send a long streamed request on a raw socket and close it before any response."""
    body = long_stream_body()
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
        return Outcome(failure(exc), time.perf_counter() - t0)
    return Outcome(CLIENT_CLOSED, time.perf_counter() - t0)


async def slow_reader(run: Run) -> None:
    """Streams that stop being read: does the server cut them (and free their slot)?"""
    small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    body = long_stream_body()
    for _ in range(MAX_PER_WORKER):
        if run.stop.is_set() or time.monotonic() + run.args.stall + 15 > run.phase_end:
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
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        return Outcome(failure(exc), time.perf_counter() - t0)
    try:
        if r.status_code != 200:
            return Outcome(str(r.status_code), time.perf_counter() - t0)
        await asyncio.sleep(run.args.stall)
        text = b""
        try:
            async with asyncio.timeout(10):
                async for piece in r.aiter_raw():
                    text = (text + piece)[-4096:]
        except TimeoutError:
            return Outcome(STALL_OPEN, time.perf_counter() - t0)
        except (httpx.HTTPError, OSError):
            return Outcome(STALL_CUT, time.perf_counter() - t0)
        done = b"[DONE]" in text and b'"error"' not in text
        return Outcome(STALL_DONE if done else STALL_CUT, time.perf_counter() - t0)
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
                await asyncio.sleep(0.2)


async def flood_once(run: Run, http: httpx.AsyncClient, body: bytes) -> Outcome:
    """An admitted flood request is read to its end or the phase's end, as an attacker would."""
    t0 = time.perf_counter()
    req = http.build_request("POST", "/v1/chat/completions", content=body,
                             headers={"content-type": "application/json"})
    try:
        async with asyncio.timeout(run.args.request_timeout):
            r = await http.send(req, stream=True)
        try:
            if r.status_code != 200:
                return Outcome(str(r.status_code), time.perf_counter() - t0,
                               error_param(await r.aread()))
            stop = asyncio.create_task(run.stop.wait())
            drain = asyncio.create_task(consume(r))
            await asyncio.wait({stop, drain}, timeout=run.args.seconds + 60,
                               return_when=asyncio.FIRST_COMPLETED)
            for task in (stop, drain):
                task.cancel()
            return Outcome(ADMITTED, time.perf_counter() - t0)
        finally:
            await r.aclose()
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        return Outcome(failure(exc), time.perf_counter() - t0)


async def consume(r: httpx.Response) -> None:
    try:
        async for _ in r.aiter_raw():
            pass
    except (httpx.HTTPError, OSError):
        return


async def watchdog(run: Run) -> None:
    """Server death and memory: peak RSS per phase, and the guard that kills a runaway."""
    limit = run.args.rss_limit_gib * 2**30
    while run.server is not None and not run.dead.is_set():
        proc = run.server.proc
        if proc is not None and proc.poll() is not None:
            run.died = {"phase": run.phase, "returncode": proc.returncode,
                        "t": time.monotonic()}
            run.dead.set()
            return
        rss = await asyncio.to_thread(run.server.rss)
        run.peak_rss[run.phase] = max(run.peak_rss.get(run.phase, 0), rss)
        if rss > limit and proc is not None and run.guard_fired is None:
            run.guard_fired = rss / 2**30
            print(f"memory guard: server at {run.guard_fired:.1f} GiB, killing it", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.sleep(0.25)


async def canary(run: Run) -> asyncio.Server:
    """An HTTP listener a correct server never contacts; it answers like a schema host."""
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = b""
        try:
            async with asyncio.timeout(2):
                line = await reader.readline()
        except (OSError, TimeoutError):
            pass
        run.contacts.append({"phase": run.phase, "request": line.decode("latin-1").strip()})
        body = b'{"type": "object"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        try:
            await writer.drain()
            writer.close()
        except OSError:
            pass

    return await asyncio.start_server(on_connect, "127.0.0.1", run.listener_port)


async def phase(run: Run, name: str, hostile: bool) -> dict[str, Any]:
    run.phase, run.stop = name, asyncio.Event()
    run.phase_end = time.monotonic() + run.args.seconds
    normal: list[dict[str, Any]] = []
    health: list[dict[str, Any]] = []
    tasks = [asyncio.create_task(normal_client(run, normal)),
             asyncio.create_task(health_poller(run, health))]
    if hostile:
        tasks += [asyncio.create_task(attacker(run, i)) for i in range(run.args.attackers)]
        if SLOW in run.args.groups:
            tasks += [asyncio.create_task(slow_reader(run))
                      for _ in range(run.args.slow_readers)]
        if FLOOD in run.args.groups:
            tasks += [asyncio.create_task(flooder(run)) for _ in range(run.args.flood_workers)]
    print(f"phase {name}: {run.args.seconds:.0f} s, {len(tasks)} clients", flush=True)
    died = asyncio.create_task(run.dead.wait())
    await asyncio.wait({died}, timeout=run.args.seconds)
    died.cancel()
    run.stop.set()
    grace = run.args.request_timeout + (run.args.stall + 15 if hostile else 0) + 5
    _, late = await asyncio.wait(tasks, timeout=grace)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # a bug in the benchmark itself is a harness failure
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return {"normal": normal, "health": health, "late_clients": len(late)}


async def after(run: Run) -> dict[str, Any]:
    """Once the attackers stop: does the server drain its slots and still answer?"""
    out: dict[str, Any] = {"in_flight": None, "engine_running": None, "drain_s": None}
    async with run.client(timeout=10) as http:
        t0 = time.monotonic()
        while time.monotonic() - t0 < run.args.drain_wait and not run.dead.is_set():
            try:
                text = (await http.get("/metrics")).text
            except (httpx.HTTPError, OSError):
                await asyncio.sleep(1)
                continue
            out["in_flight"] = gauge(text, "steer_requests_in_flight")
            out["engine_running"] = gauge(text, "steer_engine_requests_running")
            if not out["in_flight"] and not out["engine_running"]:
                out["drain_s"] = time.monotonic() - t0
                break
            await asyncio.sleep(1)
        run.phase = "after"
        out["serves"] = (await normal_once(run, http, 0))["label"] == "ok"
    return out


def gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def bench(run: Run) -> dict[str, Any]:
    listener = await canary(run)
    guard = asyncio.create_task(watchdog(run))
    try:
        async with run.client() as http:
            for i in range(3):  # first-request costs out of the way
                await normal_once(run, http, i)
        results = {"baseline": await phase(run, "baseline", hostile=False)}
        results["attack"] = await phase(run, "attack", hostile=True)
        results["after"] = await after(run)
    finally:
        run.dead.set()
        await guard
        listener.close()
    return results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(p, request_timeout=30)
    p.add_argument("--seconds", type=float, default=150, help="length of each phase")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 s phases, short stalls")
    p.add_argument("--max-tokens", type=int, default=32, help="the normal client's")
    p.add_argument("--attackers", type=int, default=3)
    p.add_argument("--slow-readers", type=int, default=4)
    p.add_argument("--flood-workers", type=int, default=4)
    p.add_argument("--stall", type=float, default=60, help="seconds a slow reader stops reading")
    p.add_argument("--gap", type=float, default=0.05, help="pause between one attacker's requests")
    p.add_argument("--groups", type=lambda s: [g.strip() for g in s.split(",")],
                   default=list(GROUPS),
                   help="attack groups, comma-separated: " + ", ".join(GROUPS))
    p.add_argument("--health-timeout", type=float, default=30)
    p.add_argument("--drain-wait", type=float, default=30,
                   help="after the attacks: how long to wait for in-flight requests to end")
    p.add_argument("--rss-limit-gib", type=float, default=10,
                   help="kill the server if its process tree passes this")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `steer serve` argument (repeatable)")
    p.add_argument("--server-env", action="append", default=[],
                   help="KEY=VALUE for the server's environment (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if unknown := set(args.groups) - set(GROUPS):
        p.error(f"unknown attack groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    if args.quick:
        args.seconds, args.stall = 20, 5
    return args


def main() -> int:
    args = parse_args()
    on_sigterm()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    server: Server | None = None
    port = args.port
    t0 = time.monotonic()
    try:
        if not port:
            prepare_model(args.cache_dir)
            server = steer_server("bench_hostile", args.cache_dir, RESULTS_DIR,
                                  *args.server_arg, kv_cache_gib=args.kv_cache_gib)
            server.env |= dict(kv.split("=", 1) for kv in args.server_env)
            print(f"starting steer on :{server.port} (log {server.log})", flush=True)
            server.start(args.start_timeout)
            port = server.port
        with socket.socket() as sock:  # the canary's port: free now, bound again just after
            sock.bind(("127.0.0.1", 0))
            listener_port = int(sock.getsockname()[1])
        run = Run(args, port, server, catalogue(listener_port), listener_port)
        results = asyncio.run(bench(run))
    finally:
        if server:
            server.stop()
    results |= {
        "outcomes": {k: [o.__dict__ for o in v] for k, v in run.outcomes.items()},
        "expect": {a.name: sorted(a.expect) for a in run.attacks} | {
            STALLED: [STALL_CUT, "429"], DROPPED: [CLIENT_CLOSED], FLOODED: ["429", ADMITTED]},
        "groups": {a.name: a.group for a in run.attacks} | {
            STALLED: SLOW, DROPPED: SLOW, FLOODED: FLOOD},
        "canary_contacts": run.contacts, "server_died": run.died,
        "memory_guard_gib": run.guard_fired,
        "peak_rss_mib": {k: v / 2**20 for k, v in run.peak_rss.items()},
        "peak_rss_mib_total": server.peak_rss / 2**20 if server else None,
        "args": vars(args), "machine": machine(), "elapsed_s": time.monotonic() - t0,
    }
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(report(results))
    print(f"\nJSON: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

