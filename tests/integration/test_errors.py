"""Refusals from the real server: status code and the OpenAI error body with the right `param`.

Raw httpx where the SDK would get in the way (malformed JSON, wrong types); the SDK where a
client would see it (exception classes, `extra_body`). The last test checks the server is
still fine after all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.integration.support import CHAT, COMPLETIONS, MODEL, error_of

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Hello!"}]
# Each " hello" is one token: far past the 8192-token context on its own.
TOO_LONG = [{"role": "user", "content": "hello " * 9000}]
# About 5000 prompt tokens: fits, but not with 4000 more for the answer (4000 < the 4096 cap).
HALF_CONTEXT = [{"role": "user", "content": "hello " * 5000}]


@dataclass(frozen=True)
class Case:
    body: dict[str, Any]
    status: int
    param: str | None
    code: str | None = None
    route: str = CHAT
    in_message: str | None = None


CASES: dict[str, Case] = {
    "wrong type": Case({"max_tokens": "5"}, 400, "max_tokens"),
    "unknown field": Case({"frobnicate": 1}, 400, "frobnicate", in_message="frobnicate"),
    "unknown model": Case({"model": "no-such-model"}, 404, "model", code="model_not_found"),
    "missing messages": Case({"messages": None}, 400, "messages"),
    "empty messages": Case({"messages": []}, 400, "messages"),
    "bad role": Case({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    "prompt longer than the context": Case(
        {"messages": TOO_LONG}, 400, "messages", code="context_length_exceeded"
    ),
    "prompt longer than the context, streamed": Case(
        {"messages": TOO_LONG, "stream": True}, 400, "messages",
        code="context_length_exceeded",
    ),
    "max_tokens past the remaining context": Case(
        {"messages": HALF_CONTEXT, "max_tokens": 4000}, 400, "max_tokens",
        code="context_length_exceeded",
    ),
    "max_completion_tokens past the remaining context": Case(
        {"messages": HALF_CONTEXT, "max_completion_tokens": 4000}, 400,
        "max_completion_tokens", code="context_length_exceeded",
    ),
    "max_tokens above the cap": Case({"max_tokens": 5000}, 400, "max_tokens", in_message="4096"),
    "negative max_tokens": Case({"max_tokens": -1}, 400, "max_tokens"),
    "temperature too high": Case({"temperature": 5}, 400, "temperature"),
    "n zero": Case({"n": 0}, 400, "n"),
    "n above the cap": Case({"n": 17}, 400, "n", in_message="16"),
    "top_logprobs without logprobs": Case({"top_logprobs": 2}, 400, "top_logprobs"),
    "stream_options without stream": Case(
        {"stream_options": {"include_usage": True}}, 400, "stream_options"
    ),
    "unknown strategy": Case(
        {"steering": {"strategy": "no_such_strategy"}}, 400, "steering.strategy",
        in_message="none",
    ),
    "completions: prompt longer than the context": Case(
        {"prompt": "hello " * 9000}, 400, "prompt", code="context_length_exceeded",
        route=COMPLETIONS,
    ),
    "completions: several prompts streamed": Case(
        {"prompt": ["a", "b"], "stream": True}, 400, "prompt", route=COMPLETIONS,
    ),
}


def _body(case: Case) -> dict[str, Any]:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 4}
    base.update({"messages": HELLO} if case.route == CHAT else {"prompt": "Hello"})
    base.update(case.body)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_refused_with_openai_error(http: httpx.Client, case: Case) -> None:
    r = http.post(case.route, json=_body(case))
    assert r.status_code == case.status, r.text
    error = error_of(r)
    assert error["param"] == case.param, error
    assert error["code"] == case.code, error
    if case.status == 400:
        assert error["type"] == "invalid_request_error", error
    if case.in_message is not None:
        assert case.in_message in str(error["message"]), error


def test_malformed_json(http: httpx.Client) -> None:
    r = http.post(CHAT, content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"


def test_sdk_sees_typed_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    assert not_found.value.status_code == 404
    assert not_found.value.code == "model_not_found"
    assert not_found.value.param == "model"

    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
            extra_body={"steering": {"strategy": "no_such_strategy"}},
        )
    assert bad.value.param == "steering.strategy"
    assert "none" in bad.value.message


def test_plain_steering_is_a_normal_completion(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        extra_body={"steering": {"strategy": "none"}},
    )
    assert resp.choices[0].finish_reason in {"stop", "length"}
    assert resp.usage is not None and 1 <= resp.usage.completion_tokens <= 4


def test_server_still_serves_after_refusals(http: httpx.Client, oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=4
    )
    assert resp.choices[0].message.content
    assert http.get("/health").status_code == 200
