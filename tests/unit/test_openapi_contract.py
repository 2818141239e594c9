"""The OpenAPI document is the server's real contract: no FastAPI 422 anywhere (errors.py
answers validation errors with 400), every route's error statuses listed with OpenAI's error
schema, closed request objects, and, field by field for the fields SDKs send, a request the
document calls valid is served while one it calls invalid is a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from steer.service.app import create_app
from steer.service.openapi import ROUTE_ERRORS
from steer.service.settings import Settings
from tests.asgi import running
from tests.fakes import FakeEngine

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# Responses that are not OpenAI errors on purpose: /health's 503 is its own status body.
NOT_ERRORS = {("get", "/health", "503")}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return create_app(Settings(), FakeEngine()).openapi()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def test_no_422_anywhere(doc: dict[str, Any]) -> None:
    for method, path, op in operations(doc):
        assert "422" not in op["responses"], (method, path)
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text and '"ValidationError"' not in text


def test_every_route_is_in_the_error_table(doc: dict[str, Any]) -> None:
    assert {(m, p) for m, p, _ in operations(doc)} == set(ROUTE_ERRORS)


def test_every_error_status_is_listed_with_openais_error_schema(doc: dict[str, Any]) -> None:
    for method, path, op in operations(doc):
        responses = op["responses"]
        for status in ROUTE_ERRORS[(method, path)]:
            assert str(status) in responses, (method, path, status)
        for status, response in responses.items():
            if status.startswith("2") or (method, path, status) in NOT_ERRORS:
                continue
            assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (
                method, path, status)
            assert response["description"], (method, path, status)


def _request_schemas(doc: dict[str, Any]) -> set[str]:
    """Every component a request body reaches, through $refs."""
    schemas = doc["components"]["schemas"]
    todo = [op["requestBody"] for _, _, op in operations(doc) if "requestBody" in op]
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in seen:
                    seen.add(name)
                    todo.append(schemas[name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return seen


def test_request_objects_are_closed(doc: dict[str, Any]) -> None:
    """An object with named fields refuses others in the document, as `extra="forbid"` does
    on the server (multipart upload forms are FastAPI's own, and the server reads only its
    fields)."""
    schemas = doc["components"]["schemas"]
    names = _request_schemas(doc) - {n for n in schemas if n.startswith("Body_")}
    assert {"ChatCompletionRequest", "CompletionRequest", "ChatMessage", "TextPart",
            "RefusalPart"} <= names
    for name in names:
        if "properties" in schemas[name]:
            assert schemas[name].get("additionalProperties") is False, name


# -- the document and the server agree, value by value ----------------------------------------

USER = [{"role": "user", "content": "hi"}]
CHAT_CASES: list[dict[str, Any]] = [
    {"logit_bias": {"5": -100, "6": 100, "7": 0.5}}, {"logit_bias": {}},
    {"logit_bias": {"x": 1}}, {"logit_bias": {"5": 101}}, {"logit_bias": {"5": "1"}},
    {"logit_bias": {str(i): 1 for i in range(300)}},
    {"logit_bias": {str(i): 1 for i in range(301)}},
    {"service_tier": "auto"}, {"service_tier": "default"}, {"service_tier": "flex"},
    {"service_tier": "priority"}, {"service_tier": None},
    {"modalities": ["text"]}, {"modalities": ["audio"]}, {"modalities": []},
    {"modalities": ["text", "audio"]},
    {"verbosity": "medium"}, {"verbosity": "high"},
    {"prompt_cache_retention": "in_memory"}, {"prompt_cache_retention": "24h"},
    {"prompt_cache_key": "k"}, {"safety_identifier": "s" * 128},
    {"safety_identifier": "s" * 129}, {"user": "u"}, {"metadata": {"a": "b"}}, {"store": True},
    {"audio": {"format": "wav", "voice": "alloy"}}, {"prediction": {"type": "content",
                                                                    "content": "x"}},
    {"moderation": {"model": "m"}}, {"web_search_options": {}},
    {"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                  *USER]},
    {"messages": [{"role": "assistant", "content": None, "refusal": "no"}, *USER]},
    {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
    {"messages": [{"role": "system", "content": "s", "refusal": "no"}, *USER]},
    {"messages": [{"role": "user", "name": "ann", "content": [{"type": "text", "text": "x"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "system", "content": "s", "tool_call_id": "c"}, *USER]},
    {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
    {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
    {"messages": [*USER, {"role": "tool", "content": "42"}]},
    {"tool_choice": "auto"}, {"tool_choice": None},
]
COMPLETION_CASES: list[dict[str, Any]] = [
    {"logit_bias": {"5": -1}}, {"logit_bias": {"-5": 1}}, {"best_of": 1}, {"best_of": 2},
    {"suffix": ""}, {"suffix": "x"}, {"suffix": None},
]


def _valid(doc: dict[str, Any], schema: str, body: dict[str, Any]) -> bool:
    root = {"$ref": f"#/components/schemas/{schema}", "components": doc["components"]}
    return Draft202012Validator(root).is_valid(body)


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "schema", "base", "fields"), [
    *[(CHAT, "ChatCompletionRequest", {"messages": USER}, f) for f in CHAT_CASES],
    *[(COMPLETIONS, "CompletionRequest", {"prompt": "hi"}, f) for f in COMPLETION_CASES],
], ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else str(v))
async def test_the_document_says_what_the_server_does(
    doc: dict[str, Any], path: str, schema: str, base: dict[str, Any], fields: dict[str, Any]
) -> None:
    body = {"model": "fake-model", **base, **fields}
    valid = _valid(doc, schema, body)
    async with running(create_app(Settings(), FakeEngine())) as client:
        r: httpx.Response = await client.post(path, json=body)
    assert r.status_code == (200 if valid else 400), (valid, r.text)
    if not valid:
        assert r.json()["error"]["param"].split(".")[0] == next(iter(fields)), r.text
