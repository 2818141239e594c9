"""Game of 24 on the Tree-of-Thoughts paper's test puzzles: plain prompting, chain of thought,
ToT with the value evaluator, and ToT with the exact verifier as its evaluator.

Puzzles: /work/shared/data/game24.csv (column "Puzzles"), rows --start .. --start+--limit
(0-based data rows; the paper tests on 900-999, i.e. Rank 901-1000). Methods, all through
Steer's public API:
  io             the paper's 5-shot standard prompt, --samples samples at T=0.7 (one n=k call)
  cot            the paper's 5-shot chain-of-thought prompt, same sampling
  tot_value      strategy tot, task game24, propose + value (sure/likely/impossible x3),
                 breadth --breadth (paper: 5), depth 3 (+ the answer step)
  tot_verifier   the same search, evaluator "critic" with the exact `game24` critic
Success is decided here, independently of Steer: the first "Answer:" line's expression (left
of "="; without such a line, the last line's, as the paper's checker does) is parsed with
`ast`, evaluated with Fractions, and must use exactly the puzzle's four numbers and equal 24.
For io/cot the success rate is the mean over samples (how the paper reports IO and CoT;
"any of k" is shown too); ToT is judged on the one answer Steer returns. Printed next to
the paper's GPT-4 numbers (IO 7.3%, CoT 4%, ToT b=1 45%, b=5 74%); the default model has
135M parameters, so expect far less. Per puzzle: model calls and tokens (from `usage`, which
counts every call a strategy made) and wall time. Markdown table; JSON in
loadtests/results/eval_game24.json (--quick: eval_game24_quick.json). Starts `steer serve`
on a free 127.0.0.1 port and stops it at the end.

Run:  .venv/bin/python loadtests/eval_game24.py               (--limit 8: ~15-20 min busy 2 cores)
      .venv/bin/python loadtests/eval_game24.py --quick       (1 puzzle, small ToT)
      .venv/bin/python loadtests/eval_game24.py --start 900 --limit 100 --breadth 5
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import csv
import json
import re
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
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

RESULTS = RESULTS_DIR / "eval_game24.json"
DATA = Path("/work/shared/data/game24.csv")
METHODS = ("io", "cot", "tot_value", "tot_verifier")
PAPER = {"io": "IO 7.3%", "cot": "CoT 4.0%", "tot_value": "ToT b=1 45%, b=5 74%",
         "tot_verifier": "- (paper: value evaluator only)"}

# princeton-nlp/tree-of-thought-llm, src/tot/prompts/game24.py
STANDARD = """Use numbers and basic arithmetic operations (+ - * /) to obtain 24.
Input: 4 4 6 8
Answer: (4 + 8) * (6 - 4) = 24
Input: 2 9 10 12
Answer: 2 * 12 * (10 - 9) = 24
Input: 4 9 10 13
Answer: (13 - 9) * (10 - 4) = 24
Input: 1 4 8 8
Answer: (8 / 4 + 1) * 8 = 24
Input: 5 5 5 9
Answer: 5 + 5 + 5 + 9 = 24
Input: {input}
"""
COT = """Use numbers and basic arithmetic operations (+ - * /) to obtain 24. Each step, you are \
only allowed to choose two of the remaining numbers to obtain a new number.
Input: 4 4 6 8
Steps:
4 + 8 = 12 (left: 4 6 12)
6 - 4 = 2 (left: 2 12)
2 * 12 = 24 (left: 24)
Answer: (6 - 4) * (4 + 8) = 24
Input: 2 9 10 12
Steps:
12 * 2 = 24 (left: 9 10 24)
10 - 9 = 1 (left: 1 24)
24 * 1 = 24 (left: 24)
Answer: (12 * 2) * (10 - 9) = 24
Input: 4 9 10 13
Steps:
13 - 10 = 3 (left: 3 4 9)
9 - 3 = 6 (left: 4 6)
4 * 6 = 24 (left: 24)
Answer: 4 * (9 - (13 - 10)) = 24
Input: 1 4 8 8
Steps:
8 / 4 = 2 (left: 1 2 8)
1 + 2 = 3 (left: 3 8)
3 * 8 = 24 (left: 24)
Answer: (1 + 8 / 4) * 8 = 24
Input: 5 5 5 9
Steps:
5 + 5 = 10 (left: 5 9 10)
10 + 5 = 15 (left: 9 15)
15 + 9 = 24 (left: 24)
Answer: ((5 + 5) + 5) + 9 = 24
Input: {input}
"""

# -- the independent checker -----------------------------------------------------------------

_ANSWER_LINE = re.compile(r"(?im)^\s*answer\s*:\s*(.+)$")


def _value(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _value(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand, used)
    if isinstance(node, ast.BinOp):
        a, b = _value(node.left, used), _value(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            if b == 0:
                raise ZeroDivisionError
            return a / b
    raise ValueError(f"not allowed: {ast.dump(node)[:60]}")


def check(puzzle: str, text: str) -> tuple[bool, str]:
    """(solved, why): the first "Answer:" line (else the last line, as the paper's checker)
    must be an expression over exactly the puzzle's numbers, each once, equal to 24 in exact
    arithmetic."""
    m = _ANSWER_LINE.search(text or "")
    lines = (text or "").strip().split("\n")
    if not m and not lines[-1].strip():
        return False, "empty answer"
    # No "Answer:" line: the paper's rule, the last line's left side of "=".
    expr = (m.group(1) if m else lines[-1]).split("=")[0].strip()
    expr = expr.replace("\u00d7", "*").replace("\u00f7", "/").replace("x", "*")
    used: list[int] = []
    try:
        value = _value(ast.parse(expr, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as exc:
        return False, f"cannot evaluate {expr!r}: {type(exc).__name__}"
    want = Counter(int(x) for x in puzzle.split())
    if Counter(used) != want:
        return False, f"uses {sorted(used)}, not {sorted(want.elements())}"
    if value != 24:
        return False, f"{expr} = {value}"
    return True, expr


# -- methods ------------------------------------------------------------------------------


def body(method: str, puzzle: str, args: argparse.Namespace) -> dict[str, Any]:
    if method in ("io", "cot"):
        prompt = (STANDARD if method == "io" else COT).format(input=puzzle)
        return {"messages": [{"role": "user", "content": prompt}], "n": args.samples,
                "temperature": 0.7, "max_tokens": 48 if method == "io" else 160,
                "stop": ["\nInput:"]}
    options = {"task": "game24", "breadth": args.breadth, "depth": 3,
               "n_evaluate": args.n_evaluate, "step_tokens": args.step_tokens,
               "value_tokens": args.value_tokens}
    steering: dict[str, Any] = {"strategy": "tot", "options": options}
    if method == "tot_verifier":
        options["evaluator"] = "critic"
        steering["critic"] = {"name": "game24"}
    question = (f"Use the numbers {puzzle} and basic arithmetic operations (+ - * /) to "
                "obtain 24.")
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 96,
            "temperature": 0.7, "steering": steering}


async def run_one(http: httpx.AsyncClient, port: int, idx: int, puzzle: str, method: str,
                  args: argparse.Namespace) -> dict[str, Any]:
    rec: dict[str, Any] = {"index": idx, "puzzle": puzzle, "method": method}
    t0 = time.perf_counter()
    try:
        r = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"model": MODEL, **body(method, puzzle, args)})
    except httpx.HTTPError as exc:
        return rec | {"error": f"{type(exc).__name__}: {exc}"}
    rec["wall_s"] = time.perf_counter() - t0
    if r.status_code != 200:
        return rec | {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
    data = r.json()
    texts = [c["message"]["content"] or "" for c in data["choices"]]
    checks = [check(puzzle, t) for t in texts]
    usage = data.get("usage") or {}
    steer = usage.get("steering") or {}
    return rec | {
        "success": sum(ok for ok, _ in checks) / len(checks), "any": any(ok for ok, _ in checks),
        "why": [why for _, why in checks][:3], "texts": [t[:300] for t in texts][:3],
        "model_calls": steer.get("model_calls", len(texts)),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "budget_exhausted": steer.get("budget_exhausted")}


async def evaluate(args: argparse.Namespace, port: int,
                   puzzles: list[tuple[int, str]]) -> list[dict[str, Any]]:
    jobs = [(i, p, m) for i, p in puzzles for m in args.methods]  # puzzle-major
    queue = iter(jobs)
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.deadline_min * 60
    t0 = time.monotonic()
    async with httpx.AsyncClient(trust_env=False, timeout=args.request_timeout) as http:
        async def worker() -> None:
            for i, p, m in queue:
                if time.monotonic() > deadline:
                    return
                rec = await run_one(http, port, i, p, m, args)
                records.append(rec)
                what = rec.get("error") or (f"success {rec['success']:.2f}, "
                                            f"{rec['model_calls']} calls, {rec['wall_s']:.0f}s "
                                            f"({rec['why'][0]})")
                print(f"[{len(records)}/{len(jobs)} {time.monotonic() - t0:.0f}s] #{i} {p} "
                      f"{m}: {what}", flush=True)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return records


def summarize(records: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    done: dict[int, dict[str, dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            done.setdefault(r["index"], {})[r["method"]] = r
    complete = sorted(i for i, ms in done.items() if all(m in ms for m in methods))
    out: dict[str, Any] = {"puzzles_scored": len(complete), "indices": complete, "methods": {}}
    for m in methods:
        rs = [done[i][m] for i in complete]
        n = len(rs)
        solved = sum(r["success"] for r in rs)  # a mean over samples for io/cot
        # Wilson on the count of solved puzzles (io/cot: solved-sample fraction, rounded)
        lo, hi = wilson(round(solved), n)

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return sum(r[key] for r in rs) / len(rs) if rs else 0.0

        out["methods"][m] = {
            "success": solved / n if n else 0.0, "solved": solved, "n": n,
            "any_of_samples": sum(r["any"] for r in rs), "wilson95": [lo, hi],
            "mean_model_calls": mean("model_calls"),
            "mean_prompt_tokens": mean("prompt_tokens"),
            "mean_completion_tokens": mean("completion_tokens"),
            "mean_wall_s": mean("wall_s"),
            "budget_exhausted": sum(bool(r.get("budget_exhausted")) for r in rs)}
    out["errors"] = [r for r in records if "error" in r]
    return out


def report(s: dict[str, Any], args: argparse.Namespace) -> None:
    idx = s["indices"]
    span = f"rows {idx[0]}-{idx[-1]}" if idx else "none"
    print(f"\nGame of 24: {s['puzzles_scored']} puzzles scored ({span} of {DATA.name}, the "
          f"paper's test set is 900-999); io/cot: {args.samples} samples at T=0.7, success = "
          f"mean over samples; ToT: breadth {args.breadth}, depth 3, n_evaluate "
          f"{args.n_evaluate}, step/value tokens {args.step_tokens}/{args.value_tokens}, "
          f"{args.concurrency} puzzle requests at a time")
    headers = ["method", "success", "95% Wilson CI", "paper (GPT-4)", "model calls/puzzle",
               "tokens/puzzle (prompt+compl)", "wall s/puzzle"]
    rows = []
    for m, r in s["methods"].items():
        any_s = f", any-of-{args.samples}: {r['any_of_samples']}" if m in ("io", "cot") else ""
        rows.append([m, f"{r['success']:.1%} ({r['solved']:.1f}/{r['n']}{any_s})",
                     f"{r['wilson95'][0]:.1%} - {r['wilson95'][1]:.1%}", PAPER[m],
                     f"{r['mean_model_calls']:.1f}",
                     f"{r['mean_prompt_tokens']:.0f} + {r['mean_completion_tokens']:.0f}",
                     f"{r['mean_wall_s']:.1f}"])
    print(table(headers, rows))
    if s["errors"]:
        print(f"\n{len(s['errors'])} failed requests, e.g. {s['errors'][0]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", type=int, default=900)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--samples", type=int, default=10, help="io/cot samples per puzzle")
    p.add_argument("--breadth", type=int, default=5)
    p.add_argument("--n-evaluate", type=int, default=3)
    p.add_argument("--step-tokens", type=int, default=160)
    p.add_argument("--value-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 puzzle, breadth 2, short steps")
    add_server_args(p, request_timeout=1200)
    args = p.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - set(METHODS):
        p.error(f"methods are {', '.join(METHODS)}")
    if args.quick:
        args.limit, args.breadth, args.samples = 1, 2, 4
        args.step_tokens, args.value_tokens = 96, 24
    with DATA.open() as f:
        rows = [r["Puzzles"] for r in csv.DictReader(f)]
    puzzles = list(enumerate(rows))[args.start:args.start + args.limit]
    out = RESULTS.with_name("eval_game24_quick.json") if args.quick else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    records, facts = run_on_steer(args, "steer-game24",
                                  lambda port: evaluate(args, port, puzzles))
    summary = summarize(records, args.methods)
    report(summary, args)
    out.write_text(json.dumps({
        "summary": summary, "records": records, "args": vars(args), **facts}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
