"""Value types shared by every engine backend and everything above them.

All frozen: a `Generation` handed to a strategy or critic is never mutated behind its back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant turn made (OpenAI's shape)."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class Tool:
    """A function the model may call, as the chat template renders it."""

    name: str
    description: str | None = None
    parameters: str | None = None  # a JSON Schema, serialized


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None  # the participant's (a tool message: the function that answered)
    # The tools offered in this conversation, carried by its first message: the engine
    # renders them through the chat template, and a strategy that passes the conversation
    # on passes its tools on with it.
    tools: tuple[Tool, ...] = ()


# A chat (list of messages, rendered with the model's chat template) or a raw text prompt.
Prompt = Sequence[Message] | str


@dataclass(frozen=True)
class Constraint:
    """Constrained decoding (vLLM's structured outputs): exactly one kind is set. The edge
    validates it (a JSON Schema arrives here already checked and serialized)."""

    json_schema: str | None = None  # a JSON Schema document, serialized
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # an EBNF/Lark grammar, as vLLM's backends take it


@dataclass(frozen=True)
class SamplingParams:
    """Per-call sampling knobs; validated at the edge, trusted here."""

    max_tokens: int | None = None  # None: whatever fits in the context window
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: the chosen token plus the top k
    min_tokens: int = 0  # no stop string or end-of-sequence before this many tokens
    constraint: Constraint | None = None  # None: free text
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter as the engine knows it (vLLM's `LoRARequest` shape)."""

    name: str
    int_id: int
    path: str


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Generation:
    """One finished sequence. `prompt_index`/`index` place it in a batched call."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    prompt_index: int = 0
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (None: unknown)
    # The text as the engine produced it: (text, tokens) per step, joining to `text` (empty:
    # not recorded). A chosen candidate streams in these pieces, with its logprobs sliced.
    pieces: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class StreamDelta:
    """New output of choice `index` since the previous delta of the same stream."""

    index: int
    text: str
    new_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class StreamEnd:
    """Last item of a stream: totals for usage accounting."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (None: unknown)


@dataclass(frozen=True)
class Capabilities:
    lora: bool = False
    logprobs: bool = True
    seed: bool = True
    max_logprobs: int = 20


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    detail: str = ""
    running_requests: int = 0
    extra: dict[str, float] = field(default_factory=dict)
