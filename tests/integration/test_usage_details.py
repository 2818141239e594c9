"""Usage details and steering everywhere on the real engine, through the official `openai`
client: reasoning tokens that add up with `usage.steering` and the trace (0 plain), the
prefix cache's cached tokens, the streamed usage chunk, steered logprobs, n > 1 with a
strategy, a steered /v1/completions, and a steered answer streamed in real token pieces.

Assertions are about shapes and accounting, never about which answer a 135M model picks.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.support import MODEL

pytestmark = pytest.mark.integration

SUM: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples now?"}
]
BON = {"strategy": "best_of_n", "options": {"n": 3}, "trace": True}


def reasoning(usage: CompletionUsage | None) -> int:
    assert usage is not None and usage.completion_tokens_details is not None
    value = usage.completion_tokens_details.reasoning_tokens
    assert value is not None
    return value


def extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {})[name]


def test_plain_answers_spend_no_reasoning_tokens(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=SUM, max_tokens=16)
    assert reasoning(resp.usage) == 0
    text = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=8)
    assert reasoning(text.usage) == 0


def test_reasoning_tokens_add_up_with_the_search(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=SUM, max_tokens=32,
                                       extra_body={"steering": BON})
    usage = resp.usage
    assert usage is not None
    assert extra(usage, "steering")["model_calls"] == 3
    nodes = extra(resp, "steering_trace")["nodes"]
    (chosen,) = [n for n in nodes if n["chosen"]]
    assert usage.completion_tokens == sum(n["tokens"] for n in nodes)
    # Everything the search generated but the returned answer itself.
    assert reasoning(usage) == usage.completion_tokens - chosen["tokens"]
    assert reasoning(usage) == sum(n["tokens"] for n in nodes if not n["chosen"])


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache(oai: openai.OpenAI) -> None:
    long = " ".join(f"item {i} is on the list." for i in range(120))
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": long + " Which item is first?"}]
    first = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    again = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    for resp in (first, again):
        assert resp.usage is not None and resp.usage.prompt_tokens_details is not None
    assert first.usage is not None and again.usage is not None
    cached = again.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached is not None and 0 < cached <= again.usage.prompt_tokens
    assert again.usage.prompt_tokens > 400


def test_the_streamed_usage_chunk_has_the_details(oai: openai.OpenAI) -> None:
    for body in ({}, {"steering": {"strategy": "self_consistency", "options": {"k": 3}}}):
        stream = oai.chat.completions.create(
            model=MODEL, messages=SUM, max_tokens=24, stream=True,
            stream_options={"include_usage": True}, extra_body=body)
        chunks = list(stream)
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens is not None
        spent = reasoning(usage)
        assert (spent == 0) if not body else (0 < spent < usage.completion_tokens)


def test_steered_logprobs_are_the_chosen_generations(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, messages=SUM, max_tokens=24, logprobs=True, top_logprobs=2,
        extra_body={"steering": BON})
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    nodes = extra(resp, "steering_trace")["nodes"]
    (chosen,) = [n for n in nodes if n["chosen"]]
    assert len(choice.logprobs.content) == chosen["tokens"]


def test_n_choices_from_independent_searches(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, messages=SUM, max_tokens=24, n=2,
        extra_body={"steering": {"strategy": "best_of_n", "options": {"n": 2}}})
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content for c in resp.choices)
    assert resp.usage is not None
    assert extra(resp.usage, "steering")["model_calls"] == 4


def test_a_steered_text_completion(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(
        model=MODEL, prompt="What is 3 + 4?", max_tokens=24,
        extra_body={"steering": {"strategy": "best_of_n", "options": {"n": 2}}})
    assert resp.object == "text_completion"
    assert resp.choices[0].text
    assert resp.usage is not None
    assert extra(resp.usage, "steering")["model_calls"] == 2
    assert 0 < reasoning(resp.usage) < resp.usage.completion_tokens


def test_a_steered_stream_sends_the_answer_in_pieces(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL, messages=SUM, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
        extra_body={"steering": {"strategy": "best_of_n", "options": {"n": 2}}})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    usage = chunks[-1].usage
    assert usage is not None
    answer_tokens = usage.completion_tokens - reasoning(usage)
    # The pieces are the engine's own steps: about one per token, never re-cut text.
    assert len(pieces) >= answer_tokens // 2
