"""What steering costs in wall time: each strategy over its critical path, over the engine
floor, against optillm at equal N, and against the same Steer with batching turned off.

Measured in one run on one machine (the ratios cancel out the machine's speed and, since the
variants are interleaved and repeated, most of the noise of a shared machine):

1. best_of_n and self_consistency at N = 4 and 8 (max_tokens 128, each strategy's default
   temperature, a long-answer prompt so every sample runs to the limit): wall time over ONE
   plain completion of the same length (the critical path), and over the floor: the engine
   alone producing the same N samples in one batch (a plain request with n=N, same
   max_tokens and temperature). Target: strategy / floor <= 1.15.
2. optillm 0.4.0 (its own venv, --optillm-venv) as a proxy in front of vLLM's own OpenAI
   server (same engine settings as Steer): `bon` (N from its --best-of-n flag: one n=N call
   at T=1, then N sequential rating calls), `self_consistency` (fixed at 5 sequential calls at
   T=1 in optillm 0.4.0, not configurable) and its `majority_voting` plugin (one n=k call),
   against Steer at the same N. Upstream calls and tokens are read from vLLM's /metrics.
   Target: Steer at least 2x faster at equal N.
3. tot (task game24, breadth 5, depth 2, small step/value token limits, greedy with one
   value sample per state so that both servers search the same tree; --tot-* flags change
   it), reflection (max_iters 2) and debate (3 agents x 2 rounds): wall time over the
   critical path (one plain completion per sequential round, each round as long as its
   longest generation, from the trace; t(L) = a + b*L fitted on plain completions of two
   lengths), and the speedup over the same request on a `steer serve --no-batching` server
   (every sequence its own engine call, one at a time; also per model call, since sampled
   searches differ in size). Target: tot >= 3x faster than sequential.

Servers: one Steer stays up throughout; vLLM + optillm are up for part 2 only, the
--no-batching Steer for part 3 only; only one server is under load at any time. Each
measurement is repeated --reps times, interleaved, and medians are reported (ratios are
medians of per-repetition ratios). One markdown table; JSON in
loadtests/results/bench_strategies.json (--quick: bench_strategies_quick.json). Traffic goes
to 127.0.0.1 only.

Run:  .venv/bin/python loadtests/bench_strategies.py            (full: ~40-70 min on 2 busy cores)
      .venv/bin/python loadtests/bench_strategies.py --quick    (smoke run, ~10 min: 4 servers)
      .venv/bin/python loadtests/bench_strategies.py --reuse-part1 old.json   (part 3 only;
      part 1/2 rows are taken from an earlier run's JSON and marked as such)
optillm: python3.11 -m venv /tmp/optillm-venv && /tmp/optillm-venv/bin/pip install --no-deps
      optillm==0.4.0 && /tmp/optillm-venv/bin/pip install flask cerebras_cloud_sdk openai
      networkx numpy "z3-solver<=4.15.4.0" sympy aiohttp pyyaml math-verify httpx
      (its declared deps pull torch, transformers, spacy, gradio...; the proxy needs none of
      them). Without it the optillm rows say why they are missing (--no-optillm skips them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from harness import (
    DEFAULT_CACHE,
    MODEL,
    RESULTS_DIR,
    Server,
    base_env,
    free_port,
    machine,
    on_sigterm,
    prepare_model,
    steer_server,
    table,
    vllm_server,
)

RESULTS = RESULTS_DIR / "bench_strategies.json"
ESSAY = ("Write a long, detailed essay about ocean tides. Cover its history, how it works "
         "today, and its future, with many examples.")
PUZZLE = ("Use the numbers 4 5 6 10 and basic arithmetic operations (+ - * /) to obtain "
          "24.")
PROBLEM = ("A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 3 boxes "
           "of 6 muffins and gives 5 muffins to a neighbour. How many muffins are left?")
BON_T, SC_T, OPTILLM_T = 0.8, 0.7, 1.0  # Steer's defaults; optillm samples at T=1


class Deadline(Exception):
    pass


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.http = httpx.AsyncClient(trust_env=False, timeout=args.request_timeout)
        self.t_end = time.monotonic() + args.deadline_min * 60
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.errors: list[str] = []

    def left(self) -> float:
        return float(self.t_end - time.monotonic())

    async def chat(self, port: int, body: dict[str, Any]) -> dict[str, Any]:
        if self.left() <= 0:
            raise Deadline
        body = {"model": MODEL, **body}
        t0 = time.perf_counter()
        r = await self.http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
        wall = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code} from :{port}: {r.text[:500]}")
        data = r.json()
        usage = data.get("usage") or {}
        return {"wall": wall, "usage": usage, "steering": usage.get("steering") or {},
                "finish": [c.get("finish_reason") for c in data.get("choices", [])],
                "text": (data.get("choices") or [{}])[0].get("message", {}).get("content"),
                "trace": compact(data.get("steering_trace"))}

    async def metrics(self, port: int) -> dict[str, float]:
        """vLLM's request and token counters (summed over label sets)."""
        text = (await self.http.get(f"http://127.0.0.1:{port}/metrics")).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            if line.startswith("http_requests_total{") and "/v1/chat/completions" in line:
                out["http:chat_requests"] = (out.get("http:chat_requests", 0.0)
                                             + float(line.rsplit(" ", 1)[1]))
            for name in ("vllm:request_success_total", "vllm:prompt_tokens_total",
                         "vllm:generation_tokens_total"):
                if line.startswith(name):
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    async def measure(self, key: str, port: int, body: dict[str, Any],
                      vllm_port: int | None = None) -> None:
        """One timed request, recorded under `key`; errors are recorded, not raised."""
        before = await self.metrics(vllm_port) if vllm_port else {}
        try:
            res = await self.chat(port, body)
        except Deadline:
            raise
        except Exception as exc:  # a failed variant must not sink the whole benchmark
            self.errors.append(f"{key}: {exc}")
            print(f"  {key}: ERROR {exc}", flush=True)
            return
        if vllm_port:
            after = await self.metrics(vllm_port)
            res["upstream"] = {k.split(":")[1]: after.get(k, 0) - before.get(k, 0)
                               for k in after}
        text = res.pop("text", None)
        tokens = res["usage"].get("completion_tokens") or 0
        if text and tokens and len(res["finish"]) == 1:
            res["chars_per_token"] = len(text) / tokens
        self.samples.setdefault(key, []).append(res)
        st = res["steering"]
        up = res.get("upstream", {})
        print(f"  {key}: {res['wall']:.2f}s tokens={res['usage'].get('completion_tokens')}"
              + (f" calls={st.get('model_calls')}" if st else "")
              + (f" upstream_requests={up.get('request_success_total'):.0f}" if up else ""),
              flush=True)


