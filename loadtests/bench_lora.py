"""LoRA serving cost: throughput and p50 latency at one concurrency with no adapter, every
request on one adapter, and requests mixed over 2 and 4 adapters, in one run; plus the base
model on a server with LoRA disabled (what enabling LoRA costs by itself).

Servers: one `steer serve` with LoRA on (the two demo adapters from tests/fixtures/adapters
loaded twice each under different names = 4 distinct adapters, max_loras 4), and, unless
--skip-no-lora, one with LoRA off, run one after the other (never both under load). Requests
are greedy chat completions with a fixed max_tokens, round-robin over the scenario's models,
through the public HTTP API only (127.0.0.1). Reported per scenario: completion tokens/s
(sum of usage.completion_tokens / wall time), requests/s, p50 request latency, p50 latency
per completion token (adapters change answer lengths, so this is the fairer latency), and
each ratio to the no-adapter scenario on the same server. Target: mixed adapters within 1.2x
of the single-adapter case (throughput ratio single/mixed <= 1.2).

Run:  .venv/bin/python loadtests/bench_lora.py            (~10-20 min on 2 busy cores)
      .venv/bin/python loadtests/bench_lora.py --quick    (smoke run)
JSON goes to loadtests/results/bench_lora.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "loadtests" / "results" / "bench_lora.json"
FIXTURES = ROOT / "tests" / "fixtures" / "adapters"
MODEL = "smollm2-135m-instruct"
ADAPTERS = {"shout": "shout", "signoff": "signoff", "shout-b": "shout", "signoff-b": "signoff"}
SCENARIOS: dict[str, list[str]] = {
    "no adapter": [MODEL],
    "1 adapter": ["shout"],
    "2 adapters mixed": ["shout", "signoff"],
    "4 adapters mixed": ["shout", "signoff", "shout-b", "signoff-b"],
}
PROMPTS = [f"Tell me about {t}." for t in (
    "bridges", "ocean tides", "the printing press", "volcanoes", "bread", "the planet Mars",
    "libraries", "honey bees", "bicycles", "rain forests", "telephones", "chess", "glaciers",
    "coffee", "lighthouses", "the human heart")]


@dataclass
class Server:
    name: str
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEER_")}
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.env}
        cmd = [str(BIN / "steer"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *self.args]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=5) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited; see {self.log}")
                try:
                    if http.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(30)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


async def one(client: AsyncOpenAI, model: str, i: int, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    r = await client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens,
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
    latency = time.perf_counter() - t0
    tokens = r.usage.completion_tokens if r.usage else 0
    return {"latency": latency, "tokens": tokens, "per_token": latency / max(tokens, 1)}


async def scenario(port: int, models: list[str], n: int, concurrency: int,
                   max_tokens: int) -> dict[str, Any]:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                         max_retries=0, timeout=900,
                         http_client=DefaultAsyncHttpxClient(trust_env=False))
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
    tokens = sum(r["tokens"] for r in rows)
    return {
        "requests": n, "wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall,
        "req_per_s": n / wall, "p50_s": statistics.median(r["latency"] for r in rows),
        "p50_s_per_token": statistics.median(r["per_token"] for r in rows),
        "tokens_per_request": tokens / n, "loadavg": os.getloadavg()[0],
    }


def load_adapters(port: int) -> None:
    for name, source in ADAPTERS.items():
        if name == source:
            continue  # the startup ones
        r = httpx.post(f"http://127.0.0.1:{port}/v1/load_lora_adapter", trust_env=False,
                       headers={"Authorization": "Bearer bench"}, timeout=120,
                       json={"lora_name": name, "lora_path": source})
        r.raise_for_status()


def table(results: dict[str, Any]) -> str:
    lines = ["| scenario | tok/s | req/s | p50 latency | p50 per token | tokens/req | "
             "tok/s vs no adapter | p50/token vs no adapter |", "|---|---|---|---|---|---|---|---|"]
    for server, by in results["servers"].items():
        ref = by["no adapter"]
        for name, r in by.items():
            lines.append(
                f"| {name} ({server}) | {r['tok_per_s']:.1f} | {r['req_per_s']:.2f} | "
                f"{r['p50_s']:.2f}s | {1000 * r['p50_s_per_token']:.0f} ms | "
                f"{r['tokens_per_request']:.1f} | {r['tok_per_s'] / ref['tok_per_s']:.2f} | "
                f"{r['p50_s_per_token'] / ref['p50_s_per_token']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32, help="per scenario")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="8 requests per scenario")
    p.add_argument("--skip-no-lora", action="store_true", help="skip the LoRA-off server")
    p.add_argument("--start-timeout", type=float, default=900)
    args = p.parse_args()
    n = 8 if args.quick else args.requests
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops servers
    common = ["--kv-cache-gib", "1", "--max-concurrent-requests", "64"]
    lora = Server("LoRA on", [*common, "--lora", f"shout={FIXTURES / 'shout'}", "--lora",
                              f"signoff={FIXTURES / 'signoff'}", "--adapter-root",
                              str(FIXTURES), "--max-loras", "4", "--max-lora-rank", "8"],
                  RESULTS.parent / "bench_lora_server.log", {"STEER_ADMIN_KEY": "bench"})
    plain = Server("LoRA off", common, RESULTS.parent / "bench_lora_nolora_server.log")
    results: dict[str, Any] = {"servers": {}, "args": vars(args), "cpu_count": os.cpu_count(),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    runs = [(plain, {"no adapter": [MODEL]})] if not args.skip_no_lora else []
    runs.append((lora, SCENARIOS))
    for server, scenarios in runs:  # one server at a time: never both under load
        print(f"starting {server.name} (log {server.log})", flush=True)
        try:
            server.start(args.start_timeout)
            if server is lora:
                load_adapters(server.port)
            by: dict[str, Any] = {}
            for name, models in scenarios.items():
                by[name] = asyncio.run(scenario(server.port, models, n, args.concurrency,
                                                args.max_tokens))
                print(f"{server.name} / {name}: {by[name]['tok_per_s']:.1f} tok/s, p50 "
                      f"{by[name]['p50_s']:.2f}s (load avg {by[name]['loadavg']:.1f})",
                      flush=True)
            results["servers"][server.name] = by
        finally:
            server.stop()
    by = results["servers"]["LoRA on"]
    single, mixed = by["1 adapter"]["tok_per_s"], by["4 adapters mixed"]["tok_per_s"]
    results["single_over_mixed4_throughput"] = single / mixed
    results["single_over_mixed2_throughput"] = single / by["2 adapters mixed"]["tok_per_s"]
    RESULTS.write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    print(f"\nsingle-adapter / mixed throughput: 2 adapters "
          f"{results['single_over_mixed2_throughput']:.2f}x, 4 adapters "
          f"{results['single_over_mixed4_throughput']:.2f}x (target <= 1.2x)")
    if "LoRA off" in results["servers"]:
        off = results["servers"]["LoRA off"]["no adapter"]["tok_per_s"]
        print(f"LoRA enabled, base model: {by['no adapter']['tok_per_s'] / off:.2f}x the "
              "throughput of the LoRA-off server")
    print(f"JSON: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
