"""The OpenAPI document: what the server really answers, route by route.

FastAPI's generated document promises a 422 the server never sends (its validation handler
answers 400 in OpenAI's shape) and knows none of the errors routes raise themselves. This
module builds the document once per app and corrects it: no 422 anywhere; every status a
route can answer (`ROUTE_ERRORS`), each with `ErrorResponse`, OpenAI's error shape; the bodies
of successful answers (JSON, or SSE when `stream` is true); and the server's own caps on the
request fields that have them (`n`, `max_tokens`, messages, prompts), so a client (or a fuzzer)
reading the document knows which values this server accepts.

Not here: the wire models themselves (`protocol.py`) and the error table (`errors.py`).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from steer.engine.lora_files import NAME_PATTERN
from steer.search.aliases import OPTILLM_SLUGS
from steer.search.base import STRATEGIES
from steer.service.protocol import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ErrorResponse,
)
from steer.service.settings import Settings

JSON, SSE, TEXT = "application/json", "text/event-stream", "text/plain"
POST_ERRORS = (400, 413, 500)  # every POST: a bad body, an oversized body, our own bug
GENERATION_ERRORS = (*POST_ERRORS, 401, 404, 429, 503, 504)
ADMIN_ERRORS = (*POST_ERRORS, 401, 403, 404, 409, 503)
# (method, path) -> the statuses besides 200 it can answer with `ErrorResponse`.
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/chat/completions"): GENERATION_ERRORS,
    ("post", "/v1/completions"): GENERATION_ERRORS,
    ("post", "/v1/load_lora_adapter"): ADMIN_ERRORS,
    ("post", "/v1/unload_lora_adapter"): ADMIN_ERRORS,
    ("get", "/v1/models"): (401, 500),
    ("delete", "/v1/models/{model}"): (401, 403, 404, 409, 500),
    ("get", "/v1/steering/templates"): (401, 500),
    ("get", "/v1/steering/traces/{trace_id}"): (400, 401, 404, 500),
    ("get", "/v1/chat/completions"): (400, 401, 404, 500),
    ("get", "/v1/chat/completions/{completion_id}"): (401, 404, 500),
    ("get", "/v1/chat/completions/{completion_id}/messages"): (400, 401, 404, 500),
    ("post", "/v1/chat/completions/{completion_id}"): (*POST_ERRORS, 401, 404),
    ("delete", "/v1/chat/completions/{completion_id}"): (401, 404, 500),
    ("post", "/v1/steering/datasets"): (*POST_ERRORS, 401),
    ("post", "/v1/fine_tuning/jobs"): (*POST_ERRORS, 401, 404),
    ("get", "/v1/fine_tuning/jobs"): (400, 401, 404, 500),
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): (401, 404, 500),
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"): (400, 401, 404, 500),
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"): (*POST_ERRORS, 401, 404, 409),
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"): (400, 401, 404, 500),
    ("post", "/v1/files"): (*POST_ERRORS, 401),
    ("get", "/v1/files"): (400, 401, 404, 500),
    ("get", "/v1/files/{file_id}"): (401, 404, 500),
    ("get", "/v1/files/{file_id}/content"): (401, 404, 500),
    ("delete", "/v1/files/{file_id}"): (401, 404, 409, 500),
    ("get", "/health"): (500,),
    ("get", "/metrics"): (500,),
}
DESCRIPTIONS = {
    400: "The request is invalid; `error.param` names the field.",
    401: "A missing or wrong API key (or admin key).",
    403: "The runtime adapter API is off (no admin key is configured), or the model can't "
         "be deleted (the base model, or an adapter Steer did not train).",
    404: "An unknown model, adapter, trace, file or fine-tuning job.",
    409: "The adapter name is taken (or the adapter is in use), the job has finished, an "
         "unfinished job uses the file, or the job training the model has not finished.",
    413: "The request body (or the uploaded file) is larger than the server accepts.",
    429: "The server is at capacity (or this key's share of it): retry later.",
    500: "A server bug; the message carries a request id.",
    503: "The model is loading, the engine is gone, the server is draining, or a server "
         "limit was reached.",
    504: "The server's own time limit for a steered request ran out.",
}
HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["ok", "loading", "failed", "unhealthy", "draining"]},
        "model": {"type": "string"},
        "detail": {"type": ["string", "null"]},
    },
}
TRACE = {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, built on first use and cached on the app."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        app.openapi_schema = corrected(doc, app.state.settings)
    return app.openapi_schema


def corrected(generated: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """`generated` (FastAPI's document) made true to what the server answers."""
    doc = copy.deepcopy(generated)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(_model_schemas(ErrorResponse, ChatCompletion, ChatCompletionChunk,
                                  Completion))
    for path, operations in doc.get("paths", {}).items():
        for method, operation in operations.items():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in ROUTE_ERRORS.get((method, path), (500,)):
                responses[str(status)] = _error_response(status)
    _success_bodies(doc["paths"])
    _whole_bounds(schemas)
    _request_caps(schemas, settings)
    _request_rules(schemas)
    _field_rules(schemas)
    _security(doc, settings)
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            operation["responses"] = dict(sorted(operation["responses"].items()))
    return doc


def _model_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    _, defs = models_json_schema([(m, "validation") for m in models],
                                 ref_template="#/components/schemas/{model}")
    return dict(defs.get("$defs", {}))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(status: int) -> dict[str, Any]:
    return {"description": DESCRIPTIONS[status],
            "content": {JSON: {"schema": _ref("ErrorResponse")}}}


def _ok(description: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": content}


def _events(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream (OpenAPI 3.1: the schema describes each event):
    a chunk, an error in OpenAI's shape (a failure after the headers), or the final [DONE]."""
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": JSON,
                 "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}},
    }}}}


