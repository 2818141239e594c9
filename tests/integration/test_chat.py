"""/v1/chat/completions against the real engine through the official `openai` client:
response shape, token accounting, streaming, n, logprobs and stop strings.

Assertions are about behaviour, never exact sentences: bf16 on CPU may flip near-tied tokens.
"""

from __future__ import annotations

import time

import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.integration.support import MODEL, ChatTokenCounter

pytestmark = pytest.mark.integration

# A prompt the model answers at length, so a small max_tokens always cuts it ("length").
STORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a long story about a dragon who learns to cook."}
]


def test_models_lists_the_default_model(oai: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in oai.models.list()]


def test_chat_response_shape(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What colour is the sky?"},
        ],
        max_tokens=12,
    )
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    assert abs(resp.created - time.time()) < 3600  # a Unix timestamp in seconds, not ms
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert choice.logprobs is None
    assert resp.usage is not None
    assert resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_usage_matches_tokenizer_and_max_tokens(
    oai: openai.OpenAI, count_chat_tokens: ChatTokenCounter
) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=STORY, max_tokens=7, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == count_chat_tokens(STORY)
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7


def test_chat_max_completion_tokens_limits_like_max_tokens(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=STORY, max_completion_tokens=5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5


def test_chat_streaming(oai: openai.OpenAI, count_chat_tokens: ChatTokenCounter) -> None:
    chunks: list[ChatCompletionChunk] = []
    with oai.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=9, stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks.extend(stream)

    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    first, *middle, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"

    # Every chunk but the last carries exactly one choice; the last only usage.
    assert all(len(c.choices) == 1 and c.usage is None for c in [first, *middle])
    finishes = [c.choices[0].finish_reason for c in [first, *middle] if c.choices[0].finish_reason]
    assert len(finishes) == 1, finishes
    assert middle[-1].choices[0].finish_reason == finishes[0]
    pieces = [c.choices[0].delta.content for c in middle[:-1]]
    assert pieces and all(pieces), pieces  # content chunks are never empty

    assert usage_chunk.choices == []
    usage = usage_chunk.usage
    assert usage is not None
    assert usage.prompt_tokens == count_chat_tokens(STORY)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert finishes[0] == "length"
    assert usage.completion_tokens == 9


def test_chat_n_choices_count_every_token(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, messages=STORY, n=3, temperature=1.0, max_tokens=6, logprobs=True
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage is not None
    per_choice = []
    for choice in resp.choices:
        assert choice.message.role == "assistant"
        assert choice.finish_reason in {"stop", "length"}
        assert choice.logprobs is not None and choice.logprobs.content is not None
        per_choice.append(len(choice.logprobs.content))
    assert resp.usage.completion_tokens == sum(per_choice)


def test_chat_greedy_n_choices_are_all_the_greedy_answer(oai: openai.OpenAI) -> None:
    # vLLM refuses n > 1 with greedy sampling; OpenAI's API accepts it (n equal answers).
    resp = oai.chat.completions.create(
        model=MODEL, messages=STORY, n=3, temperature=0, max_tokens=8, logprobs=True
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 1
    assert resp.choices[0].message.content
    counted = [len(c.logprobs.content or []) for c in resp.choices if c.logprobs]
    assert resp.usage is not None and resp.usage.completion_tokens == sum(counted) > 0
    stream = oai.chat.completions.create(
        model=MODEL, messages=STORY, n=2, temperature=0, max_tokens=8, stream=True
    )
    streamed = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed[0] == streamed[1] != ""


def test_chat_top_logprobs(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=8, logprobs=True, top_logprobs=3
    )
    assert resp.usage is not None
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == resp.usage.completion_tokens
    for entry in logprobs.content:
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3, entry
        assert top == sorted(top, reverse=True), entry
        assert entry.logprob <= top[0] + 1e-4, entry
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_chat_stop_string_ends_the_answer(oai: openai.OpenAI) -> None:
    # Greedy, this model counts one number per line; the first newline must end the answer.
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Count from 1 to 20, one number per line."}
    ]
    free = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=30,
                                       temperature=0)
    assert "\n" in (free.choices[0].message.content or "")
    resp = oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0, stop=["\n"]
    )
    assert resp.choices[0].finish_reason == "stop"
    assert "\n" not in (resp.choices[0].message.content or "")
    assert resp.usage is not None and free.usage is not None
    assert resp.usage.completion_tokens < free.usage.completion_tokens
