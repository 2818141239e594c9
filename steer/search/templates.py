"""Named prompt templates: TOML files rendered with a sandboxed Jinja2.

A template rewrites the conversation before any strategy runs: it may set a system prompt
and rewrites the last user turn. Every template sees `question` (the last user turn) and
its own variables; a variable without a default is required (missing: `SteeringInvalid`).
Built-ins live in `templates/` beside this file; `extra_dir` adds or overrides by name.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment

from steer.engine import Message
from steer.search.session import SteeringInvalid

BUILTIN_DIR = Path(__file__).with_name("templates")
_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


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
            user = _ENV.from_string(self.user).render(values).strip()
            system = _ENV.from_string(self.system).render(values).strip() if self.system else None
        except TemplateError as exc:
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
