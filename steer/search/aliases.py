"""Other clients' ways of asking for steering, mapped onto ours.

- optillm: `"model": "<slug>-<model>"` or `"optillm_approach": "<slug>"`.
- OpenAI: `reasoning_effort` low|medium|high picks a budget preset (and, when the request
  names no strategy, a default strategy sized to it). A preset never asks more than the
  server allows: its fields are clamped to the caps, and the strategy does what fits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from steer.search.runner import SteeringSpec
from steer.search.session import SteeringInvalid

# optillm slug -> (strategy, options)
OPTILLM_SLUGS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "bon": ("best_of_n", {}),
    "self_consistency": ("self_consistency", {}),
    "re2": ("template", {"name": "re2"}),
    # Mixture of agents: several answers, each revised after seeing the others, one picked.
    "moa": ("debate", {"agents": 3, "rounds": 2, "aggregate": "majority"}),
    # CoT + reflection: a chain-of-thought draft, one self-critique, one revision.
    "cot_reflection": ("reflection", {"max_iters": 1, "feedback": "self"}),
}
# optillm's other approaches: recognised, so the error can say "not supported" clearly.
OPTILLM_UNMAPPED = frozenset({
    "mcts", "rto", "z3", "pvg", "rstar", "plansearch", "leap",
    "cepo", "coc", "executecode", "spl", "entropy_decoding", "thinkdeeper", "autothink",
    "deepconf", "majority_voting", "json", "privacy", "readurls", "memory", "mars",
})

# reasoning_effort -> (budget, default strategy when none was asked for)
REASONING_EFFORT: dict[str, tuple[dict[str, Any], tuple[str, dict[str, Any]]]] = {
    "low": ({"max_model_calls": 1, "max_total_tokens": 4096, "timeout_s": 30.0},
            ("none", {})),
    "medium": ({"max_model_calls": 8, "max_total_tokens": 16384, "timeout_s": 60.0},
               ("best_of_n", {"n": 4})),
    "high": ({"max_model_calls": 32, "max_total_tokens": 32768, "timeout_s": 120.0},
             ("best_of_n", {"n": 8})),
}


def split_model(model: str, served: Iterable[str]) -> tuple[str | None, str]:
    """`"bon-smollm2"` -> `("bon", "smollm2")` when `smollm2` is served; else `(None, model)`."""
    names = sorted(served, key=len, reverse=True)
    if model in names:
        return None, model
    for name in names:
        if model.endswith("-" + name):
            slug = model[: -len(name) - 1]
            if slug in OPTILLM_SLUGS or slug in OPTILLM_UNMAPPED:
                return slug, name
    return None, model


def from_optillm(slug: str, param: str) -> SteeringSpec:
    if slug in OPTILLM_SLUGS:
        strategy, options = OPTILLM_SLUGS[slug]
        return SteeringSpec(strategy=strategy, options=options)
    supported = ", ".join(sorted(OPTILLM_SLUGS))
    known = "an optillm approach Steer does not support" if slug in OPTILLM_UNMAPPED else (
        "not an optillm approach")
    raise SteeringInvalid(f"'{slug}' is {known}; supported: {supported}", param)


def with_reasoning_effort(spec: SteeringSpec | None, effort: str) -> SteeringSpec:
    """The preset's budget as defaults (the planner clamps them to the server's caps);
    the client's own `steering.budget` fields stay as sent, and win."""
    budget, (strategy, options) = REASONING_EFFORT[effort]
    if spec is None:
        return SteeringSpec(strategy=strategy, options=options, preset=budget)
    return replace(spec, preset=budget)
