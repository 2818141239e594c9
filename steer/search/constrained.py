"""What a request's decoding constraint (`Constraint`: structured outputs) means for a search.

Every strategy generates the calls whose output may be returned as the answer under the
request's constraint (`Context.answer_sampling`), and its other calls (critiques, feedback,
ToT's thoughts and values, debate summaries) as free text (`Context.sampling`); each
strategy's docstring says which calls are which. On top of decoding:

- `gate_for`: the critic a JSON constraint implies, scored without being asked: the
  `json_schema` critic over the request's schema (`{"type": "object"}` for `json_object`).
  Decoding already follows the schema, but an answer cut off by `max_tokens`, or a keyword
  the decoder does not enforce, still fails it; a candidate that fails never wins (see
  `Context.score`). Regex, choice and grammar constraints imply none: decoding is the check.
- `answer_extractor`: what a vote (self-consistency, debate) counts as one answer. Under a
  constraint and without an `extract` the client chose, the constrained output itself:
  JSON in normal form (the `json` extractor: keys sorted, compact), so equal values written
  differently are one answer; any other constrained text stripped of surrounding space.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from steer.critics import Critic
from steer.critics.extract import extractor
from steer.critics.rules import JsonSchemaCritic
from steer.engine import Constraint

Extract = Callable[[str], str | None]


def gate_for(constraint: Constraint | None) -> Critic | None:
    """The `json_schema` critic a JSON constraint implies (None: no implied critic)."""
    if constraint is None:
        return None
    if constraint.json_schema is not None:
        schema: dict[str, Any] = json.loads(constraint.json_schema)
    elif constraint.json_object:
        schema = {"type": "object"}
    else:
        return None
    return JsonSchemaCritic(JsonSchemaCritic.Options.model_validate({"schema": schema}))


def is_json(constraint: Constraint | None) -> bool:
    return constraint is not None and (constraint.json_schema is not None
                                       or constraint.json_object)


def _stripped(text: str) -> str | None:
    return text.strip() or None


def answer_extractor(constraint: Constraint | None, extract: str, pattern: str | None,
                     chosen: bool) -> Extract:
    """The extractor a vote uses: the client's (`chosen`: it set `extract` itself), else
    under a constraint the constrained output itself, else the default `extract`."""
    if constraint is None or chosen:
        return extractor(extract, pattern)
    return extractor("json") if is_json(constraint) else _stripped
