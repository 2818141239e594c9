"""Graders: OpenAI's shapes parsed and refused with the field named, mapped onto Steer critics
that the search accepts and that score FakeEngine candidates as `grade_text` does."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from steer.training.formula import FormulaError, evaluate, parse
from steer.training.graders import (
    GraderError,
    check_items,
    grade,
    grade_text,
    parse_grader,
    passes,
    threshold,
    to_critic,
)
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio
SAMPLE = "{{sample.output_text}}"


def check(operation: str, reference: str = "{{item.reference}}", **extra: Any) -> dict[str, Any]:
    return {"type": "string_check", "name": "check", "input": SAMPLE, "reference": reference,
            "operation": operation, **extra}


FUZZY = {"type": "text_similarity", "name": "sim", "input": SAMPLE,
         "reference": "{{item.reference}}", "evaluation_metric": "fuzzy_match"}


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


def test_string_check_eq_on_a_number_is_exact_answer() -> None:
    grader = parse_grader(check("eq"))
    assert to_critic(grader, {"reference": 42}) == {
        "name": "exact_answer", "reference": "42", "extract": "last_number"}
    assert grade_text(grader, {"reference": 42}, "40 + 2 = 42.") == 1.0
    assert grade_text(grader, {"reference": "1,000"}, "It is 1000") == 1.0
    assert grade_text(grader, {"reference": 42}, "42 or 43") == 0.0
    assert grade_text(parse_grader(check("ne")), {"reference": 42}, "43") == 1.0


@pytest.mark.parametrize(("operation", "reference", "critic"), [
    ("eq", "Paris.", {"name": "regex", "pattern": "Paris\\x2e", "mode": "fullmatch"}),
    ("like", "a+b (c)", {"name": "regex", "pattern": "a\\x2bb\\x20\\x28c\\x29",
                         "mode": "search"}),
    ("ilike", "ÉtÉ?", {"name": "regex", "pattern": "(?i)ÉtÉ\\x3f", "mode": "search"}),
])
def test_text_string_checks_are_escaped_regexes(
    operation: str, reference: str, critic: dict[str, Any],
) -> None:
    assert to_critic(parse_grader(check(operation, reference)), {}) == critic


def test_long_references_and_ne_score_through_the_grader_critic() -> None:
    long = parse_grader(check("like", "x" * 3000))
    assert to_critic(long, {})["name"] == "python"
    ne = to_critic(parse_grader(check("ne")), {"reference": "no", "other": [1] * 100})
    assert ne == {"name": "python", "function": "steer_grader", "kwargs": {
        "grader": check("ne"), "item": {"reference": "no"}}}  # only the fields it reads


@pytest.mark.parametrize(("grader", "item", "answers"), [
    (check("eq"), {"reference": 7}, ["so it is 7", "it is 8", "7.0", "no idea"]),
    (check("eq", "Paris"), {}, ["Paris", " Paris\n", "paris", "Paris!"]),
    (check("like", "{{item.reference}} km"), {"reference": "3.5"},
     ["about 3.5 km", "3.5km", "3x5 km", "THE 3.5 KM"]),
    (check("ilike", "{{item.reference}} km"), {"reference": "3.5"},
     ["about 3.5 km", "3.5km", "3x5 km", "THE 3.5 KM"]),
    (check("ne"), {"reference": "yes"}, ["yes", "no", " yes ", "Yes"]),
    (FUZZY, {"reference": "the cat sat"}, ["the cat sat", "the cat sit", "dog", ""]),
    ({"type": "multi", "name": "m", "calculate_output": "0.5 * right + 0.5 * min(1, sim)",
      "graders": {"right": check("eq"), "sim": FUZZY}}, {"reference": 12},
     ["12", "answer: 12", "13", "twelve"]),
])
async def test_the_critic_scores_candidates_as_grade_text_does(
    client: httpx.AsyncClient, fake_engine: FakeEngine, grader: dict[str, Any],
    item: dict[str, Any], answers: list[str],
) -> None:
    """Through the search as the reinforcement loop runs it: best_of_n with the grader as
    `steering.critic`; every candidate's critic score equals the local score."""
    parsed = parse_grader(grader)
    critic = to_critic(parsed, item)
    fake_engine.enqueue(*answers)
    r = await client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "user", "content": "q"}],
        "steering": {"strategy": "best_of_n", "options": {"n": len(answers)},
                     "critic": critic, "trace": True}})
    assert r.status_code == 200, r.text
    nodes = r.json()["steering_trace"]["nodes"]
    assert len(nodes) == len(answers)
    scored = [n["scores"][critic["name"]] for n in nodes]
    expected = [grade_text(parsed, item, n["text"]) for n in nodes]
    assert scored == pytest.approx(expected)
    assert len(set(expected)) > 1  # the answers tell passing from failing apart


