"""Reflection (Self-Refine / Reflexion) and multi-agent debate over the scripted engine."""

from __future__ import annotations

from typing import Any

import pytest

from steer.critics.game24 import check_state
from steer.engine import AdapterRef, Message, Prompt, SamplingParams
from steer.search import Limits, Steerer, SteeringSpec, SteerResult, TemplateLibrary
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

QUESTION = (Message("user", "What is 6 * 7?"),)
ADAPTERS = {"calm": AdapterRef("calm", 1, "/a/calm"), "loud": AdapterRef("loud", 2, "/a/loud")}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=100_000)


@pytest.fixture
def steerer(engine: FakeEngine) -> Steerer:
    return Steerer(engine, Limits(), TemplateLibrary(), lambda name: ADAPTERS[name])


async def run(steerer: Steerer, **spec: Any) -> SteerResult:
    plan = steerer.plan(SteeringSpec(trace=True, **spec))
    return await steerer.run(plan, QUESTION, SamplingParams(max_tokens=64), None, "r")


def last(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1].content


# -- reflection ----------------------------------------------------------------------------


async def test_reflection_stops_at_threshold(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("it is 40", "you multiplied wrong", "it is 42", "never used")
    result = await run(steerer, strategy="reflection",
                       options={"max_iters": 3, "threshold": 1.0, "feedback": "self"},
                       critic={"name": "exact_answer", "reference": 42})
    assert result.text == "it is 42"
    assert [n.role for n in result.trace.nodes] == ["draft", "feedback", "revision"]
    assert result.trace.to_dict()["stopped"]["iteration"] == 1
    revise = engine.history[2].prompts[0]
    assert revise[-2] == Message("assistant", "it is 40")  # type: ignore[index]
    assert "you multiplied wrong" in last(revise)


async def test_reflection_returns_best_not_last(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("so 42", "worse: 41", "worse: 40")
    result = await run(steerer, strategy="reflection",
                       options={"max_iters": 2, "feedback": "critic"},
                       critic={"name": "exact_answer", "reference": 42})
    assert result.text == "so 42"
    versions = [n for n in result.trace.nodes if n.role in ("draft", "revision")]
    assert [n.pruned for n in versions] == [False, True, True]
    # critic feedback: the verifier's explanation reaches the revision prompt, no extra call
    assert "expected '42'" in last(engine.history[1].prompts[0])
    assert len(engine.history) == 3


async def test_reflexion_memory_keeps_all_reflections(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue("a 1", "first reflection", "b 2", "second reflection", "c 3")
    await run(steerer, strategy="reflection",
              options={"max_iters": 2, "feedback": "self", "memory": True},
              critic={"name": "exact_answer", "reference": 42})
    final_prompt = last(engine.history[-1].prompts[0])
    assert "first reflection" in final_prompt and "second reflection" in final_prompt


async def test_self_refine_shows_only_the_latest(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("a 1", "first reflection", "b 2", "second reflection", "c 3")
    await run(steerer, strategy="reflection",
              options={"max_iters": 2, "feedback": "self", "memory": False},
              critic={"name": "exact_answer", "reference": 42})
    final_prompt = last(engine.history[-1].prompts[0])
    assert "first reflection" not in final_prompt and "second reflection" in final_prompt


async def test_reflection_budget_exhaustion_returns_best(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue("so 42", "feedback", "43")
    result = await run(steerer, strategy="reflection",
                       options={"max_iters": 3, "feedback": "self"},
                       critic={"name": "exact_answer", "reference": 42},
                       budget={"max_model_calls": 3})
    assert result.budget_exhausted and result.text == "so 42"
    assert result.model_calls == 3


# -- debate --------------------------------------------------------------------------------


async def test_debate_rounds_and_majority(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("42", "41", "40", "42 after all", "41 still", "42 too")
    result = await run(steerer, strategy="debate", options={"agents": 3, "rounds": 2})
    assert result.text in ("42 after all", "42 too")
    assert result.trace.to_dict()["votes"] == {"42": 2, "41": 1}
    assert len(engine.history) == 2  # one batched call per round
    round2 = engine.history[1].prompts[0]
    assert "One agent's solution: 41" in last(round2) and "One agent's solution: 40" in last(
        round2)
    assert round2[-2] == Message("assistant", "42")  # type: ignore[index]
    agents = [n for n in result.trace.nodes if n.round == 1]
    assert [n.parent for n in agents] == [0, 1, 2]


async def test_debate_stops_early_on_consensus(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("42", "so 42", "42!")
    result = await run(steerer, strategy="debate", options={"agents": 3, "rounds": 3})
    assert len(engine.history) == 1
    assert result.trace.to_dict()["consensus_round"] == 0
    assert result.model_calls == 3


async def test_debate_agents_with_adapters_share_one_step(
    engine: FakeEngine, steerer: Steerer
) -> None:
    agents = [{"persona": "You are calm.", "adapter": "calm", "temperature": 0.2},
              {"persona": "You are loud.", "adapter": "loud"},
              {"adapter": "calm", "temperature": 0.2}]
    engine.enqueue("1", "3", "2")
    result = await run(steerer, strategy="debate", options={"agents": agents, "rounds": 1})
    assert {c.adapter.name for c in engine.history if c.adapter} == {"calm", "loud"}
    calm = next(c for c in engine.history if c.adapter and c.adapter.name == "calm")
    assert len(calm.prompts) == 2 and calm.params.temperature == 0.2
    assert calm.prompts[0][0] == Message("system", "You are calm.")  # type: ignore[index]
    assert result.model_calls == 3


async def test_debate_unknown_adapter_is_refused(steerer: Steerer) -> None:
    with pytest.raises(KeyError):
        steerer.plan(SteeringSpec(strategy="debate", options={"agents": [{"adapter": "nope"}]}))


async def test_debate_judge_aggregate(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("a 1", "b 2", "no", "yes")
    result = await run(steerer, strategy="debate",
                       options={"agents": 2, "rounds": 1, "aggregate": "judge"},
                       critic={"name": "llm_judge"})
    assert result.text == "b 2"


async def test_debate_summarize(engine: FakeEngine, steerer: Steerer) -> None:
    def respond(prompt: Prompt, params: SamplingParams) -> str:
        text = last(prompt)
        if text.startswith("Summarize"):
            return "SUMMARY"
        if "SUMMARY" in text:
            return "42"
        return "41" if params.temperature < 0.5 else "40"  # the agents disagree at first

    engine.respond = respond
    result = await run(steerer, strategy="debate",
                       options={"agents": [{"temperature": 0.1}, {"temperature": 0.9}],
                                "rounds": 2, "summarize": True})
    assert "SUMMARY" in last(engine.history[-1].prompts[0])
    assert result.text == "42"


# -- game of 24 verifier ------------------------------------------------------------------


def test_game24_verifier() -> None:
    puzzle = [4, 9, 10, 13]
    good = "10 - 4 = 6 (left: 6 9 13)\n13 - 9 = 4 (left: 4 6)\n4 * 6 = 24 (left: 24)\n" \
           "Answer: (13 - 9) * (10 - 4) = 24"
    assert check_state(puzzle, good) == (True, True, "solved")
    assert check_state(puzzle, "10 - 4 = 6 (left: 6 9 13)")[:2] == (True, False)
    assert not check_state(puzzle, "10 - 4 = 7 (left: 7 9 13)")[0]  # wrong arithmetic
    assert not check_state(puzzle, "10 - 4 = 6 (left: 6 9 12)")[0]  # wrong bookkeeping
    assert not check_state(puzzle, "10 - 5 = 5 (left: 5 9 13)")[0]  # number not available
    assert not check_state(puzzle, "Answer: (13 - 9) * (10 - 4) * 1 = 24")[0]  # extra number
    assert not check_state(puzzle, "Answer: 4 + 9 + 10 + 13 = 24")[0]  # equals 36
    assert check_state([1, 2, 3, 4], "Answer: 1 * 2 * 3 * 4 = 24")[1]
    assert not check_state(puzzle, "Answer: __import__('os') = 24")[0]
