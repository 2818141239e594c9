"""Property-based tests (hypothesis): the extractors, template rendering and steering-spec
planning take any input a client can send and either answer or refuse cleanly and quickly.

Derandomized with no example database, so CI runs the same examples every time.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steer.critics import CRITICS
from steer.critics.extract import answer_line, by_regex, choice, last_number
from steer.engine import AdapterRef, Message
from steer.search import (
    STRATEGIES,
    Limits,
    Plan,
    Steerer,
    SteeringInvalid,
    SteeringSpec,
    TemplateLibrary,
)
from tests.fakes import FakeEngine

PROPERTIES = settings(
    max_examples=200, deadline=5000, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- values a client can put in JSON ---------------------------------------------------------

HUGE_INTS = st.sampled_from([0, -1, 1, 2, 16, 17, 64, 65, 1024, 10**6, 10**9, 10**12, 10**100,
                             -(10**12)])
SCALARS = (
    st.none() | st.booleans() | HUGE_INTS | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def fields_of(model: Any) -> list[str]:
    return sorted({f.alias or name for name, f in model.model_fields.items()})


def spec_dict(known: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects whose keys are mostly real option names, with any JSON values."""
    key = st.sampled_from(known) | st.text(max_size=8) if known else st.text(max_size=8)
    return st.dictionaries(key, JSON, max_size=5)


# -- (a) extractors --------------------------------------------------------------------------

ADVERSARIAL_PIECES = [" ", "\n", "\t", "*", "#", ">", "-", ":", "=", "answer", "Answer is",
                      "final", "the ", "(", ")", "A", "e", "1", ",", ".", "-3", "```", "json",
                      "{", "[", "option", "choice", "\u00e9", "\U0001f600", "\ud800"]
ADVERSARIAL = st.lists(st.sampled_from(ADVERSARIAL_PIECES), max_size=40).map("".join)
LONG_ADVERSARIAL = st.tuples(ADVERSARIAL, st.integers(200, 2000)).map(lambda t: t[0] * t[1])

REGEX_PIECES = ["a", "b", ".", "*", "+", "?", "(", ")", "|", "\\d", "\\w", "\\s", "[a-z]",
                "[^x]", "{2,5}", "{1000}", "^", "$", "\\1", "(?=", "(?i)", "(?P<n>", "\\",
                "\\b", "\\pL", "\\u00e9"]
PATTERNS = st.lists(st.sampled_from(REGEX_PIECES), min_size=1, max_size=12).map("".join)


def _is_answer(value: object) -> bool:
    return value is None or isinstance(value, str)


@PROPERTIES
@given(st.text() | ADVERSARIAL)
def test_extractors_take_any_text(text: str) -> None:
    for extract in (last_number, answer_line, choice):
        assert _is_answer(extract(text))


@PROPERTIES
@given(LONG_ADVERSARIAL)
def test_extractors_are_fast_on_long_adversarial_text(text: str) -> None:
    start = time.perf_counter()
    for extract in (last_number, answer_line, choice, by_regex(r"(.*a){20}x")):
        assert _is_answer(extract(text))
    assert time.perf_counter() - start < 2.0


@PROPERTIES
@given(PATTERNS, st.text() | LONG_ADVERSARIAL)
def test_client_patterns_compile_or_are_refused_and_then_never_raise(
    pattern: str, text: str
) -> None:
    try:
        extract = by_regex(pattern)
    except ValueError as exc:
        assert "invalid regex" in str(exc)
        return
    start = time.perf_counter()
    assert _is_answer(extract(text))
    assert time.perf_counter() - start < 2.0


# -- (b) templates ---------------------------------------------------------------------------

LIBRARY = TemplateLibrary()
TEMPLATE_VARIABLES = sorted({v["name"] for t in LIBRARY.describe() for v in t["variables"]})
MESSAGES = st.lists(
    st.builds(Message, st.sampled_from(["system", "user", "assistant"]), st.text(max_size=40)),
    max_size=4,
).map(tuple)


@PROPERTIES
@given(st.sampled_from(sorted(LIBRARY.templates)), spec_dict(TEMPLATE_VARIABLES), MESSAGES)
def test_templates_render_or_refuse(
    name: str, variables: dict[str, Any], messages: tuple[Message, ...]
) -> None:
    template = LIBRARY.get(name, "steering.template.name")
    try:
        out = template.apply(messages, variables, "steering.template")
    except SteeringInvalid as exc:
        assert exc.param and exc.param.startswith(("steering.template", "messages"))
        return
    assert isinstance(out, tuple) and all(isinstance(m, Message) for m in out)
    assert any(m.role == "user" for m in out)


