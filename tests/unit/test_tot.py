"""Tree-of-Thoughts over the scripted engine, checked against the paper's BFS algorithm."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import pytest

from steer.critics import Question
from steer.critics.game24 import check_state, current_numbers
from steer.engine import Message, Prompt, SamplingParams
from steer.search import Limits, Steerer, SteeringSpec, SteerResult, TemplateLibrary
from steer.search.runner import Progress
from steer.search.tasks import Game24Task
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

PUZZLE = "4 9 10 13"
QUESTION = (Message("user", f"Use {PUZZLE} to make 24."),)
ANSWER = "Answer: (13 - 9) * (10 - 4) = 24"


def proposals(numbers: str) -> str:
    """Scripted proposer: up to 8 steps per state, deterministic."""
    nums = [int(x) for x in numbers.split()]
    lines = []
    for (i, a), (j, b) in itertools.combinations(enumerate(nums), 2):
        rest = [n for k, n in enumerate(nums) if k not in (i, j)]
        for op, value in (("-", abs(a - b)), ("*", a * b), ("+", a + b)):
            x, y = (a, b) if op != "-" or a >= b else (b, a)
            left = " ".join(str(n) for n in sorted([*rest, value]))
            lines.append(f"{x} {op} {y} = {value} (left: {left})")
    return "\n".join(lines[:8])


@functools.cache
def reachable(numbers: str) -> bool:
    """Can the scripted proposer's own moves still reach 24 from `numbers`?"""
    if " " not in numbers:
        return numbers == "24"
    return any(reachable(line.split("(left: ")[1].rstrip(")"))
               for line in proposals(numbers).split("\n") if line)


def value_of(numbers: str) -> str:
    """A good value model: sure when 24 can still be reached, else impossible."""
    return "sure" if reachable(numbers) else "impossible"


def respond(prompt: Prompt, params: SamplingParams) -> str:
    """The scripted model: the paper's prompts in, the paper's kind of outputs out."""
    text = prompt if isinstance(prompt, str) else prompt[-1].content
    last = text.strip().split("\n")[-1]
    if "Possible next steps:" in text:
        return proposals(text.strip().split("\n")[-2].removeprefix("Input: "))
    if text.startswith("Evaluate if given numbers can reach 24"):
        return f"thinking\n{value_of(last)}"
    if last == "Judge:":
        answer = text.strip().split("\n")[-2].removeprefix("Answer: ")
        ok, solved, _ = check_state([4, 9, 10, 13], "Answer: " + answer)
        return "sure" if ok and solved else "impossible"
    if "Steps:" in text:
        return ANSWER
    raise AssertionError(f"unexpected prompt: {text[:80]}")


def reference_bfs(steps: int, breadth: int, n_evaluate: int) -> list[list[str]]:
    """princeton-nlp/tree-of-thought-llm methods/bfs.py `solve`, propose + value + greedy."""
    task, x = Game24Task(), Question(QUESTION)
    value_cache: dict[str, float] = {}
    ys, kept = [""], []
    for _ in range(steps):
        new_ys: list[str] = []
        for y in ys:
            out = respond(task.propose_prompt(x, y), SamplingParams())
            # subtle: the paper also keeps empty lines as thoughts; Steer drops them.
            new_ys += [y + line + "\n" for line in out.split("\n") if line.strip()]
        if not new_ys:
            break
        values: list[float] = []
        local: dict[str, float] = {}
        for y in new_ys:
            if y in local:
                values.append(0)  # avoid duplicate candidates
                continue
            prompt = task.value_prompt(x, y)
            key = prompt[-1].content
            if key not in value_cache:
                outs = [respond(prompt, SamplingParams()) for _ in range(n_evaluate)]
                value_cache[key] = task.parse_value(y, outs)
            local[y] = value_cache[key]
            values.append(local[y])
        ids = sorted(range(len(new_ys)), key=lambda i: values[i], reverse=True)[:breadth]
        ys = [new_ys[i] for i in ids]
        kept.append(ys)
    return kept


