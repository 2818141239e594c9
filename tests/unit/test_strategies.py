"""Strategies over the scripted engine: selection, votes and ties, batching, budgets,
cancellation, and usage/trace sums equal to exactly what the fake served."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from steer.engine import Message, SamplingParams
from steer.search import (
    BudgetExhausted,
    Limits,
    Steerer,
    SteeringSpec,
    SteerResult,
    TemplateLibrary,
)
from steer.search.runner import Progress
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

QUESTION = (Message("user", "What is six times seven?"),)
PARAMS = SamplingParams(max_tokens=50)


def no_adapters(name: str) -> Any:
    raise AssertionError(f"unexpected adapter {name}")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture
def steerer(engine: FakeEngine) -> Steerer:
    return Steerer(engine, Limits(), TemplateLibrary(), no_adapters)


async def run(steerer: Steerer, **spec: Any) -> SteerResult:
    plan = steerer.plan(SteeringSpec(**spec))
    return await steerer.run(plan, QUESTION, PARAMS, None, "req-1")


def served_usage(engine: FakeEngine) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, sequences) the fake produced, counted from its own
    record of every call, independently of the session's accounting."""
    prompt = completion = sequences = 0
    for call in engine.history:
        prompt += sum(engine.count_prompt_tokens(p) for p in call.prompts)
        completion += sum(call.completion_tokens)
        sequences += len(call.prompts) * call.params.n
    return prompt, completion, sequences


