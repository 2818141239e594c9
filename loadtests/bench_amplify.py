"""The amplification loop end to end, through the HTTP API: search, grade, train, hot-load,
measure (issue 10's benchmark).

For each task family (two-digit addition; one-step word problems) on the default model:
  1. the baseline: greedy, one call per item, and best-of-8 with the exact-answer grader as
     its critic (an oracle verifier: the search ceiling at this N);
  2. a reinforcement fine-tuning job (`client.fine_tuning.jobs.create`, method
     `reinforcement`): Steer runs expert iteration (search with the current adapter, keep what
     the grader passes, train a fresh LoRA from the base, hot-load it, evaluate) for --rounds;
     every round's adapter is a checkpoint, served by name;
  3. each round's adapter in ONE call on the held-out items of its family and of the other
     family (what did the adapter cost the neighbour?).
Then the label-free mode on word problems (the grader is agreement among the samples, no
reference answers used for training). Held-out items (--test-items per family, default 200)
come from a different seed and never appear in a training or validation file.

Everything goes through the official `openai` client (files, fine_tuning.jobs, chat) except
the steered baseline requests (Steer's `steering` field via `extra_body`). The answers are
graded here, independently of Steer's grader: the last number in the answer.

Run:  .venv/bin/python loadtests/bench_amplify.py               (~2 h on 2 cores; addition ~1 h)
      .venv/bin/python loadtests/bench_amplify.py --quick             (tiny smoke run)
Markdown tables on stdout; JSON in loadtests/results/bench_amplify[_quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import re
import sys
import tempfile
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
    table,
    wilson,
)
from openai import AsyncOpenAI

FAMILIES = ("addition", "word")
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# The graders Steer runs: the answer's last number equals the item's reference.
EXACT = {"type": "steer_critic", "pass_threshold": 1.0,
         "critic": {"name": "exact_answer", "reference": "{{item.reference}}",
                    "extract": "last_number"}}
AGREEMENT = {"type": "agreement", "threshold": 0.5}


# -- items -----------------------------------------------------------------------------------


def _word(rng: random.Random) -> tuple[str, int]:
    """One-step word problems (one operation each)."""
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(5, 40), rng.randint(3, 30)
        return (f"Tom has {a} apples. He buys {b} more apples. How many apples does he have "
                "now?", a + b)
    if kind == 1:
        a = rng.randint(30, 90)
        b = rng.randint(5, a - 5)
        return f"A shop had {a} books. It sold {b} books. How many books are left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        return (f"There are {a} boxes with {b} pencils in each box. How many pencils are there "
                "in total?", a * b)
    if kind == 3:
        a, b = rng.randint(2, 8), rng.randint(2, 9)
        return (f"{a} children share {a * b} candies equally. How many candies does each child "
                "get?", b)
    a, b = rng.randint(20, 90), rng.randint(2, 5)
    return f"A train travels {a} km each hour. How far does it travel in {b} hours?", a * b


def make_items(family: str, n: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    rng = random.Random(f"{family}-{seed}")
    items: list[dict[str, Any]] = []
    seen = set(exclude)
    while len(items) < n:
        if family == "addition":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            question, answer = f"What is {a} + {b}?", a + b
        else:
            question, answer = _word(rng)
        if question in seen:
            continue
        seen.add(question)
        items.append({"family": family, "question": question, "reference": str(answer)})
    return items


def graded_line(item: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's reinforcement fine-tuning line: the messages plus the fields a grader reads."""
    return {"messages": [{"role": "user", "content": item["question"]}],
            "reference": item["reference"], "family": item["family"]}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def last_number(text: str) -> str | None:
    nums = _NUM.findall(text or "")
    if not nums:
        return None
    try:
        value = float(nums[-1].replace(",", ""))
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else str(value)


# -- measuring --------------------------------------------------------------------------------


