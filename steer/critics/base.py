"""Critics: candidates in, `Score`s out. Typed plugins found by name in a registry.

A critic scores every candidate of a round in one batch (one engine step for model critics).
Model calls go through `ModelCaller`, which the search layer implements with budget
accounting, so critics never see the engine's bookkeeping.

Exception tree:

    CriticError            a critic could not score: `param` set when the client's spec is
                           at fault (e.g. an unknown plugin name), unset when the critic
                           itself broke (a plugin raised)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from steer.engine import AdapterRef, Generation, Message, Prompt, SamplingParams


class CriticError(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Score:
    """`value` in [0, 1], higher is better. `detail` explains it (a verifier's error, a vote)."""

    value: float
    detail: str = ""
    passed: bool | None = None


@dataclass(frozen=True)
class Candidate:
    """What a critic judges: the text, and the generator's own evidence about it."""

    text: str
    mean_logprob: float | None = None
    tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class ModelCaller(Protocol):
    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        role: str,
        adapter: AdapterRef | None = None,
    ) -> list[Generation]: ...

    async def context_room(self, prompt: Prompt) -> int:
        """Tokens left in the model's context after `prompt` (to fit quoted text)."""
        ...


@dataclass(frozen=True)
class Question:
    """The task being answered: the conversation, and its last user turn as plain text."""

    messages: tuple[Message, ...]

    @property
    def text(self) -> str:
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        return self.messages[-1].content if self.messages else ""


class CriticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Critic(ABC):
    """A scorer. Subclasses set `name`, may nest their own `Options`, implement `score`."""

    name: ClassVar[str]
    needs_model: ClassVar[bool] = False
    Options: ClassVar[type[CriticOptions]] = CriticOptions

    def __init__(self, options: CriticOptions, adapter: AdapterRef | None = None) -> None:
        self.options = options
        self.adapter = adapter

    def planned_calls(self, n_candidates: int) -> int:
        """Model calls a round of `n_candidates` costs (for amplification checks)."""
        return 0

    @abstractmethod
    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]: ...


CRITICS: dict[str, type[Critic]] = {}


def register_critic(cls: type[Critic]) -> type[Critic]:
    CRITICS[cls.name] = cls
    return cls


def mean_logprob(gen: Generation) -> float | None:
    if not gen.logprobs:
        return None
    values = [t.logprob for t in gen.logprobs if math.isfinite(t.logprob)]
    return sum(values) / len(values) if values else None
