"""Steering strategies on the real engine through the official `openai` client
(`extra_body={"steering": ...}`): usage and traces, streamed and not, aliases, budgets.

Assertions are about behaviour and accounting, never about which answer a 135M model picks.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from steer.critics.extract import last_number
from tests.integration.support import MODEL

pytestmark = pytest.mark.integration

SUM: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples now?"}
]


def steer(oai: openai.OpenAI, steering: dict[str, Any], **kwargs: Any) -> ChatCompletion:
    return oai.chat.completions.create(
        model=MODEL, messages=kwargs.pop("messages", SUM), max_tokens=kwargs.pop("max_tokens", 48),
        extra_body={"steering": steering}, **kwargs,
    )


def steering_usage(resp: ChatCompletion) -> dict[str, Any]:
    assert resp.usage is not None
    extra = resp.usage.model_extra or {}
    usage: dict[str, Any] = extra["steering"]
    return usage


def trace_of(resp: ChatCompletion) -> dict[str, Any]:
    trace: dict[str, Any] = (resp.model_extra or {})["steering_trace"]
    return trace


def test_best_of_n_with_trace(oai: openai.OpenAI) -> None:
    resp = steer(oai, {"strategy": "best_of_n", "options": {"n": 4}, "trace": True})
    usage = steering_usage(resp)
    assert usage == {"model_calls": 4, "candidates": 4, "pruned": 3, "budget_exhausted": False}
    trace = trace_of(resp)
    nodes = trace["nodes"]
    assert len(nodes) == 4 and sum(n["chosen"] for n in nodes) == 1
    chosen = next(n for n in nodes if n["chosen"])
    assert chosen["text"] == resp.choices[0].message.content
    assert chosen["scores"]["logprob"] == max(n["scores"]["logprob"] for n in nodes)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == sum(n["tokens"] for n in nodes)


def test_best_of_n_with_llm_judge_counts_the_judge(oai: openai.OpenAI) -> None:
    resp = steer(oai, {"strategy": "best_of_n", "options": {"n": 2},
                       "critic": {"name": "llm_judge"}, "trace": True})
    assert steering_usage(resp)["model_calls"] == 4  # 2 answers + 2 one-token verdicts
    scores = [n["scores"]["llm_judge"] for n in trace_of(resp)["nodes"]]
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_self_consistency_votes(oai: openai.OpenAI) -> None:
    resp = steer(oai, {"strategy": "self_consistency", "options": {"k": 4, "temperature": 0.4},
                       "template": {"name": "answer_format"}, "trace": True}, max_tokens=64)
    trace = trace_of(resp)
    votes: dict[str, int] = trace["votes"]
    assert sum(votes.values()) <= 4
    if votes:
        assert last_number(resp.choices[0].message.content or "") == max(votes, key=votes.get)
    assert trace["template"] == "answer_format"


def test_template_streams_real_tokens(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL, messages=SUM, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
        extra_body={"steering": {"strategy": "template",
                                 "options": {"name": "chain_of_thought"}}},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 3  # token by token, not one block
    finish = next(c.choices[0].finish_reason for c in chunks
                  if c.choices and c.choices[0].finish_reason)
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 24
    if finish == "length":
        assert usage.completion_tokens == 24
    assert (usage.model_extra or {})["steering"]["model_calls"] == 1


def test_streamed_best_of_n_sends_progress_then_the_answer(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL, messages=SUM, max_tokens=32, stream=True,
        extra_body={"steering": {"strategy": "best_of_n", "options": {"n": 3}, "trace": True}},
    )
    chunks = list(stream)
    progress = [c for c in chunks if (c.model_extra or {}).get("steering")
                and c.choices and c.choices[0].finish_reason is None]
    assert progress and progress[0].model_extra["steering"]["candidates"] == 3  # type: ignore[index]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    trace = (final[0].model_extra or {})["steering"]["trace"]
    assert next(n for n in trace["nodes"] if n["chosen"])["text"] == text


def test_optillm_model_prefix_and_reasoning_effort(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model=f"bon-{MODEL}", messages=SUM, max_tokens=16)
    assert steering_usage(resp)["model_calls"] == 4  # optillm's bon -> best_of_n, n=4
    resp = oai.chat.completions.create(model=MODEL, messages=SUM, max_tokens=16,
                                       reasoning_effort="low")
    assert steering_usage(resp)["model_calls"] == 1


def test_budget_cuts_the_search_short(oai: openai.OpenAI) -> None:
    resp = steer(oai, {"strategy": "best_of_n", "options": {"n": 8, "batch_size": 4},
                       "budget": {"max_model_calls": 6}})
    usage = steering_usage(resp)
    # Anytime: a first wave of 4, then the 2 samples that still fit.
    assert usage["budget_exhausted"] is True and usage["model_calls"] == 6
    assert resp.choices[0].message.content


def test_tot_game24_tree_and_stored_trace(oai: openai.OpenAI, http: httpx.Client) -> None:
    resp = steer(oai, {"strategy": "tot", "trace": True, "options": {
        "task": "game24", "breadth": 2, "depth": 1, "n_evaluate": 1, "max_proposals": 3,
        "step_tokens": 64, "value_tokens": 24}},
        messages=[{"role": "user", "content": "4 9 10 13"}])
    trace = trace_of(resp)
    usage = steering_usage(resp)
    # level 1: 1 expansion + <=3 values; level 2 (answer step): <=2 expansions + values.
    # A 135M model may propose no well-formed step at all: its text is kept as an "unparsed"
    # node, and ToT answers directly (1 expansion + 1 answer).
    thoughts = [n for n in trace["nodes"] if n["role"] == "thought"]
    assert 2 <= usage["model_calls"] <= 1 + 3 + 2 + 6
    if not thoughts:
        assert trace["fallback"] == "no usable step; answered directly"
        assert [n["role"] for n in trace["nodes"]] == ["root", "unparsed", "final"]
        assert usage["model_calls"] == 2
    assert trace["nodes"][0]["role"] == "root"
    assert all(parent < child for parent, child in trace["edges"])
    stored = http.get(f"/v1/steering/traces/{trace['id']}")
    assert stored.status_code == 200 and stored.json()["nodes"] == trace["nodes"]
    dot = http.get(f"/v1/steering/traces/{trace['id']}", params={"format": "dot"})
    assert dot.text.startswith('digraph "tot"') and "n0 [" in dot.text
    assert "n0 -> n1;" in dot.text


def test_reflection_with_verifier_feedback(oai: openai.OpenAI) -> None:
    resp = steer(oai, {"strategy": "reflection", "trace": True,
                       "options": {"max_iters": 1, "feedback": "critic"},
                       "critic": {"name": "exact_answer", "reference": 7}})
    roles = [n["role"] for n in trace_of(resp)["nodes"]]
    assert roles == ["draft", "revision"] or roles == ["draft"]
    assert steering_usage(resp)["model_calls"] == len(roles)


def test_debate_streamed(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL, messages=SUM, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
        extra_body={"steering": {"strategy": "debate", "options": {"agents": 2, "rounds": 2}}},
    )
    chunks = list(stream)
    rounds = [(c.model_extra or {})["steering"]["round"] for c in chunks
              if (c.model_extra or {}).get("steering")]
    assert rounds[0] == 0 and len(rounds) <= 2
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.model_extra or {})["steering"]["model_calls"] == 2 * len(rounds)


def test_steering_errors_name_the_field(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        steer(oai, {"strategy": "best_of_n", "options": {"n": 4, "beams": 2}})
    assert exc.value.body["param"] == "steering.options.beams"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as exc:
        steer(oai, {"strategy": "self_consistency", "critic": {"name": "oracle"}})
    assert exc.value.body["param"] == "steering.critic.name"  # type: ignore[index]
