"""Client JSON schemas for the `json_schema` critic: checked up front, validated in bounds.

`check_schema` runs at option validation (a `ValueError` there is a 400 naming the field):
the Draft 2020-12 meta-schema, at most MAX_SCHEMA_BYTES as JSON and MAX_DEPTH levels of
nesting, every `$ref` / `$dynamicRef` resolving inside the schema itself (a `#` pointer or
an `$id` / `$anchor` the schema defines: nothing is ever fetched, neither http:// nor
file://), and every `pattern` / `patternProperties` key compiling with RE2.

`validate` checks one JSON value with a Draft 2020-12 validator changed in four ways:
its registry retrieves nothing; `pattern`, `patternProperties` and `additionalProperties`
match with RE2 (jsonschema's own use `re`, which backtracks); `uniqueItems` is linear (its
own is quadratic on unsortable items); and each value gets at most MAX_STEPS keyword
evaluations from a `StepBudget` its critic call shares, since `$ref` + `anyOf` make a small
schema exponential. `format` is not
checked (no format checker: `format: regex` would compile with `re`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any
from urllib.parse import urljoin

import jsonschema
import referencing.exceptions
import referencing.jsonschema
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

from steer.critics.patterns import compile_pattern

MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_STEPS = 10_000  # per value; a step is one keyword on one instance (~5-60 us)


class SchemaTooCostly(Exception):
    """Validating one value took more than MAX_STEPS keyword evaluations."""


def _retrieve_nothing(uri: str) -> Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


# -- checked up front ----------------------------------------------------------------------

# Schemas that passed, by their JSON: one request checks its schema several times (the
# edge, the tool plan, each search's gate) and clients resend the same few schemas, while a
# 64 KiB schema takes ~0.1-0.3 s of meta-schema validation on the event loop.
_PASSED: OrderedDict[str, None] = OrderedDict()
_PASSED_MAX = 256
_PASSED_LOCK = threading.Lock()  # critics may check schemas from worker threads too


def check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    _check_depth(schema)
    text = json.dumps(schema, sort_keys=True)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ValueError(f"schema is {len(text)} bytes as JSON; at most {MAX_SCHEMA_BYTES}")
    with _PASSED_LOCK:
        if text in _PASSED:
            _PASSED.move_to_end(text)
            return schema
    _check_contents(schema)
    with _PASSED_LOCK:
        _PASSED[text] = None
        if len(_PASSED) > _PASSED_MAX:
            _PASSED.popitem(last=False)
    return schema


def _check_contents(schema: dict[str, Any]) -> None:
    try:
        jsonschema.Draft202012Validator.check_schema(schema, format_checker=None)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"invalid JSON schema: {exc.message}") from exc
    refs: list[tuple[str, str, str]] = []
    keywords: set[str] = set()
    for node, base in _schema_dicts(schema):
        keywords.update(node)
        for key in ("$ref", "$dynamicRef"):
            if isinstance(node.get(key), str):
                refs.append((key, base, node[key]))
        if isinstance(node.get("pattern"), str):
            _compiles(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            for pattern in node["patternProperties"]:
                _compiles(pattern)
    if {"unevaluatedProperties", "patternProperties"} <= keywords:
        # subtle: jsonschema finds the properties `patternProperties` evaluated (for
        # `unevaluatedProperties`) with `re`, in code we cannot swap for RE2.
        raise ValueError("unevaluatedProperties together with patternProperties is not supported")
    _check_refs(schema, refs)


def _check_depth(schema: Any) -> None:
    # Iterative, so a schema nested deeper than Python's stack is refused, not a crash.
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"schema is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _schema_dicts(schema: Any, base: str = "") -> Iterator[tuple[dict[str, Any], str]]:
    """Every object in the schema with the base URI in force there (`$id` moves it).

    Objects under `const`, `enum` and the like are visited too: a `$ref`-looking value there
    is refused, which is safer than missing a real one under a property of that name."""
    stack: list[tuple[Any, str]] = [(schema, base)]
    while stack:
        node, base = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$id"), str):
                base = urljoin(base, node["$id"])
            yield node, base
            stack.extend((v, base) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, base) for v in node)


def _compiles(pattern: str) -> None:
    try:
        compile_pattern(pattern)
    except ValueError as exc:
        raise ValueError(f"pattern {pattern[:80]!r}: {exc}") from exc


def _check_refs(schema: dict[str, Any], refs: list[tuple[str, str, str]]) -> None:
    resource = referencing.jsonschema.DRAFT202012.create_resource(schema)
    registry: Registry[Any] = Registry(retrieve=_retrieve_nothing)  # type: ignore[call-arg]
    registry = registry.with_resource(resource.id() or "", resource).crawl()
    for key, base, ref in refs:
        try:
            registry.resolver(base_uri=base).lookup(ref)
        except (referencing.exceptions.Unresolvable, ValueError) as exc:
            raise ValueError(
                f"{key} {ref[:200]!r} does not resolve inside the schema; references to "
                "other documents (http://, file://, ...) are never fetched"
            ) from exc


# -- validated in bounds -------------------------------------------------------------------

_STEPS: ContextVar[list[int]] = ContextVar("json_schema_steps")

Keyword = Callable[[Any, Any, Any, dict[str, Any]], Any]


def _counted(keyword: Keyword) -> Keyword:
    def run(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Any:
        steps = _STEPS.get()
        steps[0] -= 1
        if steps[0] < 0:
            raise SchemaTooCostly("validation needed more steps than allowed")
        return keyword(validator, value, instance, schema)

    return run


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
             ) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not compile_pattern(pattern).search(instance):
        yield ValidationError(f"{instance[:200]!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any,
                        schema: dict[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        compiled = compile_pattern(pattern)
        for key, value in instance.items():
            if compiled.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any,
                           schema: dict[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = [compile_pattern(p) for p in schema.get("patternProperties", {})]
    extras = sorted(
        (k for k in instance if k not in known and not any(p.search(k) for p in patterns)),
        key=str,
    )
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        shown = ", ".join(repr(e[:80]) for e in extras[:10])
        yield ValidationError(f"Additional properties are not allowed ({shown} unexpected)")


def _unique_items(validator: Any, unique: Any, instance: Any, schema: dict[str, Any]
                  ) -> Iterator[ValidationError]:
    if unique and validator.is_type(instance, "array"):
        seen = set()
        for item in instance:
            key = _canonical(item)
            if key in seen:
                yield ValidationError("array has non-unique elements")
                return
            seen.add(key)


def _canonical(value: Any) -> Any:
    """A hashable form with JSON Schema's equality: 1 == 1.0, true != 1, keys unordered."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)  # subtle: hash(1) == hash(1.0), as the spec wants
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, _canonical(v)) for k, v in value.items()))
    return ("other", value)


