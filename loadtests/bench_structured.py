"""What constrained decoding costs on this CPU, and what steering adds to it.

One Steer server (the default model), the same JSON-extraction prompts throughout (describe
a city as `{"name", "population_millions", "capital"}`), temperature 0.7, fixed max_tokens:

- free text vs `response_format: json_schema`, one request at a time and 8 at a time:
  output tokens/s (usage.completion_tokens over wall time), p50 latency, and how many
  answers are valid under the schema (free text: JSON found anywhere in the answer);
- plain `json_schema` vs `best_of_n` 4 with `json_schema` (the schema critic gating the
  logprob critic): validity, completion tokens per request, wall time per request.

Prints a markdown table and writes loadtests/results/bench_structured.json. Traffic goes
to 127.0.0.1 only; the server is started and stopped here unless --port names one.

Run:  .venv/bin/python loadtests/bench_structured.py            (~10 min on 2 cores)
      .venv/bin/python loadtests/bench_structured.py --quick    (smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import jsonschema
from harness import RESULTS_DIR, add_server_args, async_client, run_on_steer, table, wilson
from openai import AsyncOpenAI

RESULTS = RESULTS_DIR / "bench_structured.json"
CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Hanoi", "Quito", "Perth",
          "Dakar", "Porto", "Osaka", "Delhi", "Accra", "Turin", "Minsk"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "population_millions": {"type": "integer"},
                   "capital": {"type": "boolean"}},
    "required": ["name", "population_millions", "capital"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                 "strict": True}}


def messages(i: int) -> Any:
    return [{"role": "system", "content": "You reply with one JSON object and nothing else."},
            {"role": "user", "content": f"Describe the city of {CITIES[i % len(CITIES)]} as "
                                        "JSON with the keys name, population_millions (an "
                                        "integer) and capital (true or false)."}]


def valid(text: str) -> bool:
    """Valid under the schema: the whole answer, or the first {...} in it (free text)."""
    start, end = text.find("{"), text.rfind("}")
    for chunk in (text, text[start:end + 1] if 0 <= start < end else ""):
        try:
            jsonschema.validate(json.loads(chunk), SCHEMA)
            return True
        except (ValueError, jsonschema.ValidationError):
            continue
    return False


async def one(client: AsyncOpenAI, i: int, mode: str, max_tokens: int) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if mode != "free text":
        extra["response_format"] = FORMAT
    if mode.startswith("best_of_n"):
        extra["steering"] = {"strategy": "best_of_n", "options": {"n": 4}}
    t0 = time.perf_counter()
    resp = await client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages(i), max_tokens=max_tokens,
        temperature=0.7, seed=i, extra_body=extra)
    wall = time.perf_counter() - t0
    assert resp.usage is not None
    return {"wall": wall, "tokens": resp.usage.completion_tokens,
            "valid": valid(resp.choices[0].message.content or "")}


async def cell(port: int, mode: str, concurrency: int, requests: int, max_tokens: int,
               request_timeout: float) -> dict[str, Any]:
    client = async_client(port, request_timeout)
    queue = list(range(requests))
    done: list[dict[str, Any]] = []

    async def worker() -> None:
        while queue:
            done.append(await one(client, queue.pop(0), mode, max_tokens))

    await one(client, 999, mode, 8)  # warm up (first grammar compile, first prefix)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    ok = sum(r["valid"] for r in done)
    lo, hi = wilson(ok, len(done))
    return {"mode": mode, "concurrency": concurrency, "requests": len(done), "valid": ok,
            "valid_ci": [lo, hi], "tokens_per_request": statistics.fmean(r["tokens"] for r in done),
            "tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "p50_s": statistics.median(r["wall"] for r in done), "wall_s": wall}


async def work(port: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    plan = [("free text", 1), ("json_schema", 1), ("free text", 8), ("json_schema", 8),
            ("best_of_n 4 + json_schema", 1), ("best_of_n 4 + json_schema", 8)]
    rows = []
    for mode, concurrency in plan:
        requests = args.requests * (2 if concurrency > 1 else 1)
        row = await cell(port, mode, concurrency, requests, args.max_tokens,
                         args.request_timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(p, request_timeout=300)
    p.add_argument("--requests", type=int, default=16, help="per cell at concurrency 1")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="4 requests per cell")
    args = p.parse_args()
    if args.quick:
        args.requests = 4
    rows, facts = run_on_steer(args, "bench_structured", lambda port: work(port, args))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, **facts}, indent=2))
    print(table(
        ["mode", "concurrency", "valid", "95% CI", "tokens/request", "output tok/s",
         "p50 s", "wall s"],
        [[r["mode"], r["concurrency"], f"{r['valid']}/{r['requests']}",
          f"{r['valid_ci'][0]:.0%}-{r['valid_ci'][1]:.0%}", f"{r['tokens_per_request']:.1f}",
          f"{r['tokens_per_s']:.1f}", f"{r['p50_s']:.2f}", f"{r['wall_s']:.1f}"]
         for r in rows]))


if __name__ == "__main__":
    main()