async def test_steer_critic_fills_item_fields_and_grades_locally() -> None:
    grader = parse_grader({"type": "steer_critic", "critic": {
        "name": "exact_answer", "reference": "{{item.answer}}", "extract": "answer_line"},
        "pass_threshold": 1.0})
    assert to_critic(grader, {"answer": 12}) == {
        "name": "exact_answer", "reference": 12, "extract": "answer_line"}
    scores = await grade(grader, {"answer": 12}, ["Answer: 12", "Answer: 13", "12"])
    assert scores == [1.0, 0.0, 0.0]
    assert [passes(grader, s) for s in scores] == [True, False, False]
    judge = parse_grader({"type": "steer_critic", "critic": {"name": "llm_judge"}})
    with pytest.raises(GraderError, match="needs the model"):
        await grade(judge, {}, ["x"])


def test_score_model_maps_onto_llm_judge() -> None:
    grader = parse_grader({
        "type": "score_model", "name": "judge", "model": "judge-lora", "range": [0, 10],
        "pass_threshold": 7, "input": [
            {"role": "system", "content": "Score {{sample.output_text}} against "
                                          "{{item.reference}}."},
            {"role": "user", "content": "Be strict."}]})
    spec = to_critic(grader, {"reference": "42"})
    assert spec == {"name": "llm_judge", "mode": "yes_no", "adapter": "judge-lora",
                    "rubric": "correct according to these grading instructions: Score the "
                              "candidate answer against 42. Be strict."}
    assert "adapter" not in to_critic(grader, {"reference": "42"}, base_model="judge-lora")
    assert threshold(grader) == pytest.approx(0.7)
    assert passes(grader, 0.75) and not passes(grader, 0.65)
    default = parse_grader({"type": "score_model", "name": "j", "model": "m",
                            "input": [{"role": "user", "content": "ok?"}]})
    assert threshold(default) == 0.5


def test_thresholds_default_to_full_marks() -> None:
    grader = parse_grader(FUZZY)
    assert passes(grader, 1.0) and not passes(grader, 0.99)
    lenient = parse_grader({**FUZZY, "pass_threshold": 0.8})
    assert passes(lenient, 0.8)