@pytest.fixture
def engine() -> FakeEngine:
    fake = FakeEngine(max_model_len=100_000)
    fake.respond = respond
    return fake


@pytest.fixture
def steerer(engine: FakeEngine) -> Steerer:
    return Steerer(engine, Limits(max_model_calls=10_000, max_total_tokens=10_000_000),
                   TemplateLibrary(), lambda name: None)  # type: ignore[arg-type,return-value]


async def run_tot(
    steerer: Steerer, critic: dict[str, Any] | None = None, **options: Any
) -> tuple[SteerResult, list[dict[str, Any]]]:
    plan = steerer.plan(SteeringSpec(strategy="tot", options={"task": "game24", **options},
                                     critic=critic, trace=True))
    items = [i async for i in steerer.stream(plan, QUESTION, SamplingParams(), None, "r")]
    result = items[-1]
    assert isinstance(result, SteerResult)
    return result, [i.event for i in items if isinstance(i, Progress)]


@pytest.mark.parametrize("breadth", [1, 5])
async def test_bfs_keeps_the_papers_states_in_order(
    engine: FakeEngine, steerer: Steerer, breadth: int
) -> None:
    expected = reference_bfs(steps=4, breadth=breadth, n_evaluate=3)
    result, progress = await run_tot(steerer, breadth=breadth)
    texts = {n.id: n.text for n in result.trace.nodes}
    ours = [[texts[i] for i in event["kept"]] for event in progress]
    assert ours == expected
    assert result.text.strip().endswith(ANSWER)
    assert check_state([4, 9, 10, 13], result.text)[1]


async def test_each_level_is_one_batch_of_expansions_and_one_of_values(
    engine: FakeEngine, steerer: Steerer
) -> None:
    await run_tot(steerer, breadth=5)
    kinds = []
    for call in engine.history:
        text = call.prompts[0][-1].content  # type: ignore[index]
        kinds.append("value" if "Evaluate" in text or "Judge" in text else "expand")
    assert kinds == ["expand", "value"] * 4
    assert all(c.params.n == 3 for c, k in zip(engine.history, kinds, strict=True)
               if k == "value")


async def test_trace_is_a_tree(steerer: Steerer) -> None:
    result, _ = await run_tot(steerer, breadth=2)
    graph = result.trace.graph()
    import networkx as nx

    assert nx.is_tree(graph)
    root = [n for n, d in graph.in_degree() if d == 0]
    assert root == [0]
    dot = result.trace.to_dot()
    assert dot.startswith('digraph "tot"') and "style=bold" in dot and "style=dashed" in dot


async def test_verifier_as_evaluator(steerer: Steerer) -> None:
    result, _ = await run_tot(steerer, critic={"name": "game24"}, breadth=3, evaluator="critic")
    assert check_state([4, 9, 10, 13], result.text)[0]


async def test_bfs_plan_rejects_critic_evaluator_without_critic(steerer: Steerer) -> None:
    with pytest.raises(Exception, match=r"needs steering\.critic"):
        steerer.plan(SteeringSpec(strategy="tot", options={"evaluator": "critic"}))


async def test_dfs_prunes_and_backtracks(engine: FakeEngine, steerer: Steerer) -> None:
    def dfs_respond(prompt: Prompt, params: SamplingParams) -> str:
        text = prompt if isinstance(prompt, str) else prompt[-1].content
        if "Possible next steps:" in text:
            numbers = text.strip().split("\n")[-2].removeprefix("Input: ")
            if numbers == PUZZLE:  # two first steps: a dead end valued first, then the way
                return "4 + 9 = 13 (left: 10 13 13)\n13 - 9 = 4 (left: 4 4 10)"
        if text.startswith("Evaluate") and text.strip().split("\n")[-1] == "10 13 13":
            return "sure"  # misleading: the dead end looks best and is explored first
        return respond(prompt, params)

    engine.respond = dfs_respond
    result, _ = await run_tot(steerer, search="dfs", threshold=1.0, max_states=20)
    assert check_state([4, 9, 10, 13], result.text)[1]
    backtracked = [n for n in result.trace.nodes if n.meta.get("backtracked")]
    assert backtracked and backtracked[0].text.startswith("4 + 9 = 13")
    assert any(n.pruned for n in result.trace.nodes)
    assert result.trace.to_dict()["visited"] <= 20


