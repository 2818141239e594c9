"""Accuracy of plain greedy decoding vs each steering strategy on a seeded task set.

Items are generated from --seed, in three equal categories with known answers:
  addition      "What is 37 + 48?"                                   (a number)
  word          short one- or two-step word problems                 (a number)
  choice        multiple choice, arithmetic and common facts         (a letter A-D)
Every method gets the same prompt: Steer's `answer_format` template (final answer on a last
line "Answer: <answer>"; the model then tends to answer at once, without working), or with
--template chain_of_thought Steer's step-by-step template (same last line). Methods (all
sampling at --temperature, default 0.4: DESIGN.md measured T=0.8 as too hot for the 135M
default model):
  greedy            one generation at T=0 (strategy `template`)
  bon_logprob       best_of_n N=8, logprob critic
  bon_judge         best_of_n N=8, llm_judge critic
  self_consistency  k=8, extract last_number / choice
  reflection        max_iters 2, self feedback, llm_judge critic
  debate            3 agents x 2 rounds, majority (Du et al. 2023)
  tot               (only with --tot) task steps, breadth 3, depth 2
The answer is graded by this script, the same way for every method: the last "Answer:" line
(else the last number, or for choice items the last option letter, else an option's text).
Reported per method: accuracy with a 95% Wilson interval, accuracy per category, and mean
model calls, tokens and wall time per item (from `usage`, which counts every call a strategy
made). Only items every method finished are scored (a deadline may cut the run short).
Requests run --concurrency at a time (the engine batches across them); accuracy does not
depend on it. Markdown table; JSON in loadtests/results/eval_strategies[_<template>]
[_quick].json. The server is started here (`steer serve` on a free 127.0.0.1 port) and
stopped at the end.

Run:  .venv/bin/python loadtests/eval_strategies.py                 (--items 24: ~15-30 min)
      .venv/bin/python loadtests/eval_strategies.py --quick         (3 items, smoke run)
      .venv/bin/python loadtests/eval_strategies.py --items 60 --methods greedy,self_consistency
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import defaultdict
from typing import Any

import httpx
from harness import (
    MODEL,
    RESULTS_DIR,
    add_server_args,
    run_on_steer,
    table,
    wilson,
)

RESULTS = RESULTS_DIR / "eval_strategies.json"
METHODS = ("greedy", "bon_logprob", "bon_judge", "self_consistency", "reflection", "debate",
           "tot")
CATEGORIES = ("addition", "word", "choice")

# -- the task set --------------------------------------------------------------------------


def _word(rng: random.Random) -> tuple[str, int]:
    kind = rng.randrange(7)
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
        a = rng.randint(20, 60)
        b, c = rng.randint(3, a - 5), rng.randint(2, 20)
        return (f"Sara had {a} stickers. She gave {b} stickers to her friend and then bought "
                f"{c} more. How many stickers does she have now?", a - b + c)
    if kind == 4:
        a, b = rng.randint(2, 8), rng.randint(2, 9)
        return (f"{a} children share {a * b} candies equally. How many candies does each child "
                "get?", b)
    if kind == 5:
        a, b = rng.randint(20, 90), rng.randint(2, 5)
        return f"A train travels {a} km each hour. How far does it travel in {b} hours?", a * b
    a, b = rng.randint(3, 12), rng.randint(2, 6)
    return (f"A pack has {a} cookies. Mia buys {b} packs and eats 2 cookies. How many cookies "
            "are left?", a * b - 2)


FACTS = [
    ("What is the capital of France?", "Paris", ["Berlin", "Rome", "Madrid", "Lisbon"]),
    ("What is the capital of Japan?", "Tokyo", ["Beijing", "Seoul", "Bangkok", "Osaka"]),
    ("What is the capital of Italy?", "Rome", ["Milan", "Paris", "Athens", "Vienna"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Vienna", "Paris", "Warsaw"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Saturn",
                                                           "Mercury"]),
    ("What is the largest ocean on Earth?", "Pacific Ocean", ["Atlantic Ocean", "Indian Ocean",
                                                              "Arctic Ocean"]),
    ("How many legs does a spider have?", "8", ["6", "4", "10", "12"]),
    ("What gas do plants take in from the air to make food?", "Carbon dioxide",
     ["Oxygen", "Nitrogen", "Helium", "Hydrogen"]),
    ("At what temperature in Celsius does water boil at sea level?", "100",
     ["50", "0", "212", "90"]),
    ("What is the largest mammal?", "Blue whale", ["Elephant", "Giraffe", "Hippopotamus",
                                                   "Shark"]),
    ("How many days are there in a week?", "7", ["5", "6", "8", "10"]),
    ("What do bees make?", "Honey", ["Milk", "Silk", "Wax paper", "Butter"]),
    ("Which is the closest star to Earth?", "The Sun", ["Sirius", "Polaris", "Vega", "The Moon"]),
    ("What is frozen water called?", "Ice", ["Steam", "Fog", "Sand", "Glass"]),
]


def _choice(rng: random.Random) -> tuple[str, str, list[str]]:
    if rng.random() < 0.5:
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        right = a + b
        wrong = {right + d for d in rng.sample([-10, -2, -1, 1, 2, 10, 11, -11], 3)}
        question, options = f"What is {a} + {b}?", [str(right), *map(str, sorted(wrong))]
    else:
        question, ans, distract = rng.choice(FACTS)
        options = [ans, *rng.sample(distract, 3)]
    correct = options[0]
    rng.shuffle(options)
    letter = "ABCD"[options.index(correct)]
    text = question + "\n" + "\n".join(f"({'ABCD'[i]}) {o}" for i, o in enumerate(options))
    return text, letter, options


def make_items(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        cat = CATEGORIES[i % 3]
        if cat == "addition":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            items.append({"id": i, "category": cat, "question": f"What is {a} + {b}?",
                          "answer": str(a + b)})
        elif cat == "word":
            q, ans = _word(rng)
            items.append({"id": i, "category": cat, "question": q, "answer": str(ans)})
        else:
            q, letter, options = _choice(rng)
            items.append({"id": i, "category": cat, "question": q, "answer": letter,
                          "options": options})
    return items


# -- grading (independent of Steer's extractors) ------------------------------------------

_ANSWER = re.compile(r"(?im)^[\s*#>-]*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:=]?\s*(.+?)\s*$")
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LETTER = re.compile(r"\(([A-D])\)|(?<![A-Za-z])([A-D])(?![A-Za-z])")
_MARKED = re.compile(r"\(([A-D])\)|(?<![A-Za-z(])([A-D])\)|(?i:option|choice)\s+([A-D])\b")


def _number(text: str) -> str | None:
    nums = _NUM.findall(text)
    if not nums:
        return None
    raw = nums[-1].replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else str(value)


def grade(item: dict[str, Any], text: str) -> tuple[bool, str | None]:
    text = text or ""
    lines = _ANSWER.findall(text)
    if item["category"] != "choice":
        got = (_number(lines[-1]) if lines else None) or _number(text)
        return got == item["answer"], got
    # On the answer line any lone letter counts; elsewhere only "(B)", "B)" or "option B"
    # (a bare "A" in running text is usually the article).
    found = _LETTER.findall(lines[-1]) if lines else []
    found = found or _MARKED.findall(text)
    if found:
        got = next(x for x in found[-1] if x)
        return got == item["answer"], got
    hits = [i for i, o in enumerate(item["options"]) if o.lower() in text.lower()]
    got = "ABCD"[hits[0]] if len(hits) == 1 else None
    return got == item["answer"], got


# -- methods -------------------------------------------------------------------------------


def steering(method: str, item: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    choice = item["category"] == "choice"
    instruction = ("Choose the correct option; answer with its letter." if choice
                   else "Solve the problem.")
    template: dict[str, Any] = {"name": args.template, "variables": {}}
    if args.template == "answer_format":
        template["variables"] = {"instruction": instruction}
    extract = "choice" if choice else "last_number"
    t, n = args.temperature, args.n
    if method == "greedy":
        return {"strategy": "template",
                "options": {"name": args.template, "variables": template["variables"]}}
    spec: dict[str, Any]
    if method == "bon_logprob":
        spec = {"strategy": "best_of_n", "options": {"n": n, "temperature": t}}
    elif method == "bon_judge":
        spec = {"strategy": "best_of_n", "options": {"n": n, "temperature": t},
                "critic": {"name": "llm_judge"}}
    elif method == "self_consistency":
        spec = {"strategy": "self_consistency",
                "options": {"k": n, "temperature": t, "extract": extract}}
    elif method == "reflection":
        spec = {"strategy": "reflection", "options": {"max_iters": 2, "temperature": t}}
    elif method == "debate":
        spec = {"strategy": "debate", "options": {
            "agents": [{"temperature": t}] * 3, "rounds": 2, "extract": extract}}
    elif method == "tot":
        spec = {"strategy": "tot", "options": {
            "task": "steps", "breadth": 3, "depth": 2, "step_tokens": 64, "value_tokens": 16,
            "temperature": t}}
    else:
        raise ValueError(method)
    return spec | {"template": template}


async def run_job(http: httpx.AsyncClient, port: int, item: dict[str, Any], method: str,
                  args: argparse.Namespace) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": item["question"]}],
            "max_tokens": args.max_tokens,
            "temperature": 0.0 if method == "greedy" else args.temperature,
            "steering": steering(method, item, args)}
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"item": item["id"], "category": item["category"], "method": method}
    try:
        r = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
        rec["wall_s"] = time.perf_counter() - t0
        if r.status_code != 200:
            rec["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
            return rec
        data = r.json()
    except httpx.HTTPError as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
        return rec
    text = data["choices"][0]["message"]["content"] or ""
    usage = data.get("usage") or {}
    ok, got = grade(item, text)
    rec |= {"correct": ok, "extracted": got, "expected": item["answer"], "text": text[:400],
            "model_calls": (usage.get("steering") or {}).get("model_calls", 1),
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "budget_exhausted": (usage.get("steering") or {}).get("budget_exhausted")}
    return rec


async def evaluate(args: argparse.Namespace, port: int,
                   items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    jobs = [(item, m) for item in items for m in args.methods]  # item-major: a cut-off
    queue = iter(jobs)                                           # leaves whole items
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.deadline_min * 60
    t0 = time.monotonic()
    async with httpx.AsyncClient(trust_env=False, timeout=args.request_timeout) as http:
        async def worker() -> None:
            for item, method in queue:
                if time.monotonic() > deadline:
                    return
                rec = await run_job(http, port, item, method, args)
                records.append(rec)
                mark = "ERR" if "error" in rec else ("ok" if rec["correct"] else "x")
                print(f"[{len(records)}/{len(jobs)} {time.monotonic() - t0:.0f}s] item "
                      f"{item['id']} {item['category']} {method}: {mark} "
                      f"(got {rec.get('extracted')}, want {item['answer']}, "
                      f"{rec.get('wall_s', 0):.1f}s)", flush=True)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return records


def summarize(records: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    by_item: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if "error" not in r:
            by_item[r["item"]][r["method"]] = r
    complete = sorted(i for i, ms in by_item.items() if all(m in ms for m in methods))
    out: dict[str, Any] = {"items_scored": len(complete), "methods": {}}
    for m in methods:
        rs = [by_item[i][m] for i in complete]
        k, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = wilson(k, n)
        cats = {}
        for c in CATEGORIES:
            cr = [r for r in rs if r["category"] == c]
            cats[c] = [sum(r["correct"] for r in cr), len(cr)]

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return sum(r[key] for r in rs) / len(rs) if rs else 0.0

        out["methods"][m] = {
            "correct": k, "n": n, "accuracy": k / n if n else 0.0, "wilson95": [lo, hi],
            "by_category": cats, "mean_model_calls": mean("model_calls"),
            "mean_prompt_tokens": mean("prompt_tokens"),
            "mean_completion_tokens": mean("completion_tokens"), "mean_wall_s": mean("wall_s"),
            "budget_exhausted": sum(bool(r.get("budget_exhausted")) for r in rs),
        }
    out["errors"] = [r for r in records if "error" in r]
    return out


def report(summary: dict[str, Any], args: argparse.Namespace) -> None:
    headers = ["method", "accuracy", "95% Wilson CI", *CATEGORIES, "model calls/item",
               "tokens/item (prompt+compl)", "wall s/item"]
    rows = []
    for m, s in summary["methods"].items():
        cats = [f"{k}/{n}" for k, n in s["by_category"].values()]
        rows.append([m, f"{s['accuracy']:.1%} ({s['correct']}/{s['n']})",
                     f"{s['wilson95'][0]:.1%} - {s['wilson95'][1]:.1%}", *cats,
                     f"{s['mean_model_calls']:.1f}",
                     f"{s['mean_prompt_tokens']:.0f} + {s['mean_completion_tokens']:.0f}",
                     f"{s['mean_wall_s']:.1f}"])
    print(f"\nItems scored: {summary['items_scored']} (seed {args.seed}; {args.items} generated; "
          f"{args.template} template; sampling T={args.temperature}, N/k={args.n}, "
          f"max_tokens {args.max_tokens}; {args.concurrency} requests at a time)")
    print(table(headers, rows))
    if summary["errors"]:
        print(f"\n{len(summary['errors'])} failed requests, e.g. {summary['errors'][0]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=24, help="items, split over 3 categories")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "tot"),
                   help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--tot", action="store_true", help="also run tot (steps, b=3, d=2)")
    p.add_argument("--template", default="answer_format",
                   choices=["answer_format", "chain_of_thought"],
                   help="Steer template every method gets (both end on an 'Answer:' line)")
    p.add_argument("--n", type=int, default=8, help="best_of_n N and self_consistency k")
    p.add_argument("--temperature", type=float, default=0.4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="3 items, smoke run")
    add_server_args(p, request_timeout=600)
    args = p.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if args.tot and "tot" not in args.methods:
        args.methods.append("tot")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}")
    if args.quick:
        args.items, args.max_tokens = 3, 64
    suffix = ("" if args.template == "answer_format" else "_" + args.template) + (
        "_quick" if args.quick else "")
    out = RESULTS.with_name(f"eval_strategies{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    items = make_items(args.items, args.seed)
    records, facts = run_on_steer(args, "steer-eval", lambda port: evaluate(args, port, items))
    summary = summarize(records, args.methods)
    report(summary, args)
    out.write_text(json.dumps({
        "summary": summary, "items": items, "records": records, "args": vars(args),
        **facts}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
