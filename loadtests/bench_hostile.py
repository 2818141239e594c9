"""Hostile clients: can one client's abuse hurt another client's plain requests?

One live `steer serve` (default settings). A normal client streams plain chat requests one
after another (short prompts, max_tokens 32, greedy) for --seconds alone (baseline), then for
--seconds again while hostile clients send the attack set of issue 9 (loadtests/
hostile_attacks.py): ReDoS patterns (regex critic, `extract: "regex"`, the JSON-schema
`pattern` keyword), JSON-schema `$ref`s to a canary listener on 127.0.0.1 (which must never be
contacted) and to file:///etc/passwd, huge integers (n 10^9, agents 10^9, budgets 10^18, a
5,000-digit number), huge lists (100,000 prompts, messages, content parts, stop strings,
personas, few-shot examples; 1,000 prompts x n 16), huge bodies (20 MB with and without
Content-Length, JSON nested 100,000 deep), slow readers (4096-token streams with 20 top
logprobs a token, so that they outgrow the socket buffers, whose reader takes the headers, then
stops reading for --stall seconds with a 4 KB receive buffer; 8 long requests dropped before
the response every 2 s) and a flood of best_of_n n=16 x max_tokens 4096 streams (an
admitted one is read to the end of the phase). --attackers workers share one cycle through the
body-borne kinds, reshuffled every round (--gap seconds between one worker's requests);
--slow-readers and --flood-workers run beside them (a flood worker that gets a 429 waits
0.2 s). Every loop is bounded in time and count; every request has a timeout
(--request-timeout). --groups picks attack groups (e.g. to leave out one that freezes the
server and hides the rest).
Throughout, /health is polled every 150 ms. Reported: the normal client's p50/p99 latency in
both phases and their ratio (target: p50 within 1.2x), the longest /health response (target:
< 1 s), each attack kind's outcomes (target: refused with a 4xx or 429; a ReDoS pattern that a
linear-time engine accepts may also run (200), a stalled stream should be cut by the server, a
flood request may be admitted; 5xx, timeouts and connection errors are counted apart), whether
the canary listener was contacted, requests still in flight once the attackers stop, whether
the server survived, the server's peak memory (RSS of its process tree; a guard kills the
server if it passes --rss-limit-gib or the machine runs low, so that a runaway can't take the
machine) and the CPU seconds of the server and of the benchmark itself per phase. Target misses
are reported, not failed: the exit status is non-zero only when the benchmark itself fails.
JSON in loadtests/results/bench_hostile.json (`python loadtests/hostile_report.py FILE`
re-prints it). Traffic goes to 127.0.0.1 only.

Run:  .venv/bin/python loadtests/bench_hostile.py            (~6 min + startup: 2 x 150 s)
      .venv/bin/python loadtests/bench_hostile.py --quick    (smoke run: 2 x 20 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
from typing import Any

import httpx
import psutil
from harness import (
    MODEL,
    RESULTS_DIR,
    Server,
    add_server_args,
    free_port,
    machine,
    on_sigterm,
    prepare_model,
    steer_server,
)
from hostile_attacks import CONNECTION_KINDS, FLOOD, GROUPS, SLOW, catalogue
from hostile_clients import (
    FAILURES,
    MAX_PER_WORKER,
    Run,
    attacker,
    dropper,
    failure,
    flooder,
    rounds,
    slow_reader,
)
from hostile_report import report

RESULTS = RESULTS_DIR / "bench_hostile.json"
NORMAL_PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 7 times 8?",
                  "Give me a word that rhymes with cat.", "What day comes after Monday?",
                  "Name a large animal.", "What is water made of?", "Say hello in Spanish."]


async def normal_once(run: Run, http: httpx.AsyncClient, i: int) -> dict[str, Any]:
    """One plain streamed chat request: its latency, time to first token and outcome."""
    body = {"model": MODEL, "messages": [{"role": "user",
                                          "content": NORMAL_PROMPTS[i % len(NORMAL_PROMPTS)]}],
            "max_tokens": run.args.max_tokens, "temperature": 0, "stream": True,
            "user": "normal"}
    t0 = time.perf_counter()
    row: dict[str, Any] = {"t": time.monotonic(), "phase": run.phase, "ttft": None}
    label = "no [DONE]"
    try:
        async with asyncio.timeout(run.args.request_timeout):
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    label = str(r.status_code)
                    await r.aread()
                else:
                    label = await read_stream(r, row, t0)
    except ValueError:
        label = "bad stream"
    except FAILURES as exc:
        label = failure(exc)
    return row | {"latency": time.perf_counter() - t0, "label": label}


async def read_stream(r: httpx.Response, row: dict[str, Any], t0: float) -> str:
    label = "no [DONE]"
    async for line in r.aiter_lines():
        data = line.removeprefix("data:").strip()
        if not line.startswith("data:") or not data:
            continue
        if data == "[DONE]":
            return "ok" if label == "no [DONE]" else label
        chunk = json.loads(data)
        if "error" in chunk:
            label = "error event"
        elif row["ttft"] is None and any((c.get("delta") or {}).get("content")
                                         for c in chunk.get("choices") or []):
            row["ttft"] = time.perf_counter() - t0
    return label


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
            except FAILURES as exc:
                label = failure(exc)
            dt = time.perf_counter() - t0
            rows.append({"t": time.monotonic(), "phase": run.phase, "latency": dt,
                         "label": label})
            await asyncio.sleep(max(0.0, 0.15 - dt))


async def watchdog(run: Run) -> None:
    """Server death, and memory: peak RSS per phase, and the guard that kills a runaway."""
    limit = run.args.rss_limit_gib * 2**30
    while run.server is not None and run.server.proc is not None and not run.dead.is_set():
        proc = run.server.proc
        if proc.poll() is not None:
            run.died = {"phase": run.phase, "returncode": proc.returncode}
            run.dead.set()
            return
        procs = await asyncio.to_thread(run.server.rss_by_process)
        rss = sum(r for _, _, r in procs)
        if rss > run.peak_rss.get(run.phase, 0):
            run.peak_rss[run.phase] = rss
            run.peak_procs[run.phase] = [{"pid": pid, "name": name, "rss_mib": r / 2**20}
                                         for pid, name, r in procs]
        # subtle: the machine's free memory counts too, so that the kernel's OOM killer never
        # has to pick a victim (it may pick something other than the server).
        low = psutil.virtual_memory().available < run.args.min_free_gib * 2**30
        if (rss > limit or low) and run.guard_fired_gib is None:
            run.guard_fired_gib = rss / 2**30
            print(f"memory guard: server at {run.guard_fired_gib:.1f} GiB"
                  f"{' (machine nearly out of memory)' if low else ''}, killing it", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.sleep(0.25)


async def canary(run: Run, port: int) -> asyncio.Server:
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

    return await asyncio.start_server(on_connect, "127.0.0.1", port)


async def phase(run: Run, name: str, hostile: bool) -> dict[str, Any]:
    run.phase, run.stop = name, asyncio.Event()
    run.phase_end = time.monotonic() + run.args.seconds
    normal: list[dict[str, Any]] = []
    health: list[dict[str, Any]] = []
    tasks = [asyncio.create_task(normal_client(run, normal)),
             asyncio.create_task(health_poller(run, health))]
    if hostile:
        queue = rounds(run)
        tasks += [asyncio.create_task(attacker(run, queue)) for _ in range(run.args.attackers)]
        if SLOW in run.args.groups:
            tasks += [asyncio.create_task(slow_reader(run))
                      for _ in range(run.args.slow_readers)]
            tasks.append(asyncio.create_task(dropper(run)))
        if FLOOD in run.args.groups:
            tasks += [asyncio.create_task(flooder(run)) for _ in range(run.args.flood_workers)]
    print(f"phase {name}: {run.args.seconds:.0f} s, {len(tasks)} clients", flush=True)
    cpu0 = (own_cpu(), run.server.cpu() if run.server else (0.0, 0.0))
    died = asyncio.create_task(run.dead.wait())
    await asyncio.wait({died}, timeout=run.args.seconds)
    died.cancel()
    run.stop.set()
    # In-flight requests end by their own timeouts; a slow reader also sits out its stall.
    grace = run.args.request_timeout + (run.args.stall + 15 if hostile else 0) + 5
    _, late = await asyncio.wait(tasks, timeout=grace)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # a bug in the benchmark itself is a harness failure
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            raise exc
    cpu1 = (own_cpu(), run.server.cpu() if run.server else (0.0, 0.0))
    # subtle: a server that died mid-phase has no processes left to count (clamped at 0).
    return {"normal": normal, "health": health, "late_clients": len(late),
            "bench_cpu_s": cpu1[0] - cpu0[0],
            "server_front_cpu_s": max(0.0, cpu1[1][0] - cpu0[1][0]),
            "server_engine_cpu_s": max(0.0, cpu1[1][1] - cpu0[1][1])}


def own_cpu() -> float:
    """CPU seconds of this process so far: the benchmark's own share of the 2 cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def after(run: Run) -> dict[str, Any]:
    """Once the attackers stop: does the server drain its slots and still answer?"""
    out: dict[str, Any] = {"in_flight": None, "engine_running": None, "drain_s": None}
    run.phase = "after"
    async with run.client(timeout=10) as http:
        t0 = time.monotonic()
        while time.monotonic() - t0 < run.args.drain_wait and not run.dead.is_set():
            try:
                text = (await http.get("/metrics")).text
            except FAILURES:
                await asyncio.sleep(1)
                continue
            out["in_flight"] = gauge(text, "steer_requests_in_flight")
            out["engine_running"] = gauge(text, "steer_engine_requests_running")
            if not out["in_flight"] and not out["engine_running"]:
                out["drain_s"] = time.monotonic() - t0
                break
            await asyncio.sleep(1)
        out["serves"] = (await normal_once(run, http, 0))["label"] == "ok"
    return out


def gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def bench(run: Run, canary_port: int) -> dict[str, Any]:
    listener = await canary(run, canary_port)
    guard = asyncio.create_task(watchdog(run))
    try:
        async with run.client() as http:
            for i in range(3):  # first-request costs out of the way
                await normal_once(run, http, i)
        results = {"baseline": await phase(run, "baseline", hostile=False)}
        results["attack"] = (await phase(run, "attack", hostile=True) if not run.dead.is_set()
                             else {"normal": [], "health": [], "late_clients": 0,
                                   "bench_cpu_s": 0.0, "server_front_cpu_s": 0.0,
                                   "server_engine_cpu_s": 0.0})
        results["after"] = await after(run)
    finally:
        if not run.dead.is_set():
            run.dead.set()  # ends the watchdog; run.died stays None
        await guard
        listener.close()
    return results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(p, request_timeout=30)
    p.add_argument("--seconds", type=float, help="length of each phase [150; --quick 20]")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 20 s phases, 5 s stalls, 6 attackers")
    p.add_argument("--max-tokens", type=int, default=32, help="the normal client's")
    p.add_argument("--attackers", type=int,
                   help="workers sending the body-borne attacks [3; --quick 6, so that a short "
                   "phase reaches most kinds]")
    p.add_argument("--slow-readers", type=int, default=4)
    p.add_argument("--flood-workers", type=int, default=4)
    p.add_argument("--stall", type=float, help="seconds a slow reader stops reading [60; 5]")
    p.add_argument("--gap", type=float, default=0.05, help="pause between one attacker's requests")
    p.add_argument("--groups", type=lambda s: [g.strip() for g in s.split(",")],
                   default=list(GROUPS),
                   help="attack groups, comma-separated: " + ", ".join(GROUPS))
    p.add_argument("--health-timeout", type=float, default=30)
    p.add_argument("--drain-wait", type=float, default=30,
                   help="after the attacks: how long to wait for in-flight requests to end")
    p.add_argument("--rss-limit-gib", type=float, default=10,
                   help="kill the server if its process tree passes this")
    p.add_argument("--min-free-gib", type=float, default=1,
                   help="... or if the machine has less than this left")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `steer serve` argument (repeatable)")
    p.add_argument("--server-env", action="append", default=[],
                   help="KEY=VALUE for the server's environment (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if unknown := set(args.groups) - set(GROUPS):
        p.error(f"unknown attack groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    if args.seconds is None:
        args.seconds = 20 if args.quick else 150
    if args.attackers is None:
        args.attackers = 6 if args.quick else 3
    if args.stall is None:
        args.stall = 5 if args.quick else 60
    return args


def main() -> int:
    args = parse_args()
    on_sigterm()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    server: Server | None = None
    port = args.port
    t0 = time.monotonic()
    canary_port = free_port()
    try:
        if not port:
            prepare_model(args.cache_dir)
            server = steer_server("bench_hostile", args.cache_dir, RESULTS_DIR,
                                  *args.server_arg, kv_cache_gib=args.kv_cache_gib)
            server.env |= dict(kv.split("=", 1) for kv in args.server_env)
            print(f"starting steer on :{server.port} (log {server.log})", flush=True)
            server.start(args.start_timeout)
            port = server.port
        run = Run(args, port, server, catalogue(canary_port))
        results = asyncio.run(bench(run, canary_port))
    finally:
        if server:
            server.stop()
    kinds = {a.name: (a.group, a.expect) for a in run.attacks} | CONNECTION_KINDS
    results |= {
        "kinds": {name: {"group": group, "expect": sorted(expect)}
                  for name, (group, expect) in kinds.items() if group in args.groups},
        "outcomes": {k: [o.__dict__ for o in v] for k, v in run.outcomes.items()},
        "canary_contacts": run.contacts, "server_died": run.died,
        "memory_guard_gib": run.guard_fired_gib,
        "peak_rss_mib": {k: v / 2**20 for k, v in run.peak_rss.items()},
        "peak_rss_processes": run.peak_procs,
        "peak_rss_mib_total": (max([server.peak_rss, *run.peak_rss.values()]) / 2**20
                               if server else None),
        "args": vars(args), "machine": machine(), "elapsed_s": time.monotonic() - t0,
    }
    RESULTS.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nJSON: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