async def test_best_of_n_picks_highest_logprob_in_one_batched_call(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue(("it is 41", -2.0), ("it is 42", -0.1), ("it is 40", -1.0))
    result = await run(steerer, strategy="best_of_n", options={"n": 3})
    assert result.text == "it is 42"
    assert len(engine.history) == 1
    call = engine.history[0]
    assert (call.params.n, call.params.temperature, call.params.logprobs) == (3, 0.8, 0)
    assert result.model_calls == 3
    assert (result.candidates, result.pruned) == (3, 2)
    assert result.completion_tokens == 9
    assert result.prompt_tokens == 5  # the prompt counts once for its 3 samples
    chosen = [n for n in result.trace.nodes if n.chosen]
    assert [n.text for n in chosen] == ["it is 42"]


async def test_best_of_n_with_judge_batches_all_candidates(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue("answer one", "answer two", "answer three", "no", "yes", "no")
    result = await run(steerer, strategy="best_of_n", options={"n": 3},
                       critic={"name": "llm_judge"})
    assert result.text == "answer two"
    assert [c.kind for c in engine.history] == ["generate", "generate"]
    judge = engine.history[1]
    assert len(judge.prompts) == 3
    assert (judge.params.max_tokens, judge.params.temperature, judge.params.logprobs) == (
        1, 0.0, 20)
    assert result.model_calls == 6
    assert result.trace.nodes[1].scores["llm_judge"] == 1.0


async def test_best_of_n_stops_early_at_threshold(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("maybe 40", "surely 42", "never served", "never served")
    result = await run(steerer, strategy="best_of_n",
                       options={"n": 4, "batch_size": 2, "threshold": 1.0},
                       critic={"name": "exact_answer", "reference": 42})
    assert result.text == "surely 42"
    assert len(engine.history) == 1
    assert result.model_calls == 2
    assert result.trace.to_dict()["early_stop"]["round"] == 0


async def test_self_consistency_majority_and_vote_table(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue("so 7", "answer 7", "it is 8", "7 it is", "maybe 9")
    result = await run(steerer, strategy="self_consistency", options={"k": 5})
    assert result.text.endswith("7") or result.text.startswith("7")
    trace = result.trace.to_dict()
    assert trace["votes"] == {"7": 3, "8": 1, "9": 1}
    assert result.pruned == 2
    assert engine.history[0].params.n == 5
    assert engine.history[0].params.temperature == 0.7


async def test_self_consistency_tie_broken_by_critic(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue("3", "so 4", "3 then", "4")
    result = await run(steerer, strategy="self_consistency", options={"k": 4},
                       critic={"name": "exact_answer", "reference": "4"})
    assert result.text in ("so 4", "4")
    assert result.trace.to_dict()["tie_break"] == "critic exact_answer"


async def test_self_consistency_tie_broken_by_logprob(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue(("3", -3.0), ("4", -0.2), ("3", -2.0), ("4", -1.0))
    result = await run(steerer, strategy="self_consistency", options={"k": 4})
    assert result.text == "4"
    assert result.trace.to_dict()["tie_break"] == "mean logprob"


async def test_self_consistency_other_extractors(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("I pick (B)", "Answer: B", "the answer is C")
    result = await run(steerer, strategy="self_consistency",
                       options={"k": 3, "extract": "choice"})
    assert result.trace.to_dict()["votes"] == {"B": 2, "C": 1}
    engine.enqueue("Answer: Paris", "Answer: paris.", "Answer: Rome")
    result = await run(steerer, strategy="self_consistency",
                       options={"k": 3, "extract": "answer_line"})
    assert result.trace.to_dict()["votes"] == {"paris": 2, "rome": 1}


async def test_budget_calls_exhausted_returns_best_so_far(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue(("a 1", -1.0), ("b 2", -0.5), ("c 3", -0.1), ("d 4", -0.1))
    result = await run(steerer, strategy="best_of_n", options={"n": 4, "batch_size": 2},
                       budget={"max_model_calls": 3})
    assert result.budget_exhausted
    assert result.text == "c 3"  # the second wave is the one sample that still fits
    assert result.model_calls == 3
    assert [c.params.n for c in engine.history] == [2, 1]
    assert "max_model_calls" in result.trace.to_dict()["budget_exhausted"]


async def test_token_budget_clamps_max_tokens(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("one two three four five six seven eight nine ten", "x")
    result = await run(steerer, strategy="best_of_n", options={"n": 2},
                       budget={"max_total_tokens": 15})
    # 5 prompt tokens leave 10 for 2 samples: at most 5 each
    assert engine.history[0].params.max_tokens == 5
    assert result.prompt_tokens + result.completion_tokens <= 15


async def test_budget_too_small_for_any_answer_is_an_error(steerer: Steerer) -> None:
    plan = steerer.plan(SteeringSpec(strategy="none", budget={"max_total_tokens": 3}))
    with pytest.raises(BudgetExhausted, match="before any answer"):
        await steerer.run(plan, QUESTION, PARAMS, None, "r")


async def test_timeout_returns_best_so_far(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue(("w 1", -1.0), ("w 2", -0.2))
    plan = steerer.plan(SteeringSpec(strategy="best_of_n", options={"n": 4, "batch_size": 2},
                                     budget={"timeout_s": 0.3}))
    hold = asyncio.Event()
    calls = 0

    original = engine.generate

    async def slow_second_wave(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            await hold.wait()
        return await original(*args, **kwargs)

    engine.generate = slow_second_wave  # type: ignore[method-assign]
    result = await steerer.run(plan, QUESTION, PARAMS, None, "r")
    assert result.budget_exhausted
    assert result.text == "w 2"
    assert result.trace.to_dict()["budget_exhausted"].startswith("timeout_s: 0.3 s allowed")


async def test_cancellation_aborts_in_flight_calls(engine: FakeEngine, steerer: Steerer) -> None:
    engine.hold = asyncio.Event()
    plan = steerer.plan(SteeringSpec(strategy="best_of_n", options={"n": 2}))
    task = asyncio.create_task(steerer.run(plan, QUESTION, PARAMS, None, "req-x"))
    while not engine.history:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == [engine.history[0].request_id]
    assert engine.history[0].request_id == "req-x-c1"


async def test_template_strategy_renders_prompt(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("fine")
    result = await run(steerer, strategy="template",
                       options={"name": "few_shot",
                                "variables": {"examples": [{"question": "1+1?", "answer": "2"}]}})
    assert result.text == "fine"
    sent = engine.history[0].prompts[0]
    assert sent[-1].content.startswith("Question: 1+1?\nAnswer: 2\n\nQuestion: What is six")
    assert engine.history[0].kind == "stream"


async def test_template_composes_with_other_strategies(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue("a 1", "b 1")
    result = await run(steerer, strategy="self_consistency", options={"k": 2},
                       template={"name": "chain_of_thought"})
    assert "step by step" in engine.history[0].prompts[0][-1].content
    assert result.trace.to_dict()["template"] == "chain_of_thought"


async def test_usage_and_trace_equal_what_was_served(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue("a b", "c d e", "f", "yes", "no", "no")
    result = await run(steerer, strategy="best_of_n", options={"n": 3},
                       critic={"name": "llm_judge"})
    prompt, completion, sequences = served_usage(engine)
    assert result.prompt_tokens == prompt
    assert result.model_calls == sequences == 6
    assert result.completion_tokens == completion == 2 + 3 + 1 + 3  # three one-token verdicts
    generator_tokens = sum(n.tokens for n in result.trace.nodes)
    assert generator_tokens == 6
    assert len(result.trace.nodes) == 3


async def test_stream_yields_progress_then_answer_then_result(
    engine: FakeEngine, steerer: Steerer
) -> None:
    engine.enqueue(("some long answer text that will be chunked", -0.1), ("x", -2.0))
    plan = steerer.plan(SteeringSpec(strategy="best_of_n", options={"n": 2}))
    items = [i async for i in steerer.stream(plan, QUESTION, PARAMS, None, "r")]
    kinds = [type(i).__name__ for i in items]
    assert kinds[0] == "Progress" and kinds[-1] == "SteerResult"
    text = "".join(i.text for i in items if type(i).__name__ == "StreamDelta")  # type: ignore[union-attr]
    assert text == "some long answer text that will be chunked"
    assert isinstance(items[0], Progress)
    assert items[0].event["candidates"] == 2


async def test_plain_stream_passes_real_tokens(engine: FakeEngine, steerer: Steerer) -> None:
    engine.enqueue("one two three")
    plan = steerer.plan(SteeringSpec(strategy="none", trace=True))
    items = [i async for i in steerer.stream(plan, QUESTION, PARAMS, None, "r")]
    deltas = [i for i in items if type(i).__name__ == "StreamDelta"]
    assert [d.text for d in deltas] == ["one", " two", " three"]  # type: ignore[union-attr]
    result = items[-1]
    assert isinstance(result, SteerResult)
    assert (result.prompt_tokens, result.completion_tokens, result.model_calls) == (5, 3, 1)
