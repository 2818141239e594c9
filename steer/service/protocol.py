"""OpenAI wire models: every request, response, chunk and error shape, in one place.

Requests are strict (no "5" for 5) and closed (an unknown field is a 400 naming it), like
OpenAI's API. Responses follow OpenAI's shapes field for field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_serializer,
    model_validator,
)

from steer.service.fields import (
    LogitBias,
    Modalities,
    PartKind,
    PromptCacheRetention,
    SafetyIdentifier,
    ServiceTier,
    TextOnly,
    Verbosity,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_INT_FIELDS = (int, int | None)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data: Any) -> Any:
        # JSON has one number type: 2.0 is the integer 2, as JSON Schema (and so the OpenAPI
        # document) says; "2", 2.5 and true stay errors under strict validation.
        if not isinstance(data, dict):
            return data
        ints = {name for name, f in cls.model_fields.items() if f.annotation in _INT_FIELDS}
        return {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v
                for k, v in data.items()}


# -- shared request pieces --------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: Literal[False] | None = None  # no padding to turn on (fields.py)


class SteeringSpec(_Request):
    """The `steering` field: which strategy, its options, critic, budget, template, trace.
    The search layer validates the contents (options per strategy, critic per name)."""

    strategy: str = "none"
    options: dict[str, Any] = Field(default_factory=dict)
    critic: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    template: dict[str, Any] | None = None
    trace: bool = False

    def is_plain(self) -> bool:
        return self == SteeringSpec()


# -- structured outputs (what each form means and how it is checked: `structured.py`) -------


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaSpec(_Request):
    """OpenAI's `response_format.json_schema`."""

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule
    description: str | None = None
    # subtle: `schema` on the wire; a field of that name would shadow BaseModel.schema
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _format_kind(fmt: Any) -> str | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else getattr(fmt, "type", None)
    return {"text": "TextFormat", "json_object": "JsonObjectFormat",
            "json_schema": "JsonSchemaFormat"}.get(kind) if isinstance(kind, str) else None


