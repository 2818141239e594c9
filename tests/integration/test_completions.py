"""/v1/completions against the real engine: plain, streamed, batched prompts, logprobs, stop."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types import Completion

from tests.integration.support import MODEL

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time, in a land far away,"


def test_completion_shape_and_usage(oai: openai.OpenAI, tokenizer: Any) -> None:
    resp = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6)
    assert resp.id.startswith("cmpl-")
    assert resp.object == "text_completion"
    assert resp.model == MODEL
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.text
    assert choice.finish_reason in {"stop", "length"}
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_streamed(oai: openai.OpenAI, tokenizer: Any) -> None:
    chunks: list[Completion] = []
    with oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks.extend(stream)

    *text_chunks, usage_chunk = chunks
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" for c in chunks)
    assert all(len(c.choices) == 1 and c.choices[0].index == 0 for c in text_chunks)
    finishes = [c.choices[0].finish_reason for c in text_chunks if c.choices[0].finish_reason]
    assert finishes == [text_chunks[-1].choices[0].finish_reason], finishes
    assert "".join(c.choices[0].text for c in text_chunks)

    assert usage_chunk.choices == []
    usage = usage_chunk.usage
    assert usage is not None
    assert usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if finishes[0] == "length":
        assert usage.completion_tokens == 6


def test_completion_list_of_prompts(oai: openai.OpenAI, tokenizer: Any) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):"]
    resp = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=4)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason in {"stop", "length"} for c in resp.choices)
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert resp.usage.completion_tokens <= 2 * 4


def test_completion_list_of_prompts_with_n(oai: openai.OpenAI, tokenizer: Any) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):"]
    resp = oai.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3,
                                  temperature=1.0)
    # Prompt-major: prompt 0's two choices, then prompt 1's.
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.usage is not None
    # Each prompt counts once however many sequences it produced.
    assert resp.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)


def test_completion_logprobs(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert resp.usage is not None
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # Two top entries, unless two distinct token ids decode to the same string.
        assert 1 <= len(top) <= 2
        assert chosen <= max(top.values()) + 1e-4


def test_completion_stop_string(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0, stop=[","]
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert "," not in choice.text
    assert choice.text.strip()  # the next number, before the comma
