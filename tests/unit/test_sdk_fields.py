"""The OpenAI fields common SDKs send (steer.service.fields): each one implemented, accepted
where OpenAI documents no effect for this kind of model, or refused with a 400 naming it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from steer.engine import Message
from steer.engine.vllm_engine import _message_dict
from steer.service.protocol import ChatCompletionRequest
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": USER, **fields}


async def refused(client: httpx.AsyncClient, body: dict[str, Any], param: str,
                  path: str = CHAT) -> str:
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    return str(error["message"])


# -- logit_bias -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_logit_bias_reaches_the_engine_as_token_pairs(
    client: httpx.AsyncClient, fake_engine: FakeEngine, path: str
) -> None:
    body = chat() if path == CHAT else {"model": "fake-model", "prompt": "hi"}
    r = await client.post(path, json={**body, "logit_bias": {"50256": -100, "7": 2.5, "12": 100}})
    assert r.status_code == 200, r.text
    assert fake_engine.history[-1].params.logit_bias == ((7, 2.5), (12, 100.0), (50256, -100.0))


async def test_no_logit_bias_is_an_empty_bias(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    assert (await client.post(CHAT, json=chat(logit_bias={}))).status_code == 200
    assert (await client.post(CHAT, json=chat())).status_code == 200
    assert [c.params.logit_bias for c in fake_engine.history] == [(), ()]


@pytest.mark.parametrize("bias", [
    {"7": 100.5}, {"7": -101}, {"seven": 1}, {"-1": 1}, {"7": "1"}, {"7": True},
    {str(i): 1 for i in range(301)},
])
async def test_a_bad_logit_bias_names_logit_bias(
    client: httpx.AsyncClient, bias: dict[str, Any]
) -> None:
    await refused(client, chat(logit_bias=bias), "logit_bias")


async def test_a_steered_request_samples_every_candidate_with_the_bias(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("a", "b")
    r = await client.post(CHAT, json=chat(logit_bias={"3": -5},
                                          steering={"strategy": "best_of_n",
                                                    "options": {"n": 2}}))
    assert r.status_code == 200, r.text
    assert {c.params.logit_bias for c in fake_engine.history} == {((3, -5.0),)}


# -- service_tier -----------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["auto", "default"])
async def test_service_tier_is_answered_with_the_tier_used(
    client: httpx.AsyncClient, tier: str
) -> None:
    r = await client.post(CHAT, json=chat(service_tier=tier))
    assert r.status_code == 200, r.text
    assert r.json()["service_tier"] == "default"


async def test_no_service_tier_asked_none_answered(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json=chat())
    assert "service_tier" not in r.json()


async def test_every_streamed_chunk_names_the_tier(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("two words")
    r = await client.post(CHAT, json=chat(service_tier="auto", stream=True,
                                          stream_options={"include_usage": True}))
    chunks = [line for line in r.text.splitlines() if line.startswith("data: {")]
    assert len(chunks) >= 3
    assert all('"service_tier":"default"' in line for line in chunks)


async def test_a_steered_answer_names_the_tier(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("a", "b")
    r = await client.post(CHAT, json=chat(service_tier="default", steering={
        "strategy": "best_of_n", "options": {"n": 2}}))
    assert r.status_code == 200, r.text
    assert r.json()["service_tier"] == "default"


@pytest.mark.parametrize("tier", ["flex", "scale", "priority", "fast"])
async def test_a_tier_this_server_does_not_run_is_refused(
    client: httpx.AsyncClient, tier: str
) -> None:
    message = await refused(client, chat(service_tier=tier), "service_tier")
    assert "one processing tier" in message


# -- accepted fields --------------------------------------------------------------------------


async def test_the_fields_sdks_send_are_accepted(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.enqueue("ok")
    r = await client.post(CHAT, json=chat(
        metadata={"run": "7"}, store=True, user="u-1", safety_identifier="h" * 128,
        prompt_cache_key="conversation-9", prompt_cache_retention="in_memory",
        modalities=["text"], verbosity="medium", reasoning_effort=None,
    ))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize(("fields", "param"), [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"modalities": []}, "modalities"),
    ({"safety_identifier": "h" * 129}, "safety_identifier"),
    ({"verbosity": "low"}, "verbosity"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
])
async def test_values_that_promise_what_the_server_does_not_do(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    await refused(client, chat(**fields), param)


def test_safety_identifier_tells_end_users_apart_before_user() -> None:
    """Admission's per-user key: OpenAI's `safety_identifier` replaces `user` for that."""
    req = ChatCompletionRequest.model_validate(chat(user="u", safety_identifier="s"))
    assert req.end_user() == "s"
    assert ChatCompletionRequest.model_validate(chat(user="u")).end_user() == "u"
    assert ChatCompletionRequest.model_validate(chat()).end_user() is None


async def test_admission_counts_a_request_against_its_safety_identifier(
    client: httpx.AsyncClient
) -> None:
    admission = client.app.state.admission  # type: ignore[attr-defined]
    keys: list[str | None] = []
    acquire = admission.acquire

    async def recording(work: int = 1, key: str | None = None) -> Any:
        keys.append(key)
        return await acquire(work, key)

    admission.acquire = recording
    await client.post(CHAT, json=chat(user="u", safety_identifier="hash-1"))
    await client.post(CHAT, json=chat(user="u"))
    assert keys == ["user:hash-1", "user:u"]


# -- refused fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "why"), [
    ("audio", {"format": "wav", "voice": "alloy"}, "text only"),
    ("moderation", {"model": "omni-moderation-latest"}, "moderation"),
    ("prediction", {"type": "content", "content": "x"}, "predicted outputs"),
    ("web_search_options", {}, "web search"),
    ("prompt_cache_options", {"mode": "explicit"}, "prefix cache"),
])
async def test_fields_for_what_the_server_has_not_are_refused_with_the_reason(
    client: httpx.AsyncClient, field: str, value: Any, why: str
) -> None:
    message = await refused(client, chat(**{field: value}), field)
    assert why in message


async def test_an_unknown_field_is_still_plainly_unrecognized(client: httpx.AsyncClient) -> None:
    message = await refused(client, chat(colour="blue"), "colour")
    assert message == "Unrecognized request argument supplied: colour"


@pytest.mark.parametrize(("fields", "param"), [
    ({"best_of": 2}, "best_of"), ({"suffix": "}"}, "suffix"),
])
async def test_legacy_completion_fields_without_an_implementation(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    await refused(client, {"model": "fake-model", "prompt": "x", **fields}, param, COMPLETIONS)


async def test_legacy_completion_fields_at_their_no_effect_values(
    client: httpx.AsyncClient
) -> None:
    r = await client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "x", "best_of": 1,
                                             "suffix": ""})
    assert r.status_code == 200, r.text


# -- message content --------------------------------------------------------------------------


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
])
async def test_non_text_parts_are_refused_by_position(
    client: httpx.AsyncClient, part: dict[str, Any]
) -> None:
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    message = await refused(client, {"model": "fake-model", "messages": messages},
                            "messages.1.content.1")
    assert "text only" in message and part["type"] in message


async def test_an_unknown_part_type_names_the_part(client: httpx.AsyncClient) -> None:
    message = await refused(client, chat(messages=[{"role": "user", "content": [
        {"type": "video", "video": "x"}]}]), "messages.0.content.0")
    assert "'text'" in message


async def test_a_cache_breakpoint_on_a_part_is_refused_with_the_reason(
    client: httpx.AsyncClient
) -> None:
    message = await refused(client, chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "x", "prompt_cache_breakpoint": {"mode": "explicit"}}]}]),
        "messages.0.content.0.prompt_cache_breakpoint")
    assert "prefix cache" in message


async def test_an_assistant_refusal_is_what_the_assistant_said(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    r = await client.post(CHAT, json=chat(messages=[
        {"role": "user", "content": "a", "name": "ann"},
        {"role": "assistant", "content": [{"type": "text", "text": "well"},
                                          {"type": "refusal", "refusal": "I can't"}]},
        {"role": "assistant", "content": None, "refusal": "No."},
        {"role": "user", "content": "b"},
    ]))
    assert r.status_code == 200, r.text
    assert fake_engine.history[-1].prompts[0] == [
        Message("user", "a", name="ann"), Message("assistant", "well\nI can't"),
        Message("assistant", "No."), Message("user", "b")]


def test_a_name_reaches_the_chat_template_as_vllm_passes_it() -> None:
    """Templates that know participants' names render them (SmolLM2's ChatML ignores them)."""
    assert _message_dict(Message("user", "a", name="ann")) == {
        "role": "user", "content": "a", "name": "ann"}
    assert "name" not in _message_dict(Message("user", "a"))


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]},
     "messages.0.content.0"),
    ({"role": "system", "content": "s", "refusal": "no"}, "messages.0.refusal"),
])
async def test_a_refusal_belongs_to_assistant_messages(
    client: httpx.AsyncClient, message: dict[str, Any], param: str
) -> None:
    await refused(client, chat(messages=[message]), param)


async def test_stream_obfuscation_is_refused_when_asked_for(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    message = await refused(client, chat(stream=True, stream_options={
        "include_obfuscation": True}), "stream_options.include_obfuscation")
    assert "not padded" in message
    fake_engine.enqueue("ok")
    r = await client.post(CHAT, json=chat(stream=True, stream_options={
        "include_obfuscation": False, "include_usage": True}))
    assert r.status_code == 200 and "obfuscation" not in r.text


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2]]])
async def test_token_id_prompts_are_refused_with_the_reason(
    client: httpx.AsyncClient, prompt: Any
) -> None:
    message = await refused(client, {"model": "fake-model", "prompt": prompt}, "prompt.0",
                            COMPLETIONS)
    assert "token-id prompts are not supported" in message