async def one_call(client: AsyncOpenAI, model: str, items: list[dict[str, Any]],
                   args: argparse.Namespace, steering: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Each item once (greedy unless steered); accuracy, tokens and wall time per item."""
    gate = asyncio.Semaphore(args.concurrency)
    tokens, correct = 0, 0
    t0 = time.monotonic()

    async def ask(item: dict[str, Any]) -> None:
        nonlocal tokens, correct
        extra: dict[str, Any] = {}
        if steering is not None:
            critic = {"name": "exact_answer", "reference": item["reference"],
                      "extract": "last_number"}
            extra["steering"] = steering | {"critic": critic}
        async with gate:
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": item["question"]}],
                max_tokens=args.max_tokens, temperature=0.0 if steering is None else
                args.temperature, seed=7, extra_body=extra or None)
        tokens += r.usage.total_tokens if r.usage else 0
        correct += last_number(r.choices[0].message.content or "") == item["reference"]

    await asyncio.gather(*(ask(i) for i in items))
    n = len(items)
    lo, hi = wilson(correct, n)
    return {"correct": correct, "n": n, "accuracy": correct / n, "wilson95": [lo, hi],
            "tokens_per_item": tokens / n, "wall_s_per_item": (time.monotonic() - t0) / n}


async def run_job(client: AsyncOpenAI, family: str, train: list[dict[str, Any]],
                  val: list[dict[str, Any]], grader: dict[str, Any], suffix: str,
                  rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    """Upload, create the reinforcement job, follow its events until it ends."""
    train_file = await client.files.create(
        file=(f"{suffix}-train.jsonl", io.BytesIO(jsonl([graded_line(i) for i in train]))),
        purpose="fine-tune")
    val_file = await client.files.create(
        file=(f"{suffix}-val.jsonl", io.BytesIO(jsonl([graded_line(i) for i in val]))),
        purpose="fine-tune")
    job = await client.fine_tuning.jobs.create(
        model=MODEL, training_file=train_file.id, validation_file=val_file.id, suffix=suffix,
        seed=args.seed,
        method={"type": "reinforcement", "reinforcement": {  # type: ignore[arg-type]
            "grader": grader,
            "hyperparameters": {"n_epochs": args.epochs, "batch_size": args.batch_size,
                                "rounds": rounds, "samples": args.samples,
                                "temperature": args.temperature,
                                "max_tokens": args.max_tokens,
                                "keep_per_prompt": args.keep_per_prompt,
                                "concurrency": args.concurrency}}},
    )
    print(f"[{family}] job {job.id} created", flush=True)
    t0 = time.monotonic()
    seen: set[str] = set()
    while True:
        job = await client.fine_tuning.jobs.retrieve(job.id)
        events = await client.fine_tuning.jobs.list_events(job.id, limit=100)
        for e in reversed(events.data):
            if e.id not in seen:
                seen.add(e.id)
                print(f"  [{family} {time.monotonic() - t0:.0f}s] {e.message}", flush=True)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        await asyncio.sleep(5)
    all_events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    per_round = sorted((e.data for e in all_events
                     if e.type == "metrics" and isinstance(e.data, dict) and "round" in e.data
                     and "validation_accuracy" in e.data), key=lambda d: d["round"])
    checkpoints = [c async for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    return {"job": job.id, "status": job.status, "error": job.error and job.error.message,
            "fine_tuned_model": job.fine_tuned_model, "seconds": time.monotonic() - t0,
            "rounds": per_round,
            "checkpoints": sorted((c.step_number, c.fine_tuned_model_checkpoint)
                                  for c in checkpoints)}


def save(out: dict[str, Any], args: argparse.Namespace) -> Path:
    tag = "_quick" if args.quick else "" if args.families == list(FAMILIES) else \
        "_" + "_".join(args.families)
    path = RESULTS_DIR / f"bench_amplify{tag}.json"
    RESULTS_DIR.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return path


async def bench(port: int, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.deadline_min * 60  # no new job after it
    client = async_client(port, timeout=args.request_timeout)
    test = {f: make_items(f, args.test_items, args.seed + 1000, set()) for f in FAMILIES}
    held_out = {i["question"] for items in test.values() for i in items}
    train = {f: make_items(f, args.train_items, args.seed, held_out) for f in FAMILIES}
    val = {f: make_items(f, args.val_items, args.seed + 500,
                         held_out | {i["question"] for i in train[f]}) for f in FAMILIES}
    out: dict[str, Any] = {"baseline": {}, "jobs": {}, "adapters": {}}
    for f in args.families:
        out["baseline"][f] = {
            "greedy": await one_call(client, MODEL, test[f], args),
            "best_of_8_grader": await one_call(
                client, MODEL, test[f], args,
                steering={"strategy": "best_of_n", "options": {"n": args.samples}}),
        }
        print(f"[{f}] baseline {json.dumps(out['baseline'][f])}", flush=True)
    runs = [(f, EXACT, f"{f[:4]}", args.rounds) for f in args.families]
    if args.label_free and "word" in args.families:
        runs.append(("word", AGREEMENT, "word-free", args.label_free_rounds))
    for family, grader, suffix, rounds in runs:
        if time.monotonic() > deadline:
            print(f"deadline: {suffix} not run", flush=True)
            out["skipped"] = [*out.get("skipped", []), suffix]
            continue
        result = await run_job(client, family, train[family], val[family], grader, suffix,
                               rounds, args)
        out["jobs"][suffix] = result | {"family": family, "grader": grader["type"]}
        models = [name for _, name in result["checkpoints"]]
        if result["fine_tuned_model"] and result["fine_tuned_model"] not in models:
            models.append(result["fine_tuned_model"])
        for name in models:
            out["adapters"][name] = {
                "job": suffix, "family": family,
                **{f: await one_call(client, name, test[f], args) for f in FAMILIES}}
            print(f"[{family}] {name}: {json.dumps(out['adapters'][name])}", flush=True)
        save(out, args)  # what is measured so far survives a cut-off run
    await client.close()
    return out


def pct(s: dict[str, Any]) -> str:
    lo, hi = s["wilson95"]
    return f"{s['accuracy']:.1%} ({s['correct']}/{s['n']}; {lo:.0%}-{hi:.0%})"


def report(out: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    for f in out["baseline"]:
        other = next(x for x in FAMILIES if x != f)
        for how, s in out["baseline"][f].items():
            rows.append([f, f"base, {how}", pct(s), "", f"{s['tokens_per_item']:.0f}",
                         f"{s['wall_s_per_item']:.2f}"])
        for name, a in out["adapters"].items():
            if a["family"] == f:
                rows.append([f, f"{name} ({a['job']}), one call", pct(a[f]),
                             f"{other}: {pct(a[other])}", f"{a[f]['tokens_per_item']:.0f}",
                             f"{a[f]['wall_s_per_item']:.2f}"])
    print("\n" + table(["family", "model", "accuracy (95% Wilson)", "neighbour family",
                        "tokens/item", "wall s/item"], rows))
    rrows: list[list[Any]] = []
    for suffix, j in out["jobs"].items():
        for r in j["rounds"]:
            rrows.append([suffix, j["grader"], r.get("round"), r.get("kept_samples"),
                          _f(r.get("pass_rate"), ".1%"), r.get("search_tokens"),
                          _f(r.get("search_s"), ".0f"), _f(r.get("train_s"), ".0f"),
                          _f(r.get("train_loss"), ".3f"), _f(r.get("validation_accuracy"),
                                                             ".1%")])
        if j["status"] != "succeeded":
            rrows.append([suffix, j["grader"], "-", j["status"], j["error"], "", "", "", "", ""])
    print("\n" + table(["job", "grader", "round", "kept samples", "pass rate",
                        "search tokens", "search s", "train s", "train loss", "val acc"],
                       rrows))


def _f(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0, help="a running Steer (else one is started)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--families", type=lambda v: v.split(","), default=list(FAMILIES),
                   help="comma-separated: addition,word")
    p.add_argument("--train-items", type=int, default=400)
    p.add_argument("--val-items", type=int, default=50)
    p.add_argument("--test-items", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=64)  # the model's right answers are short
    p.add_argument("--keep-per-prompt", type=int, default=None,
                   help="train on at most this many passing samples per prompt (all: unset)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--worker-threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-label-free", dest="label_free", action="store_false")
    p.add_argument("--label-free-rounds", type=int, default=1)
    p.add_argument("--deadline-min", type=float, default=50,
                   help="start no new fine-tuning job after this many minutes")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.train_items, args.val_items, args.test_items, args.rounds = 24, 8, 16, 1
        args.epochs = 1
    on_sigterm()
    server: Server | None = None
    t0 = time.monotonic()
    store = tempfile.TemporaryDirectory(prefix="steer-amplify-")
    try:
        port = args.port
        if not port:
            prepare_model(args.cache_dir)
            server = steer_server("bench_amplify", args.cache_dir, RESULTS_DIR)
            server.env |= {"STEER_DATABASE_URL": f"sqlite+aiosqlite:///{store.name}/steer.db",
                           "STEER_ADAPTER_ROOT": f"{store.name}/adapters",
                           "STEER_WORKER_THREADS": str(args.worker_threads)}
            print(f"starting steer on :{server.port} (log {server.log})", flush=True)
            server.start(400)
            port = server.port
        out = asyncio.run(bench(port, args))
    finally:
        if server:
            server.stop()
        store.cleanup()
    out["run"] = {"args": vars(args), "machine": machine(), "elapsed_s": time.monotonic() - t0}
    report(out)
    path = save(out, args)
    print(f"\n{out['run']['elapsed_s'] / 60:.1f} min; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