@pytest.mark.parametrize(("raw", "param", "message"), [
    ({"type": "python", "name": "p", "source": "import os"}, "type", "client-supplied code"),
    ({"type": "label_model", "name": "l"}, "type", "not supported"),
    ({"type": "regex"}, "type", "is not one of"),
    ({"name": "x"}, "type", "is not one of"),
    (check("gt"), "operation", "Input should be 'eq', 'ne', 'like' or 'ilike'"),
    (check("eq", extra=1), "extra", "unknown field"),
    ({**check("eq"), "input": "{{item.answer}}"}, "input", "{{sample.output_text}}"),
    (check("eq", "{{sample.output_text}}"), "reference", "{{item.<field>}}"),
    ({k: v for k, v in check("eq").items() if k != "reference"}, "reference", "required"),
    (check("eq", pass_threshold=1.5), "pass_threshold", "within [0.0, 1.0]"),
    ({**FUZZY, "evaluation_metric": "bleu"}, "evaluation_metric", "only fuzzy_match"),
    ({"type": "score_model", "name": "j", "model": "m", "sampling_params": {"seed": 1},
      "input": [{"role": "user", "content": "x"}]}, "sampling_params", "greedily"),
    ({"type": "score_model", "name": "j", "model": "m", "range": [5, 1],
      "input": [{"role": "user", "content": "x"}]}, "range", "low < high"),
    ({"type": "score_model", "name": "j", "model": "m",
      "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input.0.content", "valid string"),
    ({"type": "multi", "name": "m", "calculate_output": "a",
      "graders": {"a": {"type": "python", "name": "p", "source": ""}}},
     "graders.a.type", "client-supplied code"),
    ({"type": "multi", "name": "m", "calculate_output": "a",
      "graders": {"a": {"type": "score_model", "name": "j", "model": "m",
                        "input": [{"role": "user", "content": "x"}]}}},
     "graders.a.type", "must need no model"),
    ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"min": check("eq")}},
     "graders.min", "identifier"),
    ({"type": "multi", "name": "m", "calculate_output": "a + b", "graders": {"a": check("eq")}},
     "calculate_output", "unknown name 'b'"),
    ({"type": "multi", "name": "m", "calculate_output": "__import__('os').system('x')",
      "graders": {"a": check("eq")}}, "calculate_output", "the only functions"),
    ({"type": "multi", "name": "m", "calculate_output": "a ** 99",
      "graders": {"a": check("eq")}}, "calculate_output", "only + - * /"),
    ({"type": "steer_critic", "critic": {"name": "oracle"}}, "critic.name", "unknown critic"),
    ({"type": "steer_critic", "critic": {"name": "regex", "pattern": "(a"}}, "critic.pattern",
     "RE2"),
    ({"type": "steer_critic", "critic": {"name": "exact_answer", "reference": "1",
                                         "extract": "vibes"}}, "critic.extract", "pattern"),
])
def test_bad_graders_name_the_field(raw: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(GraderError) as info:
        parse_grader(raw)
    assert info.value.param == f"method.reinforcement.grader.{param}"
    assert message in str(info.value), str(info.value)


def test_items_must_have_the_fields_the_grader_reads() -> None:
    grader = parse_grader(check("eq", "{{item.answer.value}} {{item.unit}}"))
    check_items(grader, [{"answer": {"value": 1}, "unit": "m"}])
    with pytest.raises(GraderError) as info:
        check_items(grader, [{"answer": {"value": 1}, "unit": "m"}, {"answer": 2}])
    assert info.value.param == "training_file"
    assert str(info.value) == "line 2: the grader reads {{item.unit}}, which the line lacks"
    with pytest.raises(GraderError) as info:
        to_critic(grader, {"answer": {}, "unit": "m"})
    assert info.value.param == "item"


@pytest.mark.parametrize(("formula", "value"), [
    ("0.25 * a + 0.75 * b", 0.75), ("min(a, b)", 0.0), ("max(a, b, 0.5)", 1.0),
    ("abs(a - b)", 1.0), ("-(a - b) / 2", 0.5), ("b / a", 0.0), ("(a + b) / 2", 0.5),
])
def test_formula_arithmetic(formula: str, value: float) -> None:
    assert evaluate(parse(formula, {"a", "b"}), {"a": 0.0, "b": 1.0}) == value


@pytest.mark.parametrize("formula", [
    "a.real", "a[0]", "lambda: 1", "max(a, key=b)", "abs(a, b)", "'x'", "True", "a if b else 1",
    "a < b", "(" * 600 + "a" + ")" * 600, "x" * 1001,
])
def test_formula_refuses_everything_else(formula: str) -> None:
    with pytest.raises(FormulaError):
        parse(formula, {"a", "b"})
