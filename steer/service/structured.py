"""Structured outputs at the edge: a request's `response_format` (OpenAI's) or
`structured_outputs` (vLLM's) becomes one engine `Constraint`, checked before any call.

Owns what the wire shapes mean and how they are checked:
- `response_format`: `text` (no constraint), `json_object` (any JSON object), `json_schema`
  (`name`, `schema`, `strict`, `description`: decoding follows `schema`; `strict` and
  `description` change nothing here, since the schema is always enforced by the decoder).
- `structured_outputs` (vLLM's request shape): exactly one of `json` (a schema, as an object
  or as JSON text), `regex`, `choice`, `grammar` (EBNF or Lark, as vLLM's backends take it),
  `json_object: true`.
- A JSON Schema passes the same safety rules as the `json_schema` critic's
  (`steer.critics.schemas.check_schema`: Draft 2020-12, size and depth caps, no reference
  outside the schema), then the engine's own check (`Engine.check_constraint`: what its
  structured-output backend refuses). Either refusal is a 400 naming the field.

`constraint_for_schema` is the one door from a JSON Schema to a `Constraint` (tool calling's
forced calls use it too). The critic a steered JSON request implies is the search layer's
(`steer.search.constrained`): it follows from the `Constraint` alone.

Does not own the wire models (`protocol.py`) or decoding (the engine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from steer.critics.schemas import check_schema
from steer.engine import Constraint, Engine, EngineRequestError
from steer.service.errors import APIError, bad_request
from steer.service.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    StructuredOutputs,
)

SCHEMA_PARAM = "response_format.json_schema.schema"
MAX_REGEX_CHARS = 4096
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICE_CHARS = 64 * 1024  # all choices together


@dataclass(frozen=True)
class Structured:
    """A request's constraint and the field that asked for it (what a refusal names)."""

    constraint: Constraint
    param: str


def constraint_for_schema(schema: Any, param: str = SCHEMA_PARAM) -> Constraint:
    """`schema` (a JSON Schema object) checked by our safety rules, as a `Constraint`;
    a 400 naming `param` when it is refused."""
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON Schema object", param)
    try:
        check_schema(schema)
    except ValueError as exc:
        raise bad_request(f"Invalid schema for {param}: {exc}", param,
                          code="invalid_json_schema") from exc
    # Compact, key order kept: the decoder writes properties in the order the schema lists.
    return Constraint(json_schema=json.dumps(schema, separators=(",", ":")))


def requested(req: ChatCompletionRequest | CompletionRequest) -> Structured | None:
    """The constraint a request asks for (None: free text). Validated here, except for what
    only the engine knows (see `check`)."""
    fmt = req.response_format
    if isinstance(fmt, JsonObjectFormat | JsonSchemaFormat) and (
            req.structured_outputs is not None):
        raise bad_request("use response_format or structured_outputs, not both",
                          "structured_outputs")
    if isinstance(fmt, JsonSchemaFormat):
        if fmt.json_schema.json_schema is None:
            raise bad_request(f"{SCHEMA_PARAM} is required with type json_schema",
                              SCHEMA_PARAM)
        return Structured(constraint_for_schema(fmt.json_schema.json_schema), SCHEMA_PARAM)
    if isinstance(fmt, JsonObjectFormat):
        return Structured(Constraint(json_object=True), "response_format")
    if req.structured_outputs is not None:
        return _vllm_form(req.structured_outputs)
    return None


def constraint_of(req: ChatCompletionRequest | CompletionRequest) -> Constraint | None:
    asked = requested(req)
    return asked.constraint if asked else None


def param_of(req: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The field a request's constraint came from (what an engine refusal names); None
    when it asks for none."""
    if isinstance(req.response_format, JsonSchemaFormat):
        return SCHEMA_PARAM
    if isinstance(req.response_format, JsonObjectFormat):
        return "response_format"
    so = req.structured_outputs
    if so is None:
        return None
    for name in ("json", "regex", "choice", "grammar", "json_object"):
        if getattr(so, "json_spec" if name == "json" else name) is not None:
            return f"structured_outputs.{name}"
    return "structured_outputs"


def _vllm_form(so: StructuredOutputs) -> Structured:
    kinds = [name for name, value in (("json", so.json_spec), ("regex", so.regex),
                                      ("choice", so.choice), ("grammar", so.grammar),
                                      ("json_object", so.json_object)) if value is not None]
    if len(kinds) != 1:
        got = ", ".join(kinds) if kinds else "none"
        raise bad_request("structured_outputs takes exactly one of json, regex, choice, "
                          f"grammar, json_object (got {got})", "structured_outputs")
    param = f"structured_outputs.{kinds[0]}"
    if so.json_spec is not None:
        schema: Any = so.json_spec
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as exc:
                raise bad_request(f"{param} is not valid JSON: {exc}", param) from exc
        return Structured(constraint_for_schema(schema, param), param)
    if so.json_object is not None:
        if not so.json_object:
            raise bad_request(f"{param} must be true if set (omit structured_outputs for "
                              "free text)", param)
        return Structured(Constraint(json_object=True), param)
    if so.regex is not None:
        _bounded(so.regex, MAX_REGEX_CHARS, param)
        return Structured(Constraint(regex=so.regex), param)
    if so.choice is not None:
        _bounded("".join(so.choice), MAX_CHOICE_CHARS, param)
        return Structured(Constraint(choice=tuple(so.choice)), param)
    assert so.grammar is not None
    if not so.grammar.strip():
        raise bad_request(f"{param} must not be empty", param)
    _bounded(so.grammar, MAX_GRAMMAR_CHARS, param)
    return Structured(Constraint(grammar=so.grammar), param)


def _bounded(text: str, limit: int, param: str) -> None:
    if len(text) > limit:
        raise bad_request(f"{param} is {len(text)} characters; at most {limit}", param)


async def check_request(engine: Engine, req: ChatCompletionRequest | CompletionRequest,
                        constraint: Constraint | None) -> None:
    """`check` for the constraint its sampling params carry, before anything is generated or
    streamed: the one the request asked for itself (response_format or structured_outputs)
    names that field; any other is a forced tool call's and names `tools`."""
    if constraint is None:
        return
    param = param_of(req)
    own = param is not None and constraint == constraint_of(req)
    await check(engine, constraint, param if own and param is not None else "tools")


async def check(engine: Engine, constraint: Constraint, param: str) -> None:
    """The engine's own verdict on `constraint` (what its backend cannot enforce: a regex
    with lookaround, a schema keyword it does not implement, an unsatisfiable schema), as
    a 400 naming `param`, the field that asked for it."""
    try:
        await engine.check_constraint(constraint)
    except EngineRequestError as exc:
        raise unsupported(exc, param) from exc


def unsupported(exc: EngineRequestError, param: str) -> APIError:
    return bad_request(f"{param} cannot be enforced by this server's structured-output "
                       f"backend: {exc}", param, code="unsupported_structured_output")
