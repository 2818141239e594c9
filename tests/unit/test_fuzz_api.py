"""Schema-driven fuzzing: schemathesis generates requests from the server's own OpenAPI
document (valid ones and invalid ones) and sends them to the app in-process, FakeEngine
behind it, running every check it has: no 5xx, every status and content type documented,
every body matching its documented schema, invalid data refused, valid data accepted.

Deterministic (fixed seed, derandomized); bounded (examples per operation, a response-time
limit and a request timeout that are the hang detectors).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from pydantic import SecretStr
from schemathesis import checks
from schemathesis.checks import CHECKS, load_all_checks
from starlette.types import Receive, Scope, Send

from steer.service.app import create_app
from steer.service.openapi import ROUTE_ERRORS
from steer.service.settings import Settings
from tests.asgi import running
from tests.fakes import FakeEngine
from tests.lora_helpers import write_adapter

API_KEY, ADMIN_KEY = "fuzz-key", "fuzz-admin"
# An adapter the LoRA routes can really load (the app checks no shapes: no checkpoint dir).
ADAPTERS = tempfile.TemporaryDirectory(prefix="steer-fuzz-")
ADAPTER = str(write_adapter(Path(ADAPTERS.name) / "tone"))
SETTINGS = Settings(max_n=4, max_tokens_cap=64, max_concurrent_requests=8,
                    max_queued_requests=8, api_key=SecretStr(API_KEY),
                    admin_key=SecretStr(ADMIN_KEY), adapter_root=Path(ADAPTERS.name),
                    # built at import, before the per-test store fixture: a store of its own
                    database_url=f"sqlite+aiosqlite:///{ADAPTERS.name}/fuzz.db")
CONFIG = {
    "seed": 9,
    "generation": {"max-examples": 40, "deterministic": True},
    "request-timeout": 10,
    "checks": {"max_response_time": 5.0},
    # The keys the document declares; `ignored_auth` also sends none and wrong ones.
    "auth": {"openapi": {"apiKey": {"bearer": API_KEY}, "adminKey": {"bearer": ADMIN_KEY}}},
    # Mostly the served model, so requests reach the engine instead of the unknown-model 404;
    # the LoRA routes mostly name the adapter that exists.
    "dictionaries": {"models": {"values": ["fake-model"]},
                     "adapter_names": {"values": ["tone"]},
                     "adapter_paths": {"values": [ADAPTER]}},
    "parameters": {
        "body.model": {"dictionary": "models", "probability": 0.8},
        "body.lora_name": {"dictionary": "adapter_names", "probability": 0.6},
        "body.lora_path": {"dictionary": "adapter_paths", "probability": 0.8},
    },
    # Nothing secret is sent; show every field (`max_tokens` looks like a token to it).
    "output": {"sanitization": {"enabled": False}},
}


def fresh_app() -> FastAPI:
    return create_app(SETTINGS, FakeEngine(max_model_len=4096))


class FreshServer:
    """The app under test, new each time its lifespan starts. Schemathesis ends the app's
    lifespan after every test and starts it again for the next one; a real server never
    restarts a lifespan (its engine and registry are closed for good), so each restart gets
    a new app, as a new server process would be."""

    def __init__(self) -> None:
        self.app = fresh_app()
        self.started = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            if self.started:
                self.app = fresh_app()
            self.started += 1
        else:
            # The engine starts in a task of the lifespan: let it finish (FakeEngine: at once),
            # so the fuzzer meets a ready server, not the 503 of one still loading.
            async with asyncio.timeout(10):
                await self.app.state.engine_state.ready_event.wait()
        await self.app(scope, receive, send)


server = FreshServer()
schema = schemathesis.openapi.from_asgi("/openapi.json", server,
                                        config=schemathesis.Config.from_dict(CONFIG))


def steered(body: Any) -> bool:
    """Does this body ask for a strategy (in any of the accepted forms)?"""
    if not isinstance(body, dict):
        return False
    spec = body.get("steering")
    plain = {"strategy": "none", "options": {}, "critic": None, "budget": None,
             "template": None, "trace": False}
    custom = isinstance(spec, dict) and any(spec.get(k, v) != v for k, v in plain.items())
    return custom or any(body.get(k) is not None for k in ("optillm_approach",
                                                             "reasoning_effort"))


def beyond_the_document(case: schemathesis.Case) -> bool:
    """Is this a schema-valid request the server may still refuse with a 400, for a reason
    no schema can state? A steering spec (the search layer's plugins check rules across
    options, the planned-call cap, a budget too small for any answer), `min_tokens` above
    the token limit, an adapter path that is not an adapter directory on this machine, an
    uploaded file whose lines are not training lines, a structured-output constraint (a
    JSON Schema, regex or grammar is checked as what it is, beyond "an object" or "a
    string"), or tools and tool turns (`tool_bound`)."""
    if case.path == "/v1/files" and case.method.upper() == "POST":
        return True  # every line of the file is checked against a training format
    if case.path == "/v1/load_lora_adapter":
        return not isinstance(case.body, dict) or case.body.get("lora_path") != ADAPTER
    if case.path == "/v1/steering/datasets":
        return True  # valid filters may match no stored completion: a 400 that says so
    generation = case.path in ("/v1/chat/completions", "/v1/completions")
    return generation and isinstance(case.body, dict) and (
        case.body.get("min_tokens") is not None or constrained(case.body)
        or steered(case.body) or tool_bound(case.body))


def tool_bound(body: dict[str, Any]) -> bool:
    """Tools or tool turns: rules across values (a tool message answers an earlier call's
    id, tool names are unique, a named tool_choice is among the tools, a function's
    parameters are a JSON Schema) that the document can't state."""
    messages = body.get("messages")
    return body.get("tools") is not None or (isinstance(messages, list) and any(
        isinstance(m, dict) and m.get("role") == "tool" for m in messages))


def constrained(body: dict[str, Any]) -> bool:
    fmt = body.get("response_format")
    return body.get("structured_outputs") is not None or (
        isinstance(fmt, dict) and fmt.get("type") == "json_schema")


@schema.parametrize()
def test_api_conforms_to_its_document(case: schemathesis.Case) -> None:
    # Only "valid data is accepted" is left out, and only for those requests; every other
    # check holds for them too.
    excluded = [checks.positive_data_acceptance] if beyond_the_document(case) else []
    case.call_and_validate(excluded_checks=excluded)


def test_every_route_lists_its_errors_and_no_422() -> None:
    doc: dict[str, Any] = fresh_app().openapi()
    operations = {(m, p): op for p, ops in doc["paths"].items() for m, op in ops.items()}
    assert set(operations) == set(ROUTE_ERRORS)
    for key, op in operations.items():
        statuses = set(op["responses"])
        assert "422" not in statuses, key
        assert {str(s) for s in ROUTE_ERRORS[key]} <= statuses, key
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_every_check_is_on() -> None:
    """`call_and_validate` runs every check the config enables: all of schemathesis's."""
    load_all_checks()
    config = schema.config.checks_config_for()
    names = {check.__name__ for check in CHECKS.get_all()}
    assert {"not_a_server_error", "status_code_conformance", "content_type_conformance",
            "response_schema_conformance", "negative_data_rejection",
            "positive_data_acceptance", "ignored_auth", "unsupported_method"} <= names
    assert all(config.get_by_name(name=name).enabled for name in names)


def test_request_schemas_are_closed() -> None:
    """`extra="forbid"` shows: an unknown field is invalid in the document as on the server."""
    schemas = fresh_app().openapi()["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ChatMessage", "TextPart",
                 "StreamOptions", "SteeringSpec", "LoadLoraAdapterRequest",
                 "UnloadLoraAdapterRequest"):
        assert schemas[name]["additionalProperties"] is False, name


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["n", "max_tokens"])
@pytest.mark.parametrize(("value", "status"), [(2.0, 200), (2, 200), ("2", 400), (2.5, 400),
                                                (True, 400)])
async def test_an_integer_field_takes_json_integers_only(
    field: str, value: Any, status: int
) -> None:
    """JSON has one number type: the document's `integer` (JSON Schema's) includes 2.0, so
    the server takes it as 2; a string, a fraction or a boolean is still refused."""
    async with running(fresh_app()) as client:
        r = await client.post("/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"model": "fake-model", "prompt": "x", field: value})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == field
