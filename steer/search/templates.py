"""Named prompt templates: TOML files rendered with a sandboxed Jinja2.

A template rewrites the conversation before any strategy runs: it may set a system prompt
and rewrites the last user turn. Every template sees `question` (the last user turn) and
its own variables; a variable without a default is required (missing: `SteeringInvalid`).
Built-ins live in `templates/` beside this file; `extra_dir` adds or overrides by name.

Template sources are the server's (built-ins, `extra_dir`); client variables are only ever
values a template prints or loops over, never compiled. They are bounded (MAX_VARIABLES,
MAX_VALUE_BYTES each as JSON, scalars or lists of scalars / flat objects, as `few_shot`
takes) and so is what a render may produce (MAX_RENDERED_CHARS), so no render runs long.
"""

from __future__ import annotations

import functools
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment

from steer.engine import Message
from steer.search.session import SteeringInvalid

BUILTIN_DIR = Path(__file__).with_name("templates")
_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
MAX_VARIABLES = 32
MAX_VALUE_BYTES = 8 * 1024
MAX_VALUE_DEPTH = 3  # a list of objects of scalars: few_shot's `examples`
MAX_RENDERED_CHARS = 4 * 1024 * 1024
_SCALARS = (str, int, float, bool, type(None))


@functools.lru_cache(maxsize=128)
def _compiled(source: str) -> Template:
    return _ENV.from_string(source)


def _render(source: str, values: Mapping[str, Any], name: str, param: str) -> str:
    out: list[str] = []
    size = 0
    for piece in _compiled(source).generate(values):
        size += len(piece)
        if size > MAX_RENDERED_CHARS:
            raise SteeringInvalid(
                f"template '{name}' renders longer than {MAX_RENDERED_CHARS} characters", param
            )
        out.append(piece)
    return "".join(out).strip()


def _plain(value: Any) -> bool:
    """JSON scalars, or containers of them at most MAX_VALUE_DEPTH deep (a scalar is 1).
    Iterative: whatever a client nests, no recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, _SCALARS):
            continue
        if not isinstance(node, dict | list) or depth >= MAX_VALUE_DEPTH:
            return False
        stack.extend((child, depth + 1)
                     for child in (node.values() if isinstance(node, dict) else node))
    return True


def check_values(variables: Mapping[str, Any], param: str) -> None:
    """Client variables within bounds: count, types, nesting, size (before any render)."""
    where = f"{param}.variables"
    if len(variables) > MAX_VARIABLES:
        raise SteeringInvalid(f"at most {MAX_VARIABLES} template variables", where)
    for key, value in variables.items():
        if not _plain(value) or len(json.dumps(value, ensure_ascii=False)) > MAX_VALUE_BYTES:
            raise SteeringInvalid(
                f"template variable '{key}' must be a string, number or boolean of at most "
                f"{MAX_VALUE_BYTES} characters as JSON, or a list of those or of flat objects",
                f"{where}.{key}",
            )


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    description: str
    user: str
    system: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "variables": [
                {"name": v, "required": True} for v in self.required
            ] + [
                {"name": k, "required": False, "default": v} for k, v in self.defaults.items()
            ],
        }

    def check_variables(self, variables: Mapping[str, Any], param: str) -> None:
        check_values(variables, param)
        missing = [v for v in self.required if v not in variables]
        if missing:
            raise SteeringInvalid(
                f"template '{self.name}' needs variable(s): {', '.join(missing)}",
                f"{param}.variables.{missing[0]}",
            )
        unknown = sorted(set(variables) - set(self.required) - set(self.defaults))
        if unknown:
            raise SteeringInvalid(
                f"template '{self.name}' has no variable '{unknown[0]}'",
                f"{param}.variables.{unknown[0]}",
            )

    def apply(self, messages: tuple[Message, ...], variables: Mapping[str, Any],
              param: str) -> tuple[Message, ...]:
        self.check_variables(variables, param)
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
        if last_user is None:
            raise SteeringInvalid("templates need a user message", "messages")
        values = {**self.defaults, **variables, "question": messages[last_user].content}
        try:
            user = _render(self.user, values, self.name, param)
            system = _render(self.system, values, self.name, param) if self.system else None
        except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:
            # A client value of the wrong type fails inside the template's own code
            # (`{% for ex in examples %}` over a number is a TypeError, not a TemplateError).
            raise SteeringInvalid(f"template '{self.name}' failed: {exc}", param) from exc
        out = list(messages)
        out[last_user] = Message("user", user)
        if system:
            out = [m for m in out if m.role != "system"]
            out.insert(0, Message("system", system))
        return tuple(out)


def _load(path: Path) -> PromptTemplate:
    data = tomllib.loads(path.read_text())
    user, system = data["user"], data.get("system")
    declared = set()
    for source in (user, system or ""):
        declared |= meta.find_undeclared_variables(_ENV.parse(source))
    defaults = dict(data.get("defaults", {}))
    required = tuple(sorted(declared - set(defaults) - {"question"}))
    return PromptTemplate(
        name=path.stem, description=data.get("description", ""), user=user, system=system,
        defaults=defaults, required=required,
    )


class TemplateLibrary:
    def __init__(self, extra_dir: Path | None = None) -> None:
        self.templates: dict[str, PromptTemplate] = {}
        for directory in (BUILTIN_DIR, extra_dir):
            if directory is not None and directory.is_dir():
                for path in sorted(directory.glob("*.toml")):
                    self.templates[path.stem] = _load(path)

    def get(self, name: str, param: str) -> PromptTemplate:
        template = self.templates.get(name)
        if template is None:
            raise SteeringInvalid(
                f"unknown template '{name}'; available: {', '.join(sorted(self.templates))}",
                param,
            )
        return template

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for _, t in sorted(self.templates.items())]
