"""Passthrough overhead: Steer (no steering strategy) vs vLLM's own OpenAI server.

Both servers run the same model (the converted default SmolLM2-135M-Instruct) with the same
engine settings (bf16, max_model_len 8192, eager, prefix caching, 128 seqs, chunked prefill
off with an 8192-token step budget, 2 GiB CPU KV cache), so any gap is Steer's HTTP/serving
layer. Both stay resident; only one is under load at a time. For each concurrency level the
script runs Steer then vLLM, then again in the opposite order (--rounds), with identical chat
requests (temperature 0, fixed max_tokens, long-answer prompts; ignore_eos is not available
through Steer, so tokens are counted from `usage`). Reported per level: completion tokens/s
(sum of usage.completion_tokens / wall time, pooled over rounds), p50/p99 request latency
(with few requests p99 is about the max), time to first token for streamed levels, server
CPU ms per request split into the HTTP front-end process and the engine processes (robust to
other load on the machine, unlike wall time), and the peak RSS of each server's process tree
(psutil, every 0.5 s). Steer's admission cap is raised to the top level so it never queues.
JSON and both server logs go to loadtests/results/. Traffic goes to 127.0.0.1 only.

Run:  .venv/bin/python loadtests/bench_passthrough.py            (full, ~15 min on 2 cores)
      .venv/bin/python loadtests/bench_passthrough.py --quick    (smoke run)
Env:  STEER_CACHE_DIR picks where the converted model lives (default ~/.cache/steer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    DEFAULT_CACHE,
    MODEL,
    RESULTS_DIR,
    Server,
    async_client,
    machine,
    on_sigterm,
    prepare_model,
    steer_server,
    vllm_server,
)
from openai import AsyncOpenAI

RESULTS = RESULTS_DIR / "bench_passthrough.json"
PROMPTS = [f"Write a long, detailed essay about {t}. Cover its history, how it works today, "
           "and its future, with many examples." for t in (
               "the history of bridges", "ocean tides", "the printing press", "volcanoes",
               "how bread is made", "the planet Mars", "public libraries", "honey bees",
               "the bicycle", "rain forests", "the telephone", "chess", "glaciers",
               "coffee farming", "lighthouses", "the human heart")]


async def one(client: AsyncOpenAI, i: int, max_tokens: int, stream: bool) -> dict[str, float]:
    messages: Any = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    t0 = time.perf_counter()
    if not stream:
        r = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
        tokens = r.usage.completion_tokens if r.usage else 0
        return {"latency": time.perf_counter() - t0, "tokens": tokens}
    ttft, tokens = None, 0
    chunks = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for chunk in chunks:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return {"latency": latency, "tokens": tokens, "ttft": latency if ttft is None else ttft}


async def run_batch(port: int, concurrency: int, n: int, max_tokens: int,
                    stream: bool) -> tuple[float, list[dict[str, float]]]:
    """n requests through `concurrency` workers; returns (wall seconds, per-request rows)."""
    client = async_client(port, timeout=600)
    rows: list[dict[str, float]] = []
    next_i = iter(range(n))

    async def worker() -> None:
        for i in next_i:
            rows.append(await one(client, i, max_tokens, stream))

    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 1800)
        return time.perf_counter() - t0, rows
    finally:
        await client.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] if xs else 0.0  # nearest rank


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for run in runs for r in run["rows"]]
    lat = [r["latency"] for r in rows]
    out: dict[str, Any] = {
        "requests": len(rows), "tokens": sum(r["tokens"] for r in rows),
        "wall_s": sum(run["wall"] for run in runs),
        "tok_per_s_by_round": [run["tok_per_s"] for run in runs],
        "loadavg_by_round": [run["load"] for run in runs],
        "p50_s": statistics.median(lat), "p99_s": pct(lat, 99),
        # CPU is far less sensitive than wall time to other load on the machine.
        "front_cpu_ms_per_req": 1000 * sum(run["cpu_front"] for run in runs) / len(rows),
        "engine_cpu_ms_per_req": 1000 * sum(run["cpu_engine"] for run in runs) / len(rows),
    }
    out["tok_per_s"] = out["tokens"] / out["wall_s"]
    out["tokens_per_request"] = out["tokens"] / len(rows)
    if "ttft" in rows[0]:
        ttft = [r["ttft"] for r in rows]
        out |= {"ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 99)}
    return out


def servers(args: argparse.Namespace, model_path: str, logdir: Path) -> list[Server]:
    # Steer's own admission cap (64) must not be the bottleneck at high levels.
    out = [steer_server("steer", args.cache_dir, logdir,
                        "--max-concurrent-requests", str(max(64, *args.levels)))]
    if not args.steer_only:
        out.append(vllm_server("vllm", model_path, logdir))
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def report(results: dict[str, Any], names: list[str]) -> None:
    other = names[-1]
    print("\n| concurrency | Steer tok/s | vLLM tok/s | ratio | Steer p50 | vLLM p50 | p50 ratio"
          " | Steer p99 | vLLM p99 |\n|---|---|---|---|---|---|---|---|---|")
    for key, by in results["levels"].items():
        s, v = by["steer"], by[other]
        extra = (f" (TTFT p50 Steer {s['ttft_p50_s'] * 1000:.0f} ms, vLLM "
                 f"{v['ttft_p50_s'] * 1000:.0f} ms)" if "ttft_p50_s" in s else "")
        print(f"| {key}{extra} | {s['tok_per_s']:.1f} | {v['tok_per_s']:.1f} | "
              f"{ratio(s['tok_per_s'], v['tok_per_s'])} | {s['p50_s']:.2f}s | {v['p50_s']:.2f}s"
              f" | {ratio(s['p50_s'], v['p50_s'])} | {s['p99_s']:.2f}s | {v['p99_s']:.2f}s |")
    print("\ncompletion tokens/request: " + "; ".join(
        f"{k}: " + ", ".join(f"{n} {by[n]['tokens_per_request']:.1f}" for n in names)
        for k, by in results["levels"].items()))
    print("server CPU ms/request, front-end + engine: " + "; ".join(
        f"{k}: " + ", ".join(f"{n} {by[n]['front_cpu_ms_per_req']:.0f} + "
                             f"{by[n]['engine_cpu_ms_per_req']:.0f}" for n in names)
        for k, by in results["levels"].items()))
    print("peak RSS (process tree): " + ", ".join(
        f"{n} {results['peak_rss_mib'][n]:.0f} MiB" for n in names))


async def bench(args: argparse.Namespace, srv: list[Server]) -> dict[str, Any]:
    plan = [(c, False) for c in args.levels] + [(c, True) for c in args.stream_levels]
    results: dict[str, Any] = {"levels": {}}
    for s in srv:  # first-request costs out of the way
        await run_batch(s.port, 4, 4, args.max_tokens, False)
    for conc, stream in plan:
        n = max(4, conc) if args.quick else args.requests or max(16, 4 * conc)
        runs: dict[str, list[Any]] = {s.name: [] for s in srv}
        for rnd in range(args.rounds):
            for s in srv if rnd % 2 == 0 else srv[::-1]:
                await run_batch(s.port, conc, conc, 16, stream)  # warm this batch size
                cpu0 = s.cpu()
                wall, rows = await run_batch(s.port, conc, n, args.max_tokens, stream)
                cpu1 = s.cpu()
                tps, load = sum(r["tokens"] for r in rows) / wall, os.getloadavg()[0]
                runs[s.name].append({"wall": wall, "rows": rows, "tok_per_s": tps, "load": load,
                                     "cpu_front": cpu1[0] - cpu0[0],
                                     "cpu_engine": cpu1[1] - cpu0[1]})
                print(f"c={conc} stream={stream} round={rnd} {s.name}: {tps:.1f} tok/s "
                      f"(load avg {load:.1f})", flush=True)
        key = f"{conc}" + (" stream" if stream else "")
        results["levels"][key] = {name: summarize(r) for name, r in runs.items()}
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--stream-levels", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[8], help="levels also measured streamed ('' for none)")
    p.add_argument("--requests", type=int, default=0, help="per level (default max(16, 4c))")
    p.add_argument("--rounds", type=int, default=2, help="server pairs per level, alternating")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="few requests, one round")
    p.add_argument("--steer-only", action="store_true", help="skip vLLM (ratios become 1)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--start-timeout", type=float, default=300)
    args = p.parse_args()
    args.rounds = 1 if args.quick else args.rounds
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    on_sigterm()
    model_path = prepare_model(args.cache_dir)
    srv = servers(args, model_path, RESULTS.parent)
    try:
        for s in srv:  # one at a time: startup is CPU-heavy
            print(f"starting {s.name} on :{s.port} (log {s.log})", flush=True)
            s.start(args.start_timeout)
        results = asyncio.run(bench(args, srv))
    finally:
        for s in srv:
            s.stop()
    names = [s.name for s in srv]
    results |= {
        "peak_rss_mib": {s.name: s.peak_rss / 2**20 for s in srv}, "model_path": model_path,
        "args": vars(args), "machine": machine(),
    }
    RESULTS.write_text(json.dumps(results, indent=2))
    report(results, names)
    print(f"\nJSON: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
