"""The markdown report of bench_hostile.py, from its results JSON (so an old run can be
re-printed: `python loadtests/hostile_report.py loadtests/results/bench_hostile.json`)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import table
from hostile_attacks import CONN_ERROR, GROUPS, TIMEOUT, UPLOAD_CUT

P50_TARGET, HEALTH_TARGET = 1.2, 1.0


@dataclass
class Outcome:
    label: str  # an HTTP status, or one of hostile_attacks' labels
    latency: float
    param: str | None = None  # the field a 4xx named
    detail: str | None = None  # the exception behind a timeout or connection error


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] if xs else math.nan  # nearest rank


def expected(label: str, expect: list[str]) -> bool:
    return label in expect or ("4xx" in expect and len(label) == 3 and label.startswith("4"))


def secs(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f} s" if x >= 0.1 else f"{1000 * x:.0f} ms"


def times(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def cpu(ph: dict[str, Any]) -> str:
    return (f"{ph['server_front_cpu_s']:.0f} + {ph['server_engine_cpu_s']:.0f} / "
            f"{ph['bench_cpu_s']:.0f}")


def counts(labels: list[str]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in sorted(Counter(labels).items())) or "-"


def phase_facts(ph: dict[str, Any]) -> dict[str, Any]:
    ok = [r["latency"] for r in ph["normal"] if r["label"] == "ok"]
    health = [r["latency"] for r in ph["health"]]
    ttft = [r["ttft"] for r in ph["normal"] if r["label"] == "ok" and r["ttft"] is not None]
    return {"p50": statistics.median(ok) if ok else math.nan, "p99": pct(ok, 99),
            "ttft50": statistics.median(ttft) if ttft else math.nan,
            "ok": len(ok), "failed": Counter(r["label"] for r in ph["normal"]
                                             if r["label"] != "ok"),
            "health_max": max(health, default=math.nan),
            "health_bad": sum(r["label"] != "200" for r in ph["health"]),
            "health_polls": len(health)}


def summary(res: dict[str, Any]) -> tuple[str, list[str]]:
    b, a = phase_facts(res["baseline"]), phase_facts(res["attack"])
    ratio50, ratio99 = a["p50"] / b["p50"], a["p99"] / b["p99"]
    rss = res["peak_rss_mib"]

    def mib(phase: str) -> str:
        return f"{rss[phase]:.0f} MiB" if phase in rss else "-"

    def failed(f: dict[str, Any]) -> str:
        return f"{f['ok']} / " + (counts(list(Counter(f["failed"]).elements()))
                                  if f["failed"] else "0")

    rows = [
        ["normal client p50", secs(b["p50"]), secs(a["p50"]), times(ratio50),
         f"<= {P50_TARGET}x"],
        ["normal client p99", secs(b["p99"]), secs(a["p99"]), times(ratio99), "-"],
        ["normal client time to first token, p50", secs(b["ttft50"]), secs(a["ttft50"]),
         times(a["ttft50"] / b["ttft50"]), "-"],
        ["normal requests ok / failed", failed(b), failed(a), "", "none failed"],
        ["longest /health", secs(b["health_max"]), secs(a["health_max"]), "",
         f"< {HEALTH_TARGET:.0f} s"],
        ["/health polls not 200", f"{b['health_bad']} of {b['health_polls']}",
         f"{a['health_bad']} of {a['health_polls']}", "", "0"],
        ["server peak RSS (process tree)", mib("baseline"), mib("attack"), "", "-"],
        ["CPU s: server front-end + engine / benchmark",
         cpu(res["baseline"]), cpu(res["attack"]), "", "-"],
    ]
    misses = []
    if not ratio50 <= P50_TARGET:
        misses.append(f"normal p50 under attack is {times(ratio50)} the baseline")
    if not a["health_max"] < HEALTH_TARGET:
        misses.append(f"longest /health under attack {secs(a['health_max'])}")
    if a["failed"] or b["failed"]:
        misses.append("normal requests failed: " + counts(
            list((Counter(a["failed"]) + Counter(b["failed"])).elements())))
    return table(["measure", "baseline", "under attack", "ratio", "target"], rows), misses


def attack_tables(res: dict[str, Any]) -> tuple[str, str, list[str]]:
    by_group: dict[str, list[tuple[str, Outcome]]] = {g: [] for g in GROUPS}
    kind_rows, misses = [], []
    for kind, meta in res["kinds"].items():
        outs = [Outcome(**o) for o in res["outcomes"].get(kind, [])]
        expect = meta["expect"]
        by_group[meta["group"]] += [(kind, o) for o in outs]
        bad = [o.label for o in outs if not expected(o.label, expect)]
        params = Counter(o.param for o in outs if o.param)
        lat = [o.latency for o in outs]
        kind_rows.append([
            meta["group"], kind, len(outs), counts([o.label for o in outs]), len(bad),
            secs(statistics.median(lat) if lat else math.nan), secs(max(lat, default=math.nan)),
            f"`{params.most_common(1)[0][0]}`" if params else "-"])
        if bad:
            misses.append(f"{kind}: {counts(bad)} (expected {', '.join(expect)})")
        elif not outs and not res["server_died"]:
            misses.append(f"{kind}: never sent (the phase ended first)")
    group_rows = []
    for group, pairs in by_group.items():
        if not pairs:
            continue
        labels = [o.label for _, o in pairs]
        group_rows.append([
            group, len(pairs), len({k for k, _ in pairs}),
            sum(not expected(o.label, res["kinds"][k]["expect"]) for k, o in pairs),
            sum(lab.startswith("5") for lab in labels), labels.count(TIMEOUT),
            labels.count(CONN_ERROR), labels.count(UPLOAD_CUT),
            secs(max(o.latency for _, o in pairs))])
    return (table(["attack group", "requests", "kinds", "not as expected", "5xx", "timeouts",
                   "conn errors", "upload cut", "longest"], group_rows),
            table(["group", "attack", "requests", "outcomes", "not as expected", "p50",
                   "longest", "field named"], kind_rows), misses)


def unknown(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.0f}"


def report(res: dict[str, Any]) -> str:
    head, misses = summary(res)
    groups, kinds, attack_misses = attack_tables(res)
    after = res["after"]
    lines = ["", head, "", groups, "", kinds, ""]
    contacts = res["canary_contacts"]
    lines.append("canary listener (remote `$ref` target): " + (
        f"CONTACTED {len(contacts)} times, e.g. {contacts[0]['request']!r}" if contacts
        else "never contacted"))
    died = res["server_died"]
    lines.append("server: " + (
        f"DIED during {died['phase']} (exit {died['returncode']})" if died else "survived")
        + (f"; the memory guard killed it at {res['memory_guard_gib']:.1f} GiB"
           if res["memory_guard_gib"] else ""))
    lines.append(f"after the attacks: {unknown(after['in_flight'])} requests in flight, "
                 f"{unknown(after['engine_running'])} engine sequences running "
                 + (f"(drained in {after['drain_s']:.1f} s)" if after["drain_s"] is not None
                    else f"(not drained within {res['args']['drain_wait']:.0f} s)")
                 + f"; a plain request {'succeeds' if after['serves'] else 'FAILS'}")
    if res["peak_rss_mib_total"]:
        lines.append(f"server peak RSS over the whole run: {res['peak_rss_mib_total']:.0f} MiB")
    misses += attack_misses
    if contacts:
        misses.append("the canary listener was contacted")
    if died:
        misses.append("the server died")
    if after["drain_s"] is None and not died:
        misses.append("requests still in flight after the attackers stopped")
    if not after["serves"]:
        misses.append("the server does not serve a plain request after the attacks")
    lines.append("\ntargets: " + ("all met" if not misses else "MISSED:\n- " + "\n- ".join(misses)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(json.loads(Path(sys.argv[1]).read_text())))