def _build_validator_class() -> Any:
    base = jsonschema.Draft202012Validator
    keywords: dict[str, Keyword] = {
        **base.VALIDATORS,
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
        "uniqueItems": _unique_items,
    }
    return jsonschema.validators.extend(
        base, {name: _counted(fn) for name, fn in keywords.items()}
    )


_Validator = _build_validator_class()
_REGISTRY: Registry[Any] = Registry(retrieve=_retrieve_nothing)  # type: ignore[call-arg]


class StepBudget:
    """Keyword evaluations left, shared by the values one critic call validates."""

    def __init__(self, steps: int) -> None:
        self.left = steps


def first_error(schema: dict[str, Any], value: Any, budget: StepBudget) -> str | None:
    """Why `value` fails `schema` (None when it is valid), spending at most MAX_STEPS of
    `budget`. Raises `SchemaTooCostly` when that runs out, `RecursionError` on a reference
    loop that never reaches into the value."""
    validator = _Validator(schema, registry=_REGISTRY)
    allowed = min(MAX_STEPS, budget.left)
    steps = [allowed]
    token = _STEPS.set(steps)
    try:
        error = next(iter(validator.iter_errors(value)), None)
    finally:
        _STEPS.reset(token)
        budget.left -= allowed - max(steps[0], 0)
    return None if error is None else str(error.message)