# -- request bodies -----------------------------------------------------------------------------


def essay(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": ESSAY}], "max_tokens": max_tokens, **extra}


def steered(max_tokens: int, strategy: str, options: dict[str, Any], prompt: str = ESSAY,
            **steering: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "steering": {"strategy": strategy, "options": options, **steering}}


def part1_plan(args: argparse.Namespace, optillm: dict[int, Server] | None,
               vllm: Server | None, steer: Server) -> list[tuple[str, int, dict[str, Any],
                                                               int | None]]:
    m = args.max_tokens
    plan: list[tuple[str, int, dict[str, Any], int | None]] = [
        ("plain", steer.port, essay(m, temperature=0), None)]
    for n in args.ns:
        plan += [
            (f"floor_T{BON_T}_n{n}", steer.port, essay(m, n=n, temperature=BON_T), None),
            (f"bon_n{n}", steer.port, steered(m, "best_of_n", {"n": n}), None),
            (f"floor_T{SC_T}_n{n}", steer.port, essay(m, n=n, temperature=SC_T), None),
            (f"sc_n{n}", steer.port, steered(m, "self_consistency", {"k": n}), None),
        ]
    if optillm and vllm:
        vp = vllm.port
        for n, proxy in optillm.items():
            plan += [
                (f"steer_bon_judge_n{n}", steer.port, steered(
                    m, "best_of_n", {"n": n, "temperature": OPTILLM_T},
                    critic={"name": "llm_judge"}), None),
                (f"optillm_bon_n{n}", proxy.port, essay(m, model=f"bon-{MODEL}"), vp),
                (f"optillm_mv_n{n}", proxy.port, essay(
                    m, model=f"majority_voting-{MODEL}", k=n, temperature=SC_T), vp),
            ]
        proxy = next(iter(optillm.values()))
        plan += [
            ("steer_sc_n5_T1", steer.port, steered(
                m, "self_consistency", {"k": 5, "temperature": OPTILLM_T}), None),
            ("optillm_sc_n5", proxy.port, essay(m, model=f"self_consistency-{MODEL}"), vp),
        ]
    return plan


def part3_bodies(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    m = args.round_tokens
    tot = {"task": args.tot_task, "breadth": args.tot_breadth, "depth": args.tot_depth,
           "step_tokens": args.step_tokens, "value_tokens": args.value_tokens,
           "n_evaluate": args.tot_evaluate, "temperature": args.tot_temperature}
    question = PUZZLE if args.tot_task == "game24" else PROBLEM
    body = steered(m, "tot", tot, question, trace=True)
    if args.tot_temperature == 0:
        body["temperature"] = 0  # the conclusion (task steps) greedy too
    return {
        "tot": body,
        "reflection": steered(m, "reflection", {"max_iters": args.reflection_iters}, PROBLEM,
                              trace=True),
        "debate": steered(m, "debate", {"agents": 3, "rounds": 2}, PROBLEM, trace=True),
    }


# -- critical path -----------------------------------------------------------------------------


def compact(trace: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the critical path needs from a trace: per node its role, round, tokens and the
    length of its text (and of its value outputs, for which the trace keeps text only)."""
    if not trace:
        return None
    return {"nodes": [{"role": n["role"], "round": n["round"], "tokens": n["tokens"],
                       "chars": len(n["text"]),
                       "value_chars": [len(o) for o in n["meta"].get("value_outputs", [])]}
                      for n in trace.get("nodes", [])]}


def rounds_from_trace(name: str, trace: dict[str, Any], args: argparse.Namespace,
                      chars_per_token: float) -> list[int]:
    """Each sequential engine round's longest generation, in tokens (estimated from text
    length where the trace keeps only text)."""
    nodes = trace.get("nodes", [])

    def est(chars: int, cap: int) -> int:
        return max(1, min(cap, math.ceil(chars / chars_per_token)))

    rounds: list[int] = []
    if name == "tot":
        levels = sorted({n["round"] for n in nodes if n["role"] == "thought"})
        for lvl in levels:
            at = [n for n in nodes if n["role"] == "thought" and n["round"] == lvl]
            rounds.append(max(n["tokens"] for n in at))  # expansion: one batch
            outs = [o for n in at for o in n["value_chars"]]
            if outs:  # valuation: one batch
                rounds.append(max(est(o, args.value_tokens) for o in outs))
        rounds += [est(n["chars"], args.round_tokens) for n in nodes if n["role"] == "final"]
    elif name == "reflection":
        for n in nodes:
            if n["role"] in ("draft", "revision"):
                rounds += [n["tokens"], 1]  # the version, then the llm_judge verdict (1 token)
            elif n["role"] == "feedback":
                rounds.append(n["tokens"])
    elif name == "debate":
        agents = [n for n in nodes if n["role"].startswith("agent")]
        for r in sorted({n["round"] for n in agents}):
            rounds.append(max(n["tokens"] for n in agents if n["round"] == r))
    return rounds


# -- the run -----------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def per_rep_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float | None:
    """Median over repetitions of a[i].wall / b[i].wall (interleaved, so same conditions)."""
    pairs = [x["wall"] / y["wall"] for x, y in zip(a, b, strict=False) if y["wall"] > 0]
    return median(pairs)


def shrink(body: dict[str, Any]) -> dict[str, Any]:
    """The same request, cut short: warms every code path (first-request costs are large:
    the first best_of_n on a fresh server took 2.5x its later runs) without the full cost."""
    small = dict(body, max_tokens=8)
    if "steering" in small:
        st = dict(small["steering"])
        if st.get("strategy") == "tot":
            st["options"] = dict(st["options"], depth=1, step_tokens=8, value_tokens=4)
        small["steering"] = st
    return small


async def warm(bench: Bench, port: int, body: dict[str, Any]) -> None:
    try:
        await bench.chat(port, shrink(body))
    except Deadline:
        raise
    except Exception as exc:
        print(f"  warm-up failed: {exc}", flush=True)


async def part1(bench: Bench, plan: list[tuple[str, int, dict[str, Any], int | None]]) -> None:
    print("part 1/2: warming every variant", flush=True)
    for _key, port, body, _vport in plan:
        await warm(bench, port, body)
    for rep in range(bench.args.reps):
        order = plan if rep % 2 == 0 else plan[::-1]
        print(f"part 1/2, repetition {rep + 1}/{bench.args.reps}", flush=True)
        for key, port, body, vport in order:
            await bench.measure(key, port, body, vport)


async def part3(bench: Bench, steer: Server, seq: Server | None) -> None:
    args = bench.args
    bodies = part3_bodies(args)
    print("part 3: warming every variant", flush=True)
    for body in bodies.values():
        for srv in (steer, seq):
            if srv:
                await warm(bench, srv.port, body)
    for rep in range(args.reps):
        print(f"part 3, repetition {rep + 1}/{args.reps}", flush=True)
        # Calibration for t(L) = a + b*L: plain completions of two lengths, this repetition.
        await bench.measure("calib_short", steer.port, essay(args.calib_short, temperature=0))
        await bench.measure("calib_long", steer.port, essay(args.max_tokens, temperature=0))
        for name, body in bodies.items():
            servers = [("", steer)] + ([("seq_", seq)] if seq else [])
            for prefix, srv in servers if rep % 2 == 0 else servers[::-1]:
                await bench.measure(prefix + name, srv.port, body)


def calibration(samples: dict[str, list[dict[str, Any]]]) -> list[tuple[float, float]]:
    """Per repetition (a, b) of t(L) = a + b*L from the two plain completions."""
    out = []
    for s, lg in zip(samples.get("calib_short", []), samples.get("calib_long", []),
                     strict=False):
        ls, ll = s["usage"]["completion_tokens"], lg["usage"]["completion_tokens"]
        b = (lg["wall"] - s["wall"]) / (ll - ls) if ll != ls else lg["wall"] / max(ll, 1)
        out.append((max(0.0, s["wall"] - b * ls), b))
    return out


def chars_per_token(samples: dict[str, list[dict[str, Any]]]) -> float:
    """This model's output characters per token, for traces that keep only text."""
    plain = samples.get("calib_long", []) + samples.get("plain", [])
    cpts = [r["chars_per_token"] for r in plain if "chars_per_token" in r]
    return statistics.median(cpts) if cpts else 4.0


def summarize(args: argparse.Namespace, S: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    cpt = chars_per_token(S)
    rows: dict[str, dict[str, Any]] = {}
    for key, runs in S.items():
        usage = [r["usage"] for r in runs]
        rows[key] = {
            "reps": len(runs), "wall_s": median([r["wall"] for r in runs]),
            "walls": [round(r["wall"], 3) for r in runs],
            "completion_tokens": median([u.get("completion_tokens", 0) for u in usage]),
            "prompt_tokens": median([u.get("prompt_tokens", 0) or 0 for u in usage]),
            "model_calls": median([r["steering"].get("model_calls", 0) for r in runs]),
            "finish": runs[-1]["finish"],
        }
        if runs[0].get("upstream"):
            rows[key]["upstream"] = {k: median([r["upstream"].get(k, 0) for r in runs])
                                     for k in runs[0]["upstream"]}
    # part 1: over the critical path (one plain completion) and over the floor
    for n in args.ns:
        for strat, temp in (("bon", BON_T), ("sc", SC_T)):
            key, floor = f"{strat}_n{n}", f"floor_T{temp}_n{n}"
            if key in S and floor in S:
                rows[key]["over_floor"] = per_rep_ratio(S[key], S[floor])
                rows[floor]["over_crit"] = per_rep_ratio(S[floor], S.get("plain", []))
            if key in S:
                rows[key]["over_crit"] = per_rep_ratio(S[key], S.get("plain", []))
        for steer_key, opt_key in ((f"bon_n{n}", f"optillm_bon_n{n}"),
                                   (f"steer_bon_judge_n{n}", f"optillm_bon_n{n}"),
                                   (f"sc_n{n}", f"optillm_mv_n{n}")):
            if steer_key in S and opt_key in S:
                rows[steer_key].setdefault("vs_optillm", {})[opt_key] = per_rep_ratio(
                    S[steer_key], S[opt_key])
        for key in (f"steer_bon_judge_n{n}", f"optillm_bon_n{n}", f"optillm_mv_n{n}"):
            if key in S:
                rows[key]["over_crit"] = per_rep_ratio(S[key], S.get("plain", []))
    if "steer_sc_n5_T1" in S and "optillm_sc_n5" in S:
        rows["steer_sc_n5_T1"]["vs_optillm"] = {"optillm_sc_n5": per_rep_ratio(
            S["steer_sc_n5_T1"], S["optillm_sc_n5"])}
    for key in ("steer_sc_n5_T1", "optillm_sc_n5"):
        if key in S:
            rows[key]["over_crit"] = per_rep_ratio(S[key], S.get("plain", []))
    # part 3: critical path from the trace, and speedup over no batching
    calib = calibration(S)
    for name in ("tot", "reflection", "debate"):
        if name not in S:
            continue
        ratios, crits, rounds_n = [], [], []
        for i, run in enumerate(S[name]):
            a, b = calib[min(i, len(calib) - 1)] if calib else (0.0, 0.0)
            rounds = rounds_from_trace(name, run.get("trace") or {}, args, cpt)
            crit = sum(a + b * t for t in rounds)
            rounds_n.append(len(rounds))
            crits.append(crit)
            if crit > 0:
                ratios.append(run["wall"] / crit)
        rows[name] |= {"critical_path_s": median(crits), "over_crit": median(ratios),
                       "sequential_rounds": median(rounds_n)}
        if "seq_" + name in S:
            rows[name]["speedup_vs_sequential"] = per_rep_ratio(S["seq_" + name], S[name])
            # per generated token: sampled searches (and answers) differ in length
            per_token = [(q["wall"] / max(1, q["usage"].get("completion_tokens", 1)))
                         / (b["wall"] / max(1, b["usage"].get("completion_tokens", 1)))
                         for q, b in zip(S["seq_" + name], S[name], strict=False)]
            rows[name]["speedup_per_token"] = median(per_token)
    return {"rows": rows, "calibration_ab": calib, "chars_per_token": cpt}


def fmt(x: float | None, nd: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{nd}f}{suffix}"


LABELS = {
    "plain": "plain completion, T=0 (the critical path of one round)",
    "floor": "floor: plain n={n}, T={t} (engine alone, one batch)",
    "bon": "best_of_n N={n} (logprob critic, T=0.8)",
    "sc": "self_consistency k={n} (T=0.7)",
    "steer_bon_judge": "best_of_n N={n} + llm_judge critic, T=1",
    "optillm_bon": "optillm bon N={n} (vLLM server)",
    "optillm_mv": "optillm majority_voting k={n}, T=0.7 (vLLM server)",
    "steer_sc_n5_T1": "self_consistency k=5, T=1",
    "optillm_sc_n5": "optillm self_consistency (5 samples, T=1; vLLM server)",
}


def label(key: str, args: argparse.Namespace) -> str:
    if key.startswith("floor_T"):
        t, n = key[len("floor_T"):].split("_n")
        return LABELS["floor"].format(n=n, t=t)
    if key in LABELS:
        return LABELS[key]
    if key in ("tot", "seq_tot"):
        s = (f"tot {args.tot_task} b={args.tot_breadth} d={args.tot_depth} "
             f"n_evaluate={args.tot_evaluate} T={args.tot_temperature} step/value tokens "
             f"{args.step_tokens}/{args.value_tokens}")
    elif key.endswith("reflection"):
        s = f"reflection max_iters={args.reflection_iters} (llm_judge)"
    elif key.endswith("debate"):
        s = "debate 3 agents x 2 rounds"
    else:
        base, _, n = key.rpartition("_n")
        return LABELS.get(base, key).format(n=n)
    return s + (" [--no-batching server]" if key.startswith("seq_") else "")


def report(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    rows = res["rows"]
    headers = ["variant", "wall s (median)", "/ critical path", "/ floor (n=N batch)",
               "Steer / optillm", "speedup vs no-batching", "model calls",
               "completion tok", "prompt tok"]
    body = []
    for key, r in rows.items():
        if key.startswith("calib"):
            continue
        vs = r.get("vs_optillm") or {}
        calls = r["model_calls"]
        ctoks, ptoks = r["completion_tokens"], r["prompt_tokens"]
        if "upstream" in r:  # optillm: what reached vLLM (its own usage omits the ratings)
            up = r["upstream"]
            calls_s = (f"{up.get('chat_requests', 0):.0f} upstream HTTP calls = "
                       f"{up.get('request_success_total', 0):.0f} sequences")
            ctoks = up.get("generation_tokens_total", 0)
            ptoks = up.get("prompt_tokens_total", 0)
        else:
            calls_s = fmt(calls, 0) if calls else ("1 (n)" if key.startswith(("plain", "floor"))
                                                   else "-")
        body.append([
            label(key, args), fmt(r["wall_s"]) + f" ({r['reps']}x)",
            fmt(r.get("over_crit")) + (f" ({fmt(r['critical_path_s'], 1)}s, "
                                       f"{r['sequential_rounds']:.0f} rounds)"
                                       if "critical_path_s" in r else ""),
            fmt(r.get("over_floor")),
            "; ".join(f"{fmt(v)} vs {k}" for k, v in vs.items()) or "-",
            fmt(r.get("speedup_vs_sequential"), 2, "x") + (
                f" ({fmt(r['speedup_per_token'], 2, 'x')} per generated token)"
                if "speedup_per_token" in r else ""),
            calls_s, fmt(ctoks, 0), fmt(ptoks, 0)])
    print("\n" + table(headers, body))
    verdicts = []
    for n in args.ns:
        for k in (f"bon_n{n}", f"sc_n{n}"):
            v = rows.get(k, {}).get("over_floor")
            if v is not None:
                verdicts.append(f"{k} / floor = {v:.2f} (target <= 1.15): "
                                f"{'MET' if v <= 1.15 else 'MISSED'}")
    for k, r in rows.items():
        for opt, v in (r.get("vs_optillm") or {}).items():
            if v is not None:
                verdicts.append(f"{k} / {opt} = {v:.2f} (target <= 0.5, i.e. Steer >= 2x "
                                f"faster): {'MET' if v <= 0.5 else 'MISSED'}")
    sp = rows.get("tot", {}).get("speedup_vs_sequential")
    if sp is not None:
        verdicts.append(f"tot speedup vs no-batching = {sp:.2f}x (target >= 3x): "
                        f"{'MET' if sp >= 3 else 'MISSED'}")
    print("\nTargets:\n" + "\n".join("- " + v for v in verdicts))
    return verdicts


def start_optillm(args: argparse.Namespace, vllm: Server, logdir: Path) -> dict[int, Server]:
    exe = Path(args.optillm_venv) / "bin" / "optillm"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found (install optillm into --optillm-venv; see the "
                           "module docstring)")
    out = {}
    for n in args.ns:  # optillm's bon N is a server flag (--best-of-n), one proxy per N
        port = free_port()
        cmd = [str(exe), "--base-url", f"{vllm.base_url}/v1", "--host", "127.0.0.1",
               "--port", str(port), "--best-of-n", str(n), "--log", "warning"]
        env = base_env() | {"OPENAI_API_KEY": "none"}
        srv = Server(f"optillm-bon{n}", port, cmd, env, logdir / f"optillm-bon{n}.log")
        out[n] = srv
        print(f"starting {srv.name} on :{port}", flush=True)
        srv.start(120)
    return out


async def run(args: argparse.Namespace, model_path: str, logdir: Path,
              started: list[Server], old: dict[str, Any] | None) -> dict[str, Any]:
    bench = Bench(args)
    notes: list[str] = []
    steer = steer_server("steer", args.cache_dir, logdir, kv_cache_gib=args.kv_cache_gib)
    started.append(steer)
    print(f"starting steer on :{steer.port}", flush=True)
    steer.start(args.start_timeout)
    try:
        warm = essay(16, temperature=0)
        await bench.chat(steer.port, warm | {"n": max(args.ns), "temperature": BON_T})
        # part 1 (+2): Steer, and optillm over vLLM when available
        vllm, optillm = None, None
        if old is not None:
            bench.samples |= {k: v for k, v in old["samples"].items()
                              if not k.startswith(("calib", "tot", "reflection", "debate",
                                                   "seq_"))}
            notes.append(f"part 1/2 rows reused from {args.reuse_part1} (run of "
                         f"{old['machine']['time']}, reps {old['args']['reps']})")
            notes += [n for n in old.get("notes", []) if "part 3" not in n]
            bench.errors += old.get("errors", [])
        elif not args.no_optillm:
            try:
                vllm = vllm_server("vllm", model_path, logdir, args.kv_cache_gib)
                started.append(vllm)
                print(f"starting vllm on :{vllm.port}", flush=True)
                vllm.start(args.start_timeout)
                await bench.chat(vllm.port, warm)
                optillm = start_optillm(args, vllm, logdir)
                started.extend(optillm.values())
                for proxy in optillm.values():  # first-request costs out of the way
                    await bench.chat(proxy.port, essay(8, model=f"none-{MODEL}"))
            except Exception as exc:
                notes.append(f"optillm rows missing: {exc}")
                print(f"optillm unavailable: {exc}", flush=True)
                optillm = None
        if old is None:
            plan = part1_plan(args, optillm, vllm, steer)
            try:
                await part1(bench, plan)
            except Deadline:
                notes.append("deadline reached during part 1/2; fewer repetitions")
        for srv in [*(optillm or {}).values(), *([vllm] if vllm else [])]:
            srv.stop()
        # part 3: tot, reflection, debate; batched and --no-batching
        seq = None
        if not args.no_sequential:
            seq = steer_server("steer-seq", args.cache_dir, logdir, "--no-batching",
                               kv_cache_gib=args.kv_cache_gib)
            started.append(seq)
            print(f"starting steer --no-batching on :{seq.port}", flush=True)
            seq.start(args.start_timeout)
            await bench.chat(seq.port, warm)
        try:
            await part3(bench, steer, seq)
        except Deadline:
            notes.append("deadline reached during part 3; fewer repetitions")
    finally:
        await bench.http.aclose()
    res = summarize(args, bench.samples)
    res |= {"notes": notes, "errors": bench.errors, "samples": bench.samples}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 rep, N=4, short outputs")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8])
    p.add_argument("--max-tokens", type=int, default=128, help="per sample, part 1/2")
    p.add_argument("--round-tokens", type=int, default=96,
                   help="max_tokens of tot's conclusion, reflection and debate generations")
    p.add_argument("--calib-short", type=int, default=16)
    p.add_argument("--tot-task", default="game24", choices=["game24", "steps"])
    p.add_argument("--tot-breadth", type=int, default=5)
    p.add_argument("--tot-evaluate", type=int, default=1, help="tot n_evaluate")
    p.add_argument("--tot-temperature", type=float, default=0.0,
                   help="0 (default): greedy, so both servers search the same tree")
    p.add_argument("--tot-depth", type=int, default=2)
    p.add_argument("--step-tokens", type=int, default=96)
    p.add_argument("--value-tokens", type=int, default=24)
    p.add_argument("--reflection-iters", type=int, default=2)
    p.add_argument("--optillm-venv", default="/tmp/optillm-venv")
    p.add_argument("--no-optillm", action="store_true")
    p.add_argument("--reuse-part1", metavar="JSON",
                   help="take part 1/2 samples from an earlier run's JSON; run part 3 only")
    p.add_argument("--no-sequential", action="store_true", help="skip the --no-batching server")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--kv-cache-gib", type=int, default=1,
                   help="CPU KV cache of every engine (Steer and vLLM alike); 1 GiB holds "
                        "~46k tokens, enough here, and two engines fit in less memory")
    p.add_argument("--start-timeout", type=float, default=400)
    p.add_argument("--request-timeout", type=float, default=900)
    p.add_argument("--deadline-min", type=float, default=110,
                   help="stop starting measurements after this many minutes")
    p.add_argument("--report-only", metavar="JSON",
                   help="print the table again from a saved run (no servers)")
    args = p.parse_args()
    if args.report_only:
        res = json.loads(Path(args.report_only).read_text())
        saved = p.parse_args([])  # defaults for flags an older run did not have
        vars(saved).update(res["args"])
        res |= summarize(saved, res["samples"])
        report(res, saved)
        for note in res["notes"] + res["errors"]:
            print("note: " + note)
        return 0
    if args.quick:
        args.reps, args.ns, args.max_tokens, args.round_tokens = 1, [4], 32, 32
        args.tot_depth, args.reflection_iters, args.step_tokens = 1, 1, 32
        args.value_tokens, args.deadline_min = 8, min(args.deadline_min, 25)
    out = RESULTS.with_name("bench_strategies_quick.json") if args.quick else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    on_sigterm()
    model_path = prepare_model(args.cache_dir)
    logdir = out.parent / out.name.replace(".json", "_logs")
    started: list[Server] = []
    t0 = time.monotonic()
    try:
        old = json.loads(Path(args.reuse_part1).read_text()) if args.reuse_part1 else None
        res = asyncio.run(run(args, model_path, logdir, started, old))
    finally:
        for srv in started:
            srv.stop()
    res |= {"args": vars(args), "model_path": model_path, "machine": machine(),
            "elapsed_s": time.monotonic() - t0,
            "peak_rss_mib": {s.name: s.peak_rss / 2**20 for s in started}}
    res["targets"] = report(res, args)
    for note in res["notes"] + res["errors"]:
        print("note: " + note)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"\nJSON: {out}  (server logs: {logdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