# -- (c) the steering spec -------------------------------------------------------------------

CRITIC_FIELDS = sorted({f for cls in CRITICS.values() for f in fields_of(cls.Options)})
BUDGET_FIELDS = ["max_model_calls", "max_total_tokens", "timeout_s"]


def critic_spec() -> st.SearchStrategy[dict[str, Any] | None]:
    named = st.fixed_dictionaries(
        {"name": st.sampled_from(sorted(CRITICS)) | JSON}, optional={"adapter": JSON}
    )
    return st.none() | st.tuples(named, spec_dict(CRITIC_FIELDS)).map(
        lambda t: {**t[1], **t[0]}
    )


def template_spec() -> st.SearchStrategy[dict[str, Any] | None]:
    named = st.fixed_dictionaries({"name": st.sampled_from(sorted(LIBRARY.templates)) | JSON},
                                  optional={"variables": spec_dict(TEMPLATE_VARIABLES)})
    return st.none() | named | spec_dict(["name", "variables"])


def options_for(strategy: str) -> st.SearchStrategy[dict[str, Any]]:
    """Options named for the strategy itself (so huge values reach real fields)."""
    cls = STRATEGIES.get(strategy)
    return spec_dict(fields_of(cls.Options) if cls else [])


SPECS = st.sampled_from(sorted(STRATEGIES)).flatmap(lambda strategy: st.builds(
    SteeringSpec,
    strategy=st.just(strategy) | st.text(max_size=8),
    options=options_for(strategy),
    critic=critic_spec(),
    budget=st.none() | spec_dict(BUDGET_FIELDS),
    template=template_spec(),
    trace=st.booleans(),
))


def unknown_adapter(name: str) -> AdapterRef:
    raise SteeringInvalid(f"unknown adapter {name!r}", "model")


STEERER = Steerer(FakeEngine(), Limits(), LIBRARY, unknown_adapter)


@PROPERTIES
@given(SPECS)
def test_any_steering_spec_plans_or_is_refused_quickly(spec: SteeringSpec) -> None:
    start = time.perf_counter()
    try:
        plan = STEERER.plan(spec)
    except SteeringInvalid as exc:
        assert exc.param and (exc.param.startswith("steering.") or exc.param == "model")
    else:
        assert isinstance(plan, Plan)
        assert plan.budget.max_model_calls <= Limits().max_model_calls
    assert time.perf_counter() - start < 2.0


# Every option of every strategy and critic, each with every hostile value: enumerated, not
# sampled, so a field without a bound can't hide behind the draw.
OPTION_FIELDS = sorted((name, field) for name, cls in STRATEGIES.items()
                       for field in fields_of(cls.Options))
CRITIC_OPTION_FIELDS = sorted((name, field) for name, cls in CRITICS.items()
                              for field in fields_of(cls.Options))
HOSTILE = [10**6, 10**9, 10**12, 10**100, -(10**12), float("nan"), float("inf"), 1e308,
           "x" * 100_000, [0] * 100_000, [{}] * 10_000, {str(i): i for i in range(10_000)}]


def plans_or_refuses_cheaply(spec: SteeringSpec, what: str) -> None:
    start = time.perf_counter()
    try:
        STEERER.plan(spec)
    except SteeringInvalid as exc:
        assert exc.param and exc.param.startswith("steering."), f"{what}: {exc}"
    elapsed = time.perf_counter() - start
    # Generous (the machine may be busy); an unbounded field takes far longer: 10**6 debate
    # agents took 8.6 s to build before the schema said le=16.
    assert elapsed < 2.0, f"{what}: {elapsed:.2f}s"


@pytest.mark.parametrize(("strategy", "field"), OPTION_FIELDS)
def test_every_strategy_option_refuses_hostile_values_cheaply(strategy: str, field: str) -> None:
    for i, value in enumerate(HOSTILE):
        plans_or_refuses_cheaply(SteeringSpec(strategy=strategy, options={field: value}),
                                 f"{strategy}.{field} = HOSTILE[{i}]")


@pytest.mark.parametrize(("critic", "field"), CRITIC_OPTION_FIELDS)
def test_every_critic_option_refuses_hostile_values_cheaply(critic: str, field: str) -> None:
    for i, value in enumerate(HOSTILE):
        plans_or_refuses_cheaply(
            SteeringSpec(strategy="best_of_n", critic={"name": critic, field: value}),
            f"critic {critic}.{field} = HOSTILE[{i}]")
