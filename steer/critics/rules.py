"""Critics that need no model: regex, JSON schema, exact answer, and Python plugins.

Python critics are functions `(question: str, candidate: str, **kwargs) -> float | bool`
registered under the entry-point group `steer.critics` (or `register_python_critic`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

import jsonschema
from pydantic import Field, field_validator

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

PythonCriticFn = Callable[..., float | bool]
_PYTHON_CRITICS: dict[str, PythonCriticFn] = {}
ENTRY_POINT_GROUP = "steer.critics"


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
        pattern: str
        mode: str = Field("search", pattern="^(search|fullmatch)$")

        @field_validator("pattern")
        @classmethod
        def _compiles(cls, v: str) -> str:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from exc
            return v

    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]:
        opts = self.options
        assert isinstance(opts, RegexCritic.Options)
        compiled = re.compile(opts.pattern)
        match = compiled.fullmatch if opts.mode == "fullmatch" else compiled.search
        return [_binary(match(c.text.strip()) is not None) for c in candidates]


def _json_in(text: str) -> Any:
    fenced = re.search(r"```(?:json)?\s*(.+?)```", text, re.S)
    for chunk in (text, fenced.group(1) if fenced else None):
        if chunk is None:
            continue
        try:
            return json.loads(chunk)
        except ValueError:
            pass
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except ValueError:
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
            try:
                jsonschema.Draft202012Validator.check_schema(v)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"invalid JSON schema: {exc.message}") from exc
            return v

    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]:
        opts = self.options
        assert isinstance(opts, JsonSchemaCritic.Options)
        validator = jsonschema.Draft202012Validator(opts.json_schema)
        scores = []
        for c in candidates:
            try:
                value = _json_in(c.text)
            except ValueError as exc:
                scores.append(_binary(False, str(exc)))
                continue
            error = next(iter(validator.iter_errors(value)), None)
            scores.append(_binary(error is None, error.message if error else ""))
        return scores


@register_critic
class ExactAnswerCritic(Critic):
    """1 when the candidate's extracted final answer equals the client's `reference`."""

    name = "exact_answer"

    class Options(CriticOptions):
        reference: str | float
        extract: str = Field("last_number", pattern="^(last_number|answer_line|choice|regex)$")
        pattern: str | None = None

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
        function: str
        kwargs: dict[str, Any] = Field(default_factory=dict)

    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]:
        opts = self.options
        assert isinstance(opts, PythonCritic.Options)
        fn = python_critics().get(opts.function)
        if fn is None:
            raise CriticError(f"no python critic named {opts.function!r}")

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
