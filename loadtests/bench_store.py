"""What storing completions costs a request: latency with `STEER_STORE=all` versus off.

In-process (the app over httpx's ASGI transport, the scripted FakeEngine behind it, so the
engine costs nothing and whatever storing adds is all there is to see), for plain and
steered (best_of_n with its trace) chat requests, one at a time and 16 at a time. Prints a
table: p50 / p99 latency per request, throughput, and how many completions were stored or
dropped. The store is a fresh SQLite file per run.

    .venv/bin/python -m loadtests.bench_store --requests 500
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from steer.service.app import create_app
from steer.service.settings import Settings
from steer.store.completions import list_completions
from tests.asgi import running
from tests.fakes import FakeEngine

BODIES: dict[str, dict[str, Any]] = {
    "plain": {"model": "fake-model", "max_tokens": 16,
              "messages": [{"role": "user", "content": "What is 6 times 7?"}]},
    "best_of_4": {"model": "fake-model", "max_tokens": 16,
                  "messages": [{"role": "user", "content": "What is 6 times 7?"}],
                  "steering": {"strategy": "best_of_n", "options": {"n": 4},
                               "critic": {"name": "exact_answer", "reference": 42}}},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(store: str, kind: str, requests: int, concurrency: int,
              tmp: Path) -> dict[str, Any]:
    engine = FakeEngine(max_model_len=4096)
    engine.default_answer = "The answer is 42 because six sevens make forty two."
    settings = Settings.model_validate({
        "store": store, "database_url": f"sqlite+aiosqlite:///{tmp}/{store}-{kind}-{concurrency}.db",
        "max_concurrent_requests": 64, "max_queued_requests": 256})
    app = create_app(settings, engine)
    latencies: list[float] = []
    async with running(app) as client:
        body = BODIES[kind]
        for _ in range(20):  # warm up: first-request costs are not storing's
            await client.post("/v1/chat/completions", json=body)
        await app.state.recorder.queue.join()
        queue: asyncio.Queue[None] = asyncio.Queue()
        for _ in range(requests):
            queue.put_nowait(None)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                start = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - start)
                assert r.status_code == 200, r.text

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        drain_start = time.perf_counter()
        await app.state.recorder.queue.join()
        drain = time.perf_counter() - drain_start
        stored = len((await list_completions(app.state.db, limit=100_000)).rows)
        dropped = app.state.metrics.registry.get_sample_value("steer_store_dropped_total")
    return {"store": store, "kind": kind, "concurrency": concurrency,
            "p50_ms": 1000 * percentile(latencies, 0.5),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "mean_ms": 1000 * statistics.fmean(latencies), "rps": requests / wall,
            "stored": stored, "dropped": int(dropped or 0), "drain_ms": 1000 * drain}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="steer-bench-store-") as tmp:
        for kind in BODIES:
            for concurrency in (1, 16):
                for store in ("off", "all"):
                    rows.append(await run(store, kind, args.requests, concurrency, Path(tmp)))
    print(f"{args.requests} requests per row, FakeEngine in-process, SQLite store")
    print("| kind | concurrency | STEER_STORE | p50 ms | p99 ms | mean ms | req/s | stored "
          "| dropped | drain after ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['concurrency']} | {r['store']} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['mean_ms']:.2f} | {r['rps']:.0f} | {r['stored']} | "
              f"{r['dropped']} | {r['drain_ms']:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