def _success_bodies(paths: dict[str, Any]) -> None:
    described = "The completion; with `stream: true`, server-sent events of chunks, then [DONE]."
    paths["/v1/chat/completions"]["post"]["responses"]["200"] = _ok(described, {
        JSON: {"schema": _ref("ChatCompletion")}, SSE: _events("ChatCompletionChunk")})
    paths["/v1/completions"]["post"]["responses"]["200"] = _ok(described, {
        JSON: {"schema": _ref("Completion")}, SSE: _events("Completion")})
    trace = paths["/v1/steering/traces/{trace_id}"]["get"]
    trace["responses"]["200"] = _ok("The stored trace, as JSON or Graphviz DOT.", {
        JSON: {"schema": TRACE}, "text/vnd.graphviz": {"schema": {"type": "string"}}})
    for parameter in trace.get("parameters", []):
        if parameter["name"] == "format":
            parameter["schema"] = {"enum": ["json", "dot"], "default": "json"}
    health = paths["/health"]["get"]["responses"]
    health["200"] = _ok("The engine is ready.", {JSON: {"schema": HEALTH}})
    health["503"] = _ok("Loading, failed, unhealthy or draining.", {JSON: {"schema": HEALTH}})
    paths["/metrics"]["get"]["responses"]["200"] = _ok(
        "Prometheus text exposition format.", {TEXT: {"schema": {"type": "string"}}})


def _whole_bounds(node: Any) -> None:
    """Integer bounds as integers: pydantic writes `ge=1` as `minimum: 1.0`."""
    if isinstance(node, list):
        for item in node:
            _whole_bounds(item)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                value = node.get(key)
                if isinstance(value, float) and value.is_integer():
                    node[key] = int(value)
        for value in node.values():
            _whole_bounds(value)


def _request_caps(schemas: dict[str, Any], settings: Settings) -> None:
    """The caps this server's settings put on request fields, and the seed's exact int64
    bounds (pydantic writes 2**63 - 1 as a float, which rounds up past the bound)."""
    chat, completion = schemas["ChatCompletionRequest"], schemas["CompletionRequest"]
    for request in (chat, completion):
        props = request["properties"]
        props["n"]["maximum"] = settings.max_n
        props["seed"]["anyOf"][0].update(minimum=INT64_MIN, maximum=INT64_MAX)
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field]["anyOf"][0]["maximum"] = settings.max_tokens_cap
    chat["properties"]["messages"]["maxItems"] = settings.max_messages
    prompt_list = next(s for s in completion["properties"]["prompt"]["anyOf"]
                       if s.get("type") == "array")
    prompt_list["maxItems"] = settings.max_prompts
    schemas["SteeringSpec"]["properties"]["strategy"]["enum"] = sorted(STRATEGIES)
    schemas["LoadLoraAdapterRequest"]["properties"]["lora_name"]["pattern"] = NAME_PATTERN.pattern
    chat["properties"]["optillm_approach"]["anyOf"][0]["enum"] = sorted(OPTILLM_SLUGS)


