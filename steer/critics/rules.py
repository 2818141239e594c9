"""Critics that need no model: regex, JSON schema, exact answer, and Python plugins.

Everything here runs on the event loop over client data, so each is bounded: patterns run
on RE2 (`patterns`), schemas are checked and validated within caps (`schemas`), JSON is
found without backtracking.

Python critics are functions `(question: str, candidate: str, **kwargs) -> float | bool`
registered under the entry-point group `steer.critics` (or `register_python_critic`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

import referencing.exceptions
from pydantic import Field, field_validator, model_validator

from steer.critics.base import (
    Candidate,
    Critic,
    CriticError,
    CriticOptions,
    ModelCaller,
    Question,
    Score,
    register_critic,
)
from steer.critics.extract import extractor, normalize_reference
from steer.critics.patterns import PatternStr, compile_pattern
from steer.critics.schemas import SchemaTooCostly, StepBudget, check_schema, first_error

PythonCriticFn = Callable[..., float | bool]
_PYTHON_CRITICS: dict[str, PythonCriticFn] = {}
ENTRY_POINT_GROUP = "steer.critics"
MAX_KWARGS = 32
MAX_SCHEMA_STEPS_PER_CALL = 50_000
MAX_KWARGS_BYTES = 16 * 1024


def register_python_critic(name: str, fn: PythonCriticFn) -> None:
    _PYTHON_CRITICS[name] = fn


def python_critics() -> dict[str, PythonCriticFn]:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    merged: dict[str, PythonCriticFn] = {name: ep.load() for name, ep in found.items()}
    merged.update(_PYTHON_CRITICS)
    return merged


def _binary(ok: bool, detail: str = "") -> Score:
    return Score(1.0 if ok else 0.0, detail, passed=ok)


@register_critic
class RegexCritic(Critic):
    """1 when the candidate matches `pattern` (`search` anywhere, or `fullmatch`)."""

    name = "regex"

    class Options(CriticOptions):
        pattern: PatternStr
        mode: str = Field("search", pattern="^(search|fullmatch)$")

    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]:
        opts = self.options
        assert isinstance(opts, RegexCritic.Options)
        compiled = compile_pattern(opts.pattern)
        match = compiled.fullmatch if opts.mode == "fullmatch" else compiled.search

        def run() -> list[Score]:
            return [_binary(match(c.text.strip()) is not None) for c in candidates]

        # RE2 is linear but a big program over a long output still takes a while; it
        # releases the GIL, so in a thread it leaves the event loop free.
        return await asyncio.to_thread(run)


def _fenced(text: str) -> str | None:
    """The body of the first closed ``` fence, without a `json` tag."""
    # str.find, not a regex: `\s*(.+?)` after the fence was quadratic on a long blank run.
    start = text.find("```")
    end = text.find("```", start + 3) if start >= 0 else -1
    if end < 0:
        return None
    body = text[start + 3:end]
    return body[4:] if body.startswith("json") else body


def _json_in(text: str) -> Any:
    """The first JSON value in a model's output: all of it, a ``` fence, or from the first
    `{` / `[`. RecursionError (nesting deeper than the decoder's stack) counts as none."""
    for chunk in (text, _fenced(text)):
        if chunk is None:
            continue
        try:
            return json.loads(chunk)
        except (ValueError, RecursionError):
            pass
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except (ValueError, RecursionError):
            pass
    raise ValueError("no JSON value found")


@register_critic
class JsonSchemaCritic(Critic):
    """1 when the candidate contains JSON valid under `schema`; the error otherwise."""

    name = "json_schema"

    class Options(CriticOptions):
        json_schema: dict[str, Any] = Field(alias="schema")

        @field_validator("json_schema")
        @classmethod
        def _valid_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
            return check_schema(v)

    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]:
        opts = self.options
        assert isinstance(opts, JsonSchemaCritic.Options)
        schema = opts.json_schema

        def run() -> list[Score]:
            budget = StepBudget(MAX_SCHEMA_STEPS_PER_CALL)
            return [_schema_score(schema, c.text, budget) for c in candidates]

        # Off the event loop: even capped, a costly schema x many candidates takes a while.
        return await asyncio.to_thread(run)


def _schema_score(schema: dict[str, Any], text: str, budget: StepBudget) -> Score:
    try:
        value = _json_in(text)
    except ValueError as exc:
        return _binary(False, str(exc))
    try:
        error = first_error(schema, value, budget)
    except SchemaTooCostly as exc:
        error = f"schema validation too costly: {exc}"
    except RecursionError:
        error = "schema validation too costly: references loop without progress"
    except referencing.exceptions.Unresolvable as exc:
        # check_schema resolved every reference up front: this is our bug, not the client's
        raise CriticError(f"json_schema critic: unresolvable reference {exc}") from exc
    return _binary(error is None, error or "")


@register_critic
class ExactAnswerCritic(Critic):
    """1 when the candidate's extracted final answer equals the client's `reference`."""

    name = "exact_answer"

    class Options(CriticOptions):
        reference: str | float
        extract: str = Field("last_number", pattern="^(last_number|answer_line|choice|regex)$")
        pattern: PatternStr | None = None

        @model_validator(mode="after")
        def _pattern_for_regex(self) -> ExactAnswerCritic.Options:
            if self.extract == "regex" and not self.pattern:
                raise ValueError("extract 'regex' needs a 'pattern'")
            return self

    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]:
        opts = self.options
        assert isinstance(opts, ExactAnswerCritic.Options)
        extract = extractor(opts.extract, opts.pattern)
        want = normalize_reference(opts.extract, opts.reference)
        scores = []
        for c in candidates:
            got = extract(c.text)
            scores.append(_binary(got == want, f"extracted {got!r}, expected {want!r}"))
        return scores


@register_critic
class PythonCritic(Critic):
    """A registered Python function scores each candidate (bool -> 0/1, float clamped)."""

    name = "python"

    class Options(CriticOptions):
        function: str = Field(max_length=200)
        kwargs: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KWARGS)

        @field_validator("kwargs")
        @classmethod
        def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
            taken = sorted({"question", "candidate"} & set(v))
            if taken:
                raise ValueError(f"'{taken[0]}' is the function's own argument")
            try:
                size = len(json.dumps(v))
            except (ValueError, RecursionError) as exc:
                raise ValueError("kwargs must be plain JSON") from exc
            if size > MAX_KWARGS_BYTES:
                raise ValueError(f"kwargs are {size} bytes as JSON; at most {MAX_KWARGS_BYTES}")
            return v

    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]:
        opts = self.options
        assert isinstance(opts, PythonCritic.Options)
        fn = python_critics().get(opts.function)
        if fn is None:
            raise CriticError(f"no python critic named {opts.function!r}",
                              param="steering.critic.function")

        def run() -> list[Score]:
            out = []
            for c in candidates:
                raw = fn(question.text, c.text, **opts.kwargs)
                value = float(raw)
                out.append(Score(min(1.0, max(0.0, value)), passed=bool(raw)
                                 if isinstance(raw, bool) else None))
            return out

        try:
            return await asyncio.to_thread(run)
        except Exception as exc:  # a plugin's failure is the critic's error, with its reason
            raise CriticError(f"python critic {opts.function!r} failed: {exc!r}") from exc