async def test_dfs_respects_the_state_cap(engine: FakeEngine, steerer: Steerer) -> None:
    result, _ = await run_tot(steerer, search="dfs", threshold=0.0, max_states=2)
    assert result.trace.to_dict()["visited"] == 2


async def test_budget_cut_mid_search_returns_best_state(steerer: Steerer) -> None:
    plan = steerer.plan(SteeringSpec(strategy="tot", options={"task": "game24", "breadth": 5},
                                     budget={"max_model_calls": 40}))
    result = await steerer.run(plan, QUESTION, SamplingParams(), None, "r")
    assert result.budget_exhausted
    assert result.model_calls <= 40
    assert current_numbers(result.text) is not None  # a partial state, the best valued one


async def test_generic_steps_task_concludes_with_a_final_generation(engine: FakeEngine,
                                                                    steerer: Steerer) -> None:
    def steps_respond(prompt: Prompt, params: SamplingParams) -> str:
        text = prompt if isinstance(prompt, str) else prompt[-1].content
        if "List a few different possible next steps" in text:
            return "1. Multiply six by seven\n2. Guess"
        if "Can these steps lead" in text:
            return "sure" if "Multiply" in text else "impossible"
        return "So 42.\nAnswer: 42"

    engine.respond = steps_respond
    plan = steerer.plan(SteeringSpec(strategy="tot", options={"breadth": 1, "depth": 2},
                                     trace=True))
    result = await steerer.run(plan, (Message("user", "6*7?"),), SamplingParams(), None, "r")
    assert "Answer: 42" in result.text
    final = [n for n in result.trace.nodes if n.role == "final"]
    assert final and final[0].parent is not None


async def test_no_parseable_step_answers_directly(engine: FakeEngine, steerer: Steerer) -> None:
    def babble(prompt: Prompt, params: SamplingParams) -> str:
        text = prompt if isinstance(prompt, str) else prompt[-1].content
        if "Possible next steps:" in text:
            return "I like numbers very much."  # not one well-formed step
        return "(13 - 9) * (10 - 4) = 24"  # the direct answer to the user's own messages

    engine.respond = babble
    result, progress = await run_tot(steerer, breadth=2)
    assert result.text == "(13 - 9) * (10 - 4) = 24"
    assert result.model_calls == 2  # one expansion, then the direct answer; nothing valued
    assert engine.history[-1].prompts[0] == QUESTION
    unparsed = [n for n in result.trace.nodes if n.role == "unparsed"]
    assert [n.text for n in unparsed] == ["I like numbers very much."]
    assert unparsed[0].pruned and unparsed[0].parent == 0
    assert result.trace.to_dict()["fallback"] == "no usable step; answered directly"
    assert progress[0]["kept"] == []


async def test_verifier_prunes_states_that_break_the_rules(engine: FakeEngine,
                                                           steerer: Steerer) -> None:
    def mixed(prompt: Prompt, params: SamplingParams) -> str:
        text = prompt if isinstance(prompt, str) else prompt[-1].content
        if "Possible next steps:" in text and text.strip().split("\n")[-2].endswith(PUZZLE):
            # one wrong arithmetic, one number not in the puzzle, one valid step
            return ("4 + 9 = 14 (left: 10 13 14)\n7 + 9 = 16 (left: 4 10 13 16)\n"
                    "13 - 9 = 4 (left: 4 4 10)")
        return respond(prompt, params)

    engine.respond = mixed
    result, progress = await run_tot(steerer, critic={"name": "game24"}, breadth=3,
                                     evaluator="critic")
    texts = {n.id: n.text for n in result.trace.nodes}
    assert [texts[i] for i in progress[0]["kept"]] == ["13 - 9 = 4 (left: 4 4 10)\n"]
    assert all(v > 0 for event in progress for v in event["values"])
    assert check_state([4, 9, 10, 13], result.text)[0]