# One error for an unknown type, and errors inside a format named by their own fields (the
# tags are class names, which an error's `param` leaves out).
ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("TextFormat")]
    | Annotated[JsonObjectFormat, Tag("JsonObjectFormat")]
    | Annotated[JsonSchemaFormat, Tag("JsonSchemaFormat")],
    Discriminator(_format_kind, custom_error_type="response_format_type",
                  custom_error_message="response_format's type is 'text', 'json_object' or "
                                       "'json_schema'"),
]


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar`,
    `json_object` (vLLM's other knobs are not taken: an unknown field is a 400)."""

    # subtle: `json` on the wire; a field of that name would shadow BaseModel.json
    json_spec: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=1024)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]


class _Sampling(_Request):
    """Sampling fields common to chat and completions (OpenAI's, then vLLM's extras)."""

    model: str
    n: int = Field(1, ge=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[str, Field(min_length=1)] | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(None, ge=0)  # vLLM's: no stop or EOS before this many tokens
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's
    steering: SteeringSpec | None = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# -- chat -------------------------------------------------------------------------------------

# OpenAI's `metadata`: up to 16 string pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]



class TextPart(_Request):
    type: Literal["text"]
    text: str


class RefusalPart(_Request):
    """An assistant's refusal in the history (assistant messages only: `fields.py`)."""

    type: Literal["refusal"]
    refusal: str


# Image, audio and file parts are refused by position (`fields.TextOnly`): text-only model.
ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[RefusalPart, Tag("RefusalPart")],
    PartKind, TextOnly,
]


# -- tools (OpenAI's function tools; what the server does with them: `tools.py`) -------------

ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule


class FunctionDefinition(_Request):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema (checked in tools.py)
    strict: bool | None = None


class FunctionTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ToolChoiceFunction


class CalledFunction(_Request):
    name: str
    arguments: str  # JSON text, as the model wrote it


class MessageToolCall(_Request):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None  # an assistant message's refusal (OpenAI's field)
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        """What the message says, as the model reads it: a refusal is what the assistant
        said (in a part or in `refusal`), so it is part of that turn's text."""
        if isinstance(self.content, str):
            said = [self.content]
        else:
            said = [p.text if isinstance(p, TextPart) else p.refusal for p in self.content or ()]
        if self.refusal is not None:
            said.append(self.refusal)
        return "\n".join(said)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Annotated[list[FunctionTool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Other clients' ways to ask for steering (see steer.search.aliases).
    optillm_approach: str | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # OpenAI's stored completions: keep this one (null: the server's STEER_STORE decides).
    store: bool | None = None
    metadata: Metadata | None = None
    # OpenAI's fields common SDKs send (what each does here: `fields.py`).
    service_tier: ServiceTier | None = None
    modalities: Modalities | None = None
    safety_identifier: SafetyIdentifier | None = None
    # Accepted, with nothing to do: vLLM's prefix cache is keyed by the prompt's own tokens,
    # so requests that share a prefix share its cache whatever key they carry (and across
    # keys); OpenAI uses the key to route similar requests to one cache, which one engine
    # per server (and one upstream per search, behind a remote engine) already is.
    prompt_cache_key: str | None = None
    prompt_cache_retention: PromptCacheRetention | None = None
    verbosity: Verbosity | None = None

    def end_user(self) -> str | None:
        """Who the request is for, for per-user limits: `safety_identifier` is OpenAI's
        successor to `user` for telling end users apart."""
        return self.safety_identifier or self.user

    def tier_used(self) -> Literal["default"] | None:
        """The `service_tier` a response reports: the tier that served it, when one was
        asked for (OpenAI's convention)."""
        return None if self.service_tier is None else "default"

    def max_tokens_field(self) -> tuple[str, int | None]:
        """Which field set the completion limit (for error messages), and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


# -- completions ------------------------------------------------------------------------------


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this legacy endpoint
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Literal[1] | None = None  # 1: one candidate per choice, OpenAI's default
    suffix: Annotated[str, Field(max_length=0)] | None = None  # no insert mode (fields.py)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# -- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class SteeringUsage(BaseModel):
    model_calls: int
    candidates: int
    pruned: int
    budget_exhausted: bool


class CompletionTokensDetails(BaseModel):
    """OpenAI's breakdown of the completion tokens (openai SDK's `CompletionTokensDetails`).
    `reasoning_tokens`: what a steering strategy spent beyond the returned answer(s); the
    rest is what OpenAI reports as 0 for a text-only model without predicted outputs."""

    reasoning_tokens: int = 0
    audio_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt tokens: `cached_tokens` from the prefix cache."""

    cached_tokens: int = 0
    audio_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails = Field(
        default_factory=CompletionTokensDetails)
    # None: the engine does not report its prefix cache (the field is left out, not 0).
    prompt_tokens_details: PromptTokensDetails | None = None
    steering: SteeringUsage | None = None

    @model_serializer(mode="wrap")
    def _omit_plain(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in ("steering", "prompt_tokens_details"):
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, *, reasoning_tokens: int = 0,
           cached_tokens: int | None = None) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens),
            prompt_tokens_details=None if cached_tokens is None else PromptTokensDetails(
                cached_tokens=cached_tokens),
        )


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChoiceLogprobs(BaseModel):
    content: list[LogprobEntry] | None


class CallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    """A call in a response (openai SDK's `ChatCompletionMessageToolCall`)."""

    id: str
    type: Literal["function"] = "function"
    function: CallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: the answer is only tool calls
    refusal: None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: Literal["default"] | None = None  # only when the request named one
    steering_trace: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _omit_trace(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in ("steering_trace", "service_tier"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        return {k: v for k, v in (("name", self.name), ("arguments", self.arguments))
                if v is not None}


class DeltaToolCall(BaseModel):
    """A piece of a streamed call (openai SDK's `ChoiceDeltaToolCall`): the first piece of
    call `index` has its id, type and name; the next ones add argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index}
        data.update((k, v) for k, v in (("id", self.id), ("type", self.type)) if v is not None)
        if self.function is not None:
            data["function"] = self.function.model_dump()
        return data


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"role", "content"} first, {} at the end.
        data: dict[str, Any] = {k: v for k, v in (("role", self.role), ("content", self.content))
                                if v is not None}
        if self.tool_calls is not None:
            data["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return data


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    service_tier: Literal["default"] | None = None  # only when the request named one
    steering: dict[str, Any] | None = None  # search progress, on chunks with empty deltas

    @model_serializer(mode="wrap")
    def _omit_steering(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in ("steering", "service_tier"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    system_fingerprint: str | None = None
    steering_trace: dict[str, Any] | None = None  # a steered request's, when it asked

    @model_serializer(mode="wrap")
    def _omit_trace(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("steering_trace") is None:
            data.pop("steering_trace", None)
        return data


# -- adapters (vLLM's runtime LoRA API) ------------------------------------------------------


class LoadLoraAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    replace: bool = False
    load_inplace: bool = False  # vLLM's name for `replace`


class UnloadLoraAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; accepted and ignored (the server owns the ids)


# -- models -----------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steer"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    lineage: dict[str, Any] | None = None  # Steer's: a trained adapter's parent, data, metrics


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- files ------------------------------------------------------------------------------------


class FileObject(BaseModel):
    """OpenAI's File object; `status` is always `processed` (validated before it is stored)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class ModelDeleted(BaseModel):
    """`DELETE /v1/models/{model}` (OpenAI's shape: what `client.models.delete` reads)."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
