"""The OpenAI fields common SDKs send, on the real engine through the official `openai`
client: `logit_bias` changes what greedy decoding picks, `service_tier` is answered, a
text-only model refuses an image part by its position, the other fields SDKs send pass.

Run it under the shared lock (see /work/notes/common.md).
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.support import MODEL

pytestmark = pytest.mark.integration

ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Name a colour."}]


def first_token(oai: openai.OpenAI, **fields: Any) -> str:
    resp = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, temperature=0,
                                       **fields)
    text = resp.choices[0].message.content
    assert text
    return str(text)


def token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def test_a_ban_on_the_greedy_first_token_changes_it(oai: openai.OpenAI, tokenizer: Any) -> None:
    greedy = first_token(oai)
    banned = token_id(tokenizer, greedy)
    assert first_token(oai, logit_bias={str(banned): -100}) != greedy
    assert first_token(oai, logit_bias={str(banned): 0}) == greedy  # no bias, no change


def unlikely_word(oai: openai.OpenAI, tokenizer: Any) -> tuple[str, int]:
    """A one-token word the model would not say first unbiased."""
    greedy = first_token(oai)
    for word in ("Zebra", "Table", "House", "Water", "Apple", "Yes"):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) == 1 and word != greedy:
            return word, int(ids[0])
    raise AssertionError("no one-token word to bias towards")


def test_a_large_positive_bias_picks_the_token(oai: openai.OpenAI, tokenizer: Any) -> None:
    word, wanted = unlikely_word(oai, tokenizer)
    assert first_token(oai, logit_bias={str(wanted): 100}) == word


def test_the_bias_holds_in_a_stream(oai: openai.OpenAI, tokenizer: Any) -> None:
    word, wanted = unlikely_word(oai, tokenizer)
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1,
                                         temperature=0, stream=True,
                                         logit_bias={str(wanted): 100})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == word


def test_a_token_outside_the_vocabulary_is_refused(oai: openai.OpenAI, tokenizer: Any) -> None:
    outside = len(tokenizer) + 1000
    with pytest.raises(openai.BadRequestError) as err:
        first_token(oai, logit_bias={str(outside): 5})
    body: Any = err.value.body
    assert body["param"] == "logit_bias"
    assert str(outside) in body["message"]


def test_service_tier_is_answered(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                       service_tier="auto")
    assert resp.service_tier == "default"
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                         service_tier="default", stream=True)
    assert {chunk.service_tier for chunk in stream} == {"default"}
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                    service_tier="priority")
    body: Any = err.value.body
    assert body["param"] == "service_tier"


def test_an_image_part_is_refused_by_position(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, max_tokens=2, messages=[{
            "role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
            ]}])
    body: Any = err.value.body
    assert body["param"] == "messages.0.content.1"
    assert "text only" in body["message"]


def test_the_fields_sdks_send_together(oai: openai.OpenAI) -> None:
    # `store: true` is test_stored's (a server with a database of its own); this server's
    # store is the user's.
    resp = oai.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=4, metadata={"suite": "sdk-fields"},
        user="u-1", safety_identifier="hashed-user", prompt_cache_key="colours",
        modalities=["text"], verbosity="medium", prompt_cache_retention="in_memory",
    )
    assert resp.choices[0].message.content
