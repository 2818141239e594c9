"""LoRA serving cost: throughput and p50 latency at one concurrency with no adapter, every
request on one adapter, and requests mixed over 2 and 4 adapters, in one run; plus the base
model on a server with LoRA disabled (what enabling LoRA costs by itself).

Two `steer serve` processes stay resident, only one under load at a time: one with LoRA off,
one with LoRA on (max_loras 4) serving 4 distinct adapters: the demo `signoff` adapter from
tests/fixtures/adapters loaded under 4 names (4 engine ids, 4 slots). Same weights on purpose:
the LoRA kernels cost the same whatever the values, and identical answers keep the lengths
equal across scenarios (with `shout` in the mix, its answers stop 2x earlier and throughput
would compare lengths, not serving cost). Requests are greedy text completions of plain-text
openings with a fixed max_tokens, round-robin over the scenario's models, through the public
HTTP API only (127.0.0.1); tokens/request is in the table to show the lengths match. Every
scenario runs once per round, rounds alternate the order (--rounds), results are pooled.

Reported per scenario: completion tokens/s (sum of usage.completion_tokens / wall time),
requests/s, p50 request latency, p50 latency per completion token, and the ratios to the
no-adapter scenario on the LoRA server. Target: mixed adapters within 1.2x of the
single-adapter case (single-adapter tokens/s over mixed tokens/s <= 1.2).

Run:  .venv/bin/python loadtests/bench_lora.py            (~15-25 min on 2 busy cores)
      .venv/bin/python loadtests/bench_lora.py --quick    (smoke run)
JSON goes to loadtests/results/bench_lora.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import httpx
from harness import (
    DEFAULT_CACHE,
    MODEL,
    RESULTS_DIR,
    ROOT,
    Server,
    async_client,
    machine,
    on_sigterm,
    steer_server,
)
from openai import AsyncOpenAI

RESULTS = RESULTS_DIR / "bench_lora.json"
FIXTURES = ROOT / "tests" / "fixtures" / "adapters"
ADAPTERS = ["signoff", "signoff-2", "signoff-3", "signoff-4"]  # one weight set, 4 ids
OFF, ON = "LoRA off", "LoRA on"
SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "no adapter, LoRA off": (OFF, [MODEL]),
    "no adapter": (ON, [MODEL]),
    "1 adapter": (ON, ADAPTERS[:1]),
    "2 adapters mixed": (ON, ADAPTERS[:2]),
    "4 adapters mixed": (ON, ADAPTERS),
}
PROMPTS = [f"The history of {t} is a long story. It begins" for t in (
    "bridges", "ocean tides", "the printing press", "volcanoes", "bread", "the planet Mars",
    "libraries", "honey bees", "bicycles", "rain forests", "telephones", "chess", "glaciers",
    "coffee", "lighthouses", "the human heart")]


async def one(client: AsyncOpenAI, model: str, i: int, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    r = await client.completions.create(
        model=model, temperature=0, max_tokens=max_tokens, prompt=PROMPTS[i % len(PROMPTS)])
    latency = time.perf_counter() - t0
    tokens = r.usage.completion_tokens if r.usage else 0
    return {"latency": latency, "tokens": tokens, "per_token": latency / max(tokens, 1)}


async def scenario(port: int, models: list[str], n: int, concurrency: int,
                   max_tokens: int) -> dict[str, Any]:
    client = async_client(port, timeout=900)
    rows: list[dict[str, float]] = []
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            rows.append(await one(client, models[i % len(models)], i, max_tokens))

    try:
        # Warm-up: every model once (loads each adapter into a slot), not measured.
        await asyncio.gather(*(one(client, m, 0, 8) for m in models))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return {"wall_s": wall, "rows": rows, "loadavg": os.getloadavg()[0]}


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for run in runs for r in run["rows"]]
    wall = sum(run["wall_s"] for run in runs)
    tokens = sum(r["tokens"] for r in rows)
    return {
        "requests": len(rows), "wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall,
        "req_per_s": len(rows) / wall, "p50_s": statistics.median(r["latency"] for r in rows),
        "p50_s_per_token": statistics.median(r["per_token"] for r in rows),
        "tokens_per_request": tokens / len(rows),
        "tok_per_s_by_round": [sum(r["tokens"] for r in run["rows"]) / run["wall_s"]
                               for run in runs],
        "loadavg_by_round": [run["loadavg"] for run in runs],
    }


def load_adapters(port: int) -> None:
    for name in ADAPTERS[1:]:  # the first one is loaded at startup
        r = httpx.post(f"http://127.0.0.1:{port}/v1/load_lora_adapter", trust_env=False,
                       headers={"Authorization": "Bearer bench"}, timeout=120,
                       json={"lora_name": name, "lora_path": ADAPTERS[0]})
        r.raise_for_status()


def table(by: dict[str, Any]) -> str:
    ref = by["no adapter"]
    lines = ["| scenario | tok/s | req/s | p50 latency | p50 per token | tokens/req | "
             "tok/s vs no adapter | p50 vs no adapter |", "|---|---|---|---|---|---|---|---|"]
    for name, r in by.items():
        lines.append(
            f"| {name} | {r['tok_per_s']:.1f} | {r['req_per_s']:.2f} | {r['p50_s']:.2f}s | "
            f"{1000 * r['p50_s_per_token']:.0f} ms | {r['tokens_per_request']:.1f} | "
            f"{r['tok_per_s'] / ref['tok_per_s']:.2f} | {r['p50_s'] / ref['p50_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=24, help="per scenario and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="8 requests, one round")
    p.add_argument("--start-timeout", type=float, default=900)
    args = p.parse_args()
    n, rounds = (8, 1) if args.quick else (args.requests, args.rounds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    on_sigterm()
    common = ["--max-concurrent-requests", "64"]
    servers: dict[str, Server] = {
        OFF: steer_server("bench_lora_off", DEFAULT_CACHE, RESULTS_DIR, *common, kv_cache_gib=1),
        ON: steer_server("bench_lora_on", DEFAULT_CACHE, RESULTS_DIR, *common,
                         "--lora", f"{ADAPTERS[0]}={FIXTURES / ADAPTERS[0]}",
                         "--adapter-root", str(FIXTURES), "--max-loras", "4",
                         "--max-lora-rank", "8", kv_cache_gib=1),
    }
    servers[ON].env["STEER_ADMIN_KEY"] = "bench"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
    try:
        for server in servers.values():  # one at a time: startup is CPU-heavy
            print(f"starting {server.name} (log {server.log})", flush=True)
            server.start(args.start_timeout)
        load_adapters(servers[ON].port)
        for rnd in range(rounds):
            order = list(SCENARIOS) if rnd % 2 == 0 else list(SCENARIOS)[::-1]
            for name in order:
                which, models = SCENARIOS[name]
                run = asyncio.run(scenario(servers[which].port, models, n, args.concurrency,
                                           args.max_tokens))
                runs[name].append(run)
                tps = sum(r["tokens"] for r in run["rows"]) / run["wall_s"]
                print(f"round {rnd} / {name}: {tps:.1f} tok/s (load avg {run['loadavg']:.1f})",
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()
    by = {name: pooled(r) for name, r in runs.items()}
    single = by["1 adapter"]["tok_per_s"]
    results: dict[str, Any] = {
        "scenarios": by, "args": vars(args), "machine": machine(),
        "single_over_mixed2_throughput": single / by["2 adapters mixed"]["tok_per_s"],
        "single_over_mixed4_throughput": single / by["4 adapters mixed"]["tok_per_s"],
        "lora_on_over_off_base_throughput":
            by["no adapter"]["tok_per_s"] / by["no adapter, LoRA off"]["tok_per_s"],
    }
    RESULTS.write_text(json.dumps(results, indent=2))
    print("\n" + table(by))
    print(f"\nsingle-adapter / mixed throughput: 2 adapters "
          f"{results['single_over_mixed2_throughput']:.2f}x, 4 adapters "
          f"{results['single_over_mixed4_throughput']:.2f}x (target <= 1.2x)")
    print(f"LoRA enabled, base model: {results['lora_on_over_off_base_throughput']:.2f}x the "
          "throughput of the LoRA-off server")
    print(f"JSON: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
