"""Budgets that hold and degrade instead of failing: bounded options, token reservations for
concurrent calls, usage counted when a stream is cut off, strategy prompts fitted to the
context, anytime strategies, presets within the server's caps, and which limit fired."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from steer.critics.quoting import MAX_TRIES, fit_prompt
from steer.engine import AdapterRef, Message, Prompt, SamplingParams, StreamDelta, StreamEnd
from steer.search import (
    Budget,
    BudgetExhausted,
    Limits,
    Session,
    Steerer,
    SteeringInvalid,
    SteeringSpec,
    SteerResult,
    TemplateLibrary,
    with_reasoning_effort,
)
from steer.service.app import create_app
from steer.service.settings import Settings
from tests.asgi import running
from tests.fakes import FakeEngine, _text_of

pytestmark = pytest.mark.anyio

QUESTION = (Message("user", "What is six times seven?"),)  # 5 fake tokens
PROMPT = [Message("user", "a b c d e")]


def steerer_for(engine: FakeEngine, limits: Limits | None = None) -> Steerer:
    def resolve(name: str) -> AdapterRef:
        return AdapterRef(name, 1, f"/a/{name}")

    return Steerer(engine, limits or Limits(), TemplateLibrary(), resolve)


async def run(steerer: Steerer, spec: SteeringSpec, max_tokens: int = 50) -> SteerResult:
    plan = steerer.plan(spec)
    return await steerer.run(plan, QUESTION, SamplingParams(max_tokens=max_tokens), None, "r")


def served_sequences(engine: FakeEngine) -> int:
    return sum(len(c.prompts) * c.params.n for c in engine.history)


def words(n: int, word: str = "w") -> str:
    return " ".join(f"{word}{i}" for i in range(n))


# -- 1. every option and budget field is bounded in the schema ------------------------------

HUGE = [
    ("debate", {"agents": 1_000_000_000}, None, "steering.options.agents"),
    ("debate", {"agents": [{}] * 100_000}, None, "steering.options.agents"),
    ("debate", {"agents": [{"adapter": "a" * 100_000}]}, None,
     "steering.options.agents.0.adapter"),
    ("debate", {"extract": "regex", "pattern": "a" * 1_000_000}, None,
     "steering.options.pattern"),
    ("self_consistency", {"extract": "regex", "pattern": "a" * 1_000_000}, None,
     "steering.options.pattern"),
    ("tot", {"seed": 10 ** 100}, None, "steering.options.seed"),
    ("tot", {"threshold": 1e300}, None, "steering.options.threshold"),
    ("tot", {"threshold": float("nan")}, None, "steering.options.threshold"),
    ("tot", {"task": "t" * 1_000_000}, None, "steering.options.task"),
    ("best_of_n", {"temperature": float("nan")}, None, "steering.options.temperature"),
    ("template", {"name": "n" * 1_000_000}, None, "steering.options.name"),
    ("template", {"name": "few_shot", "variables": {str(i): i for i in range(10_000)}}, None,
     "steering.options.variables"),
    ("none", {}, {"max_model_calls": 10 ** 30}, "steering.budget.max_model_calls"),
    ("none", {}, {"max_total_tokens": 10 ** 30}, "steering.budget.max_total_tokens"),
    ("none", {}, {"timeout_s": float("nan")}, "steering.budget.timeout_s"),
    ("none", {}, {"timeout_s": float("inf")}, "steering.budget.timeout_s"),
]


@pytest.mark.parametrize(("strategy", "options", "budget", "param"), HUGE)
async def test_huge_values_are_refused_by_the_schema(
    strategy: str, options: dict[str, Any], budget: dict[str, Any] | None, param: str
) -> None:
    # The cap check would say "at most 512 on this server": the schema must refuse first.
    steerer = steerer_for(FakeEngine(), Limits(max_model_calls=10 ** 40,
                                               max_total_tokens=10 ** 40, timeout_s=1e308))
    start = time.perf_counter()
    with pytest.raises(SteeringInvalid) as info:
        steerer.plan(SteeringSpec(strategy=strategy, options=options, budget=budget))
    assert time.perf_counter() - start < 1.0
    assert info.value.param == param
    assert "on this server" not in str(info.value)


async def test_template_field_is_bounded() -> None:
    steerer = steerer_for(FakeEngine())
    with pytest.raises(SteeringInvalid) as info:
        steerer.plan(SteeringSpec(strategy="none", template={"name": "x" * 1_000_000}))
    assert info.value.param == "steering.template.name"


async def test_debate_agent_count_is_refused_before_any_agent_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from steer.search.strategies import debate

    built = 0
    original = debate.Agent.model_validate

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal built
        built += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(debate.Agent, "model_validate", counting)
    with pytest.raises(SteeringInvalid, match="less than or equal to 16"):
        steerer_for(FakeEngine()).plan(SteeringSpec(strategy="debate",
                                                    options={"agents": 10 ** 9}))
    assert built == 0


# -- 2. concurrent calls reserve tokens ------------------------------------------------------


async def test_concurrent_calls_never_pass_the_token_budget() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.default_answer = words(100)
    engine.hold = asyncio.Event()
    session = Session(engine, Budget(10, 40, 60), "r", None)
    first = asyncio.create_task(
        session.generate([PROMPT], SamplingParams(max_tokens=10), role="agent"))
    second = asyncio.create_task(
        session.generate([PROMPT], SamplingParams(max_tokens=100), role="agent"))
    while len(engine.history) < 2:
        await asyncio.sleep(0)
    # Both in flight: the second could only have the room the first did not reserve.
    assert engine.history[1].params.max_tokens == 40 - (5 + 10) - 5
    engine.hold.set()
    await asyncio.gather(first, second)
    assert session.total_tokens <= 40
    assert session.total_tokens == 5 + 10 + 5 + 20


async def test_a_full_reservation_refuses_the_concurrent_call() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.default_answer = words(100)
    engine.hold = asyncio.Event()
    session = Session(engine, Budget(10, 40, 60), "r", None)
    first = asyncio.create_task(
        session.generate([PROMPT], SamplingParams(max_tokens=100), role="agent"))
    while not engine.history:
        await asyncio.sleep(0)
    with pytest.raises(BudgetExhausted) as info:
        await asyncio.wait_for(
            session.generate([PROMPT], SamplingParams(max_tokens=100), role="agent"), 5)
    assert info.value.limit == "max_total_tokens"
    engine.hold.set()
    await first
    assert session.total_tokens == 40


async def test_unused_reservation_is_released() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.enqueue("x")
    session = Session(engine, Budget(10, 40, 60), "r", None)
    await session.generate([PROMPT], SamplingParams(max_tokens=30), role="agent")
    assert session.total_tokens == 6
    await session.generate([PROMPT], SamplingParams(max_tokens=100), role="agent")
    assert engine.history[1].params.max_tokens == 40 - 6 - 5


# -- 3. a cut-off stream is counted ----------------------------------------------------------


def stalling_stream(engine: FakeEngine) -> None:
    async def stream(prompt: Prompt, params: SamplingParams, adapter: AdapterRef | None = None,
                     request_id: str | None = None,
                     ) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        for text in ("one", " two", " three"):
            yield StreamDelta(index=0, text=text, new_tokens=1)
        await asyncio.Event().wait()  # the engine stalls: only the timeout ends it
        yield StreamEnd(prompt_tokens=5, completion_tokens=3)

    engine.stream = stream  # type: ignore[method-assign,assignment]


async def test_final_stream_cut_by_the_timeout_is_counted() -> None:
    engine = FakeEngine(max_model_len=4096)
    stalling_stream(engine)
    result = await run(steerer_for(engine), SteeringSpec(strategy="none",
                                                          budget={"timeout_s": 0.2}))
    assert result.text == "one two three"
    assert result.budget_exhausted
    assert (result.prompt_tokens, result.completion_tokens) == (5, 3)


async def test_closed_stream_counts_what_it_streamed() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.enqueue("one two three four")
    session = Session(engine, Budget(10, 1000, 60), "r", None)
    stream = session.stream(PROMPT, SamplingParams(max_tokens=10))
    got = [await anext(stream), await anext(stream)]
    await stream.aclose()
    assert [g.text for g in got if isinstance(g, StreamDelta)] == ["one", " two"]
    assert (session.prompt_tokens, session.completion_tokens) == (5, 2)


async def test_finished_stream_is_counted_once() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.enqueue("one two three")
    session = Session(engine, Budget(10, 1000, 60), "r", None)
    items = [i async for i in session.stream(PROMPT, SamplingParams(max_tokens=10))]
    assert isinstance(items[-1], StreamEnd)
    assert (session.prompt_tokens, session.completion_tokens) == (5, 3)


# -- 4. a strategy's own prompts fit the context ---------------------------------------------

SMALL_CONTEXT = 200


def assert_all_prompts_fit(engine: FakeEngine) -> None:
    for call in engine.history:
        for p in call.prompts:
            assert engine.count_prompt_tokens(p) < engine.max_model_len


async def test_debate_round_two_fits_the_context() -> None:
    engine = FakeEngine(max_model_len=SMALL_CONTEXT)
    answers = iter(range(100))

    def respond(prompt: Prompt, params: SamplingParams) -> str:
        if "other agents" in _text_of(prompt):
            return "so 42"
        return f"{words(80)} {next(answers)}"  # they disagree at first

    engine.respond = respond
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="debate", options={"agents": 3, "rounds": 2}, trace=True), max_tokens=150)
    assert result.text == "so 42"
    round_two = engine.history[-1].prompts
    assert all("characters cut" in _text_of(p) for p in round_two)
    assert all("w0" in _text_of(p) for p in round_two)  # the head of each quote is kept
    assert_all_prompts_fit(engine)


async def test_llm_judge_fits_long_candidates() -> None:
    engine = FakeEngine(max_model_len=SMALL_CONTEXT)

    def respond(prompt: Prompt, params: SamplingParams) -> str:
        return "yes" if "If it is, reply with:" in _text_of(prompt) else words(150) + " END"

    engine.respond = respond
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="best_of_n", options={"n": 2}, critic={"name": "llm_judge"}), max_tokens=190)
    assert result.text.endswith("END")
    judge = engine.history[-1]
    assert judge.params.max_tokens == 1
    for p in judge.prompts:
        text = _text_of(p)
        assert "characters cut" in text and "w0" in text and "END" in text
    assert_all_prompts_fit(engine)


async def test_llm_judge_drops_a_call_that_cannot_fit() -> None:
    engine = FakeEngine(max_model_len=30)  # the judge's instructions alone are longer
    engine.enqueue("a", "b")
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="best_of_n", options={"n": 2}, critic={"name": "llm_judge"}, trace=True),
        max_tokens=10)
    assert len(engine.history) == 1  # only the generator's call
    assert result.model_calls == 2
    assert all("did not fit" in (n.meta.get("llm_judge_detail") or "")
               for n in result.trace.nodes)


async def test_pairwise_fits_long_candidates() -> None:
    engine = FakeEngine(max_model_len=SMALL_CONTEXT)

    def respond(prompt: Prompt, params: SamplingParams) -> str:
        return "A" if "A or B" in _text_of(prompt) else words(120)

    engine.respond = respond
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="best_of_n", options={"n": 2}, critic={"name": "pairwise"}), max_tokens=190)
    assert result.model_calls == 4
    assert_all_prompts_fit(engine)


async def test_reflection_fits_a_long_draft() -> None:
    engine = FakeEngine(max_model_len=SMALL_CONTEXT)

    def respond(prompt: Prompt, params: SamplingParams) -> str:
        text = _text_of(prompt)
        if "If it is, reply with:" in text:
            return "no"
        if text.startswith("Review the answer"):
            return "too long"
        return words(150)

    engine.respond = respond
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="reflection", options={"max_iters": 1}), max_tokens=190)
    assert result.model_calls == 5  # draft, judge, feedback, revision, judge
    assert_all_prompts_fit(engine)


async def test_tot_prompts_fit_the_context() -> None:
    engine = FakeEngine(max_model_len=SMALL_CONTEXT)

    def respond(prompt: Prompt, params: SamplingParams) -> str:
        text = _text_of(prompt)
        if "sure, likely or impossible" in text:
            return "likely"
        return words(60)  # one long proposed step per call

    engine.respond = respond
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="tot", options={"breadth": 1, "depth": 4, "max_proposals": 1,
                                 "n_evaluate": 1, "step_tokens": 80}))
    assert result.model_calls >= 8
    assert_all_prompts_fit(engine)


# -- 5. anytime budgets ----------------------------------------------------------------------


async def test_best_of_n_does_what_the_budget_allows() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.enqueue(("a 1", -1.0), ("b 2", -0.1))
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="best_of_n", options={"n": 8}, budget={"max_model_calls": 2}))
    assert result.text == "b 2"
    assert result.budget_exhausted and result.model_calls == 2
    assert [c.params.n for c in engine.history] == [2]


async def test_best_of_n_keeps_room_for_its_judge() -> None:
    engine = FakeEngine(max_model_len=4096)
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="best_of_n", options={"n": 8}, critic={"name": "llm_judge"},
        budget={"max_model_calls": 5}))
    assert result.budget_exhausted and result.model_calls <= 5
    assert engine.history[0].params.n == 2  # 2 samples + 2 verdicts fit, 3 + 3 do not


async def test_self_consistency_votes_over_what_fits() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.enqueue("so 7", "so 8", "so 8")
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="self_consistency", options={"k": 5}, budget={"max_model_calls": 3},
        trace=True))
    assert result.text == "so 8"
    assert result.budget_exhausted and result.model_calls == 3
    assert result.trace.to_dict()["votes"] == {"8": 2, "7": 1}


async def test_debate_stops_at_the_round_that_does_not_fit() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.enqueue("so 1", "so 2", "so 2")
    result = await run(steerer_for(engine), SteeringSpec(
        strategy="debate", options={"agents": 3, "rounds": 2}, budget={"max_model_calls": 4}))
    assert result.text == "so 2"  # the majority of what was said, not the first answer
    assert result.budget_exhausted and result.model_calls == 3


async def test_default_dfs_is_planned_on_a_default_server() -> None:
    engine = FakeEngine(max_model_len=4096)
    steerer = steerer_for(engine)
    plan = steerer.plan(SteeringSpec(strategy="tot", options={"search": "dfs"}))
    assert plan.budget.max_model_calls == Limits().max_model_calls
    result = await steerer.run(plan, QUESTION, SamplingParams(max_tokens=20), None, "r")
    assert result.model_calls <= Limits().max_model_calls


async def test_a_budget_below_one_useful_run_is_refused_up_front() -> None:
    steerer = steerer_for(FakeEngine())
    with pytest.raises(SteeringInvalid) as info:
        steerer.plan(SteeringSpec(strategy="best_of_n", critic={"name": "llm_judge"},
                                  budget={"max_model_calls": 1}))
    assert info.value.param == "steering.budget.max_model_calls"
    assert "at least 2" in str(info.value)


SMALL_SPECS = [
    ("best_of_n", {"n": 8, "batch_size": 3}, {"name": "llm_judge"}),
    ("best_of_n", {"n": 6}, {"name": "pairwise"}),
    ("self_consistency", {"k": 6}, {"name": "llm_judge"}),
    ("debate", {"agents": 3, "rounds": 3, "summarize": True}, None),
    ("debate", {"agents": 3, "rounds": 2, "aggregate": "judge"}, {"name": "llm_judge"}),
    ("reflection", {"max_iters": 3, "feedback": "both"}, {"name": "llm_judge"}),
    ("tot", {"breadth": 2, "depth": 3}, None),
    ("tot", {"search": "dfs", "threshold": 0.0}, None),
    ("tot", {"evaluator": "vote"}, None),
]


@pytest.mark.parametrize(("strategy", "options", "critic"), SMALL_SPECS)
@pytest.mark.parametrize("calls", [2, 3, 5, 9])
async def test_the_call_budget_is_never_exceeded(
    strategy: str, options: dict[str, Any], critic: dict[str, Any] | None, calls: int
) -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.default_answer = "step 1\nAnswer: 2"
    steerer = steerer_for(engine)
    spec = SteeringSpec(strategy=strategy, options=options, critic=critic,
                        budget={"max_model_calls": calls})
    try:
        result = await run(steerer, spec)
    except SteeringInvalid as exc:  # a budget below one useful run: refused before any call
        assert exc.param == "steering.budget.max_model_calls"
        assert not engine.history
        return
    assert result.model_calls <= calls
    assert served_sequences(engine) == result.model_calls


# -- 6. presets fit the server's caps --------------------------------------------------------

LOW_CAPS = Limits(max_model_calls=4, max_total_tokens=2000, timeout_s=10.0)


async def test_reasoning_effort_preset_is_clamped_to_the_caps() -> None:
    engine = FakeEngine(max_model_len=4096)
    steerer = steerer_for(engine, LOW_CAPS)
    plan = steerer.plan(with_reasoning_effort(None, "high"))
    assert (plan.budget.max_model_calls, plan.budget.max_total_tokens,
            plan.budget.timeout_s) == (4, 2000, 10.0)
    result = await steerer.run(plan, QUESTION, SamplingParams(max_tokens=10), None, "r")
    assert result.model_calls == 4 and result.budget_exhausted


async def test_explicit_budget_above_the_cap_is_still_refused() -> None:
    steerer = steerer_for(FakeEngine(), LOW_CAPS)
    spec = with_reasoning_effort(SteeringSpec(strategy="none",
                                              budget={"max_model_calls": 5}), "high")
    with pytest.raises(SteeringInvalid) as info:
        steerer.plan(spec)
    assert info.value.param == "steering.budget.max_model_calls"


async def test_explicit_budget_overrides_the_preset() -> None:
    steerer = steerer_for(FakeEngine(), LOW_CAPS)
    plan = steerer.plan(with_reasoning_effort(
        SteeringSpec(strategy="none", budget={"max_model_calls": 2}), "high"))
    assert plan.budget.max_model_calls == 2
    assert plan.budget.timeout_s == 10.0


async def test_reasoning_effort_on_a_server_with_low_caps_over_http() -> None:
    settings = Settings(steer_max_model_calls=4, steer_max_total_tokens=2000,
                        steer_timeout_s=10.0)
    engine = FakeEngine(max_model_len=4096)
    async with running(create_app(settings, engine)) as client:
        r = await client.post("/v1/chat/completions", json={
            "model": "fake-model", "reasoning_effort": "high",
            "messages": [{"role": "user", "content": "What is 6 * 7?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["steering"]["model_calls"] == 4


# -- 7. which limit fired, and whose it was --------------------------------------------------


async def test_request_token_limit_is_named() -> None:
    steerer = steerer_for(FakeEngine(max_model_len=4096))
    with pytest.raises(BudgetExhausted) as info:
        await run(steerer, SteeringSpec(strategy="none", budget={"max_total_tokens": 3}))
    assert (info.value.limit, info.value.source) == ("max_total_tokens", "request")
    assert "max_total_tokens" in str(info.value) and "3" in str(info.value)


async def test_server_token_cap_is_the_servers() -> None:
    steerer = steerer_for(FakeEngine(max_model_len=4096), Limits(max_total_tokens=3))
    with pytest.raises(BudgetExhausted) as info:
        await run(steerer, SteeringSpec(strategy="none"))
    assert (info.value.limit, info.value.source) == ("max_total_tokens", "server")


async def test_server_timeout_is_the_servers() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.hold = asyncio.Event()
    steerer = steerer_for(engine, Limits(timeout_s=0.2))
    with pytest.raises(BudgetExhausted) as info:
        await run(steerer, SteeringSpec(strategy="best_of_n", options={"n": 2}))
    assert (info.value.limit, info.value.source) == ("timeout_s", "server")
    assert "0.2" in str(info.value)


async def test_final_stream_timeout_is_the_requests() -> None:
    engine = FakeEngine(max_model_len=4096)
    engine.hold = asyncio.Event()
    steerer = steerer_for(engine)
    with pytest.raises(BudgetExhausted) as info:
        await run(steerer, SteeringSpec(strategy="none", budget={"timeout_s": 0.2}))
    assert (info.value.limit, info.value.source) == ("timeout_s", "request")


async def test_server_call_cap_is_the_servers() -> None:
    engine = FakeEngine(max_model_len=4096)
    session = Session(engine, Budget(1, 1000, 60), "r", None)
    with pytest.raises(BudgetExhausted) as info:
        await session.generate([PROMPT], SamplingParams(n=2, max_tokens=5), role="x")
    assert (info.value.limit, info.value.source) == ("max_model_calls", "server")


async def test_preset_limit_is_the_presets() -> None:
    engine = FakeEngine(max_model_len=4096)
    steerer = steerer_for(engine)
    plan = steerer.plan(with_reasoning_effort(SteeringSpec(
        strategy="best_of_n", options={"n": 2}), "low"))
    assert plan.budget.source("max_model_calls") == "preset"
    assert plan.budget.source("max_total_tokens") == "preset"


async def test_fit_keeps_short_quotes_whole_and_counts_a_few_times() -> None:
    counted = 0

    async def room(prompt: str) -> int:
        nonlocal counted
        counted += 1
        return 100 - len(prompt.split())

    short, long = "tiny answer", " ".join(f"x{i}" for i in range(300))
    fitted = await fit_prompt(lambda cut: f"judge: {cut(short)} vs {cut(long)}", room, 10)
    assert fitted is not None
    assert await room(fitted) >= 10
    assert "tiny answer" in fitted and "x0" in fitted and "x299" in fitted
    assert "characters cut" in fitted
    assert counted <= 3 + MAX_TRIES


async def test_fit_gives_up_when_even_empty_quotes_do_not_fit() -> None:
    async def room(prompt: str) -> int:
        return 5 - len(prompt.split())

    assert await fit_prompt(lambda cut: f"a b c d e f {cut('q')}", room, 1) is None


async def test_a_bad_agent_is_named_not_the_count_form() -> None:
    with pytest.raises(SteeringInvalid) as info:
        steerer_for(FakeEngine()).plan(SteeringSpec(
            strategy="debate", options={"agents": [{"temperature": "hot"}]}))
    assert info.value.param == "steering.options.agents.0.temperature"


class SlowCountEngine(FakeEngine):
    """Counts prompt tokens off the loop, as the vLLM backend does for long prompts."""

    async def count_prompt_tokens_async(self, prompt: Prompt) -> int:
        await asyncio.sleep(0)
        return self.count_prompt_tokens(prompt)


async def test_calls_counted_concurrently_never_pass_the_call_budget() -> None:
    engine = SlowCountEngine(max_model_len=4096)
    session = Session(engine, Budget(1, 1000, 60), "r", None)
    results = await asyncio.gather(
        session.generate([PROMPT], SamplingParams(max_tokens=5), role="a"),
        session.generate([PROMPT], SamplingParams(max_tokens=5), role="b"),
        return_exceptions=True)
    assert session.model_calls == 1 and len(engine.history) == 1
    assert sum(isinstance(r, BudgetExhausted) for r in results) == 1