def _present(field: str) -> dict[str, Any]:
    """"`field` is given and not null", as a JSON Schema condition."""
    return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}


def _request_rules(schemas: dict[str, Any]) -> None:
    """The cross-field rules `Serving` enforces (each refusal a 400 naming the field)."""
    stream_only = {"if": _present("stream_options"),
                   "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
    schemas["ChatCompletionRequest"]["allOf"] = [
        stream_only,
        {"if": _present("top_logprobs"),
         "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
    ]
    schemas["CompletionRequest"]["allOf"] = [
        stream_only,
        {"if": {"required": ["echo"], "properties": {"echo": {"const": True}}},
         "then": {"properties": {"logprobs": {"type": "null"}}}},
        {"if": {"required": ["stream"], "properties": {"stream": {"const": True}}},
         "then": {"properties": {"prompt": {"anyOf": [{"type": "string"},
                                                      {"type": "array", "maxItems": 1}]}}}},
    ]


def _field_rules(schemas: dict[str, Any]) -> None:
    """What pydantic's schema of the SDK fields (`fields.py`) leaves open: `logit_bias` keys
    are token ids only (pydantic writes `patternProperties`, which lets any other key
    through), and a refusal, as a field or a content part, is an assistant message's only."""
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        bias = next(s for s in schemas[name]["properties"]["logit_bias"]["anyOf"]
                    if s.get("type") == "object")
        (pattern, value), = bias.pop("patternProperties").items()
        bias.update(propertyNames={"pattern": pattern}, additionalProperties=value)
    text_parts = {"type": "array", "items": _ref("TextPart")}
    schemas["ChatMessage"].setdefault("allOf", []).append({
        "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
        "then": {"properties": {
            "refusal": {"type": "null"},
            "content": {"anyOf": [{"type": "string"}, text_parts, {"type": "null"}]}}},
    })
    _tool_rules(schemas)


def _tool_rules(schemas: dict[str, Any]) -> None:
    """The per-message and per-request rules of tool calling (`tools.check_history`,
    `tools.plan_tools`) that a schema can state: calls on assistant messages only, a
    `tool_call_id` on tool messages only and always there, `tool_choice` only with `tools`.
    (That a tool message answers an earlier call, and that a named choice is among the
    tools, are rules across values no schema states.)"""
    def role_is(role: str) -> dict[str, Any]:
        return {"properties": {"role": {"const": role}}}

    def role_is_not(role: str) -> dict[str, Any]:
        return {"properties": {"role": {"not": {"const": role}}}}

    schemas["ChatMessage"]["allOf"].extend([
        {"if": role_is_not("assistant"), "then": {"properties": {"tool_calls": {
            "anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}}},
        {"if": role_is_not("tool"), "then": {"properties": {"tool_call_id": {"type": "null"}}}},
        {"if": role_is("tool"), "then": _present("tool_call_id")},
    ])
    schemas["ChatCompletionRequest"].setdefault("allOf", []).append(
        {"if": _present("tool_choice"), "then": _present("tools")})


def _security(doc: dict[str, Any], settings: Settings) -> None:
    """Declare the bearer keys this server requires (none configured: none declared)."""
    schemes = {}
    if settings.api_key is not None:
        schemes["apiKey"] = {"type": "http", "scheme": "bearer"}
    if settings.admin_key is not None:
        schemes["adminKey"] = {"type": "http", "scheme": "bearer"}
    if not schemes:
        return
    doc["components"]["securitySchemes"] = schemes
    for (method, path), errors in ROUTE_ERRORS.items():
        operation = doc["paths"].get(path, {}).get(method)
        if operation is None or 401 not in errors:
            continue
        scheme = "adminKey" if 403 in errors else "apiKey"
        if scheme in schemes:
            operation["security"] = [{scheme: []}]
