"""The OpenAI request fields common SDKs send beyond sampling and message text, and what this
server does with each one (openai SDK 3.54's `CompletionCreateParams`, field by field).

Implemented here or through the types below:
- `logit_bias`: token id (decimal string) -> bias in [-100, 100], at most 300 entries, onto
  `SamplingParams.logit_bias`; the engine checks the ids against the model's vocabulary (vLLM
  refuses an out-of-vocabulary id naming `logit_bias`).
- `service_tier`: `auto` and `default`, answered with the tier used, `default` (OpenAI's
  convention: the response names the processing mode really used). `flex`, `scale`,
  `priority` and `fast` promise a price, capacity or latency this server does not offer, so
  they are refused rather than silently served as `default`.
- `modalities: ["text"]`; `user` and `safety_identifier` (who a request counts against for
  per-user limits); `prompt_cache_key` (accepted, see `ChatCompletionRequest`);
  `prompt_cache_retention: "in_memory"` (what vLLM's prefix cache is); `verbosity: "medium"`
  (OpenAI's default, which is what an unconstrained answer is); message `name`s and
  `refusal`s, and assistant messages' `refusal` parts (a refusal is what the assistant said).
- Legacy completions: `best_of: 1` and an empty `suffix` (no effect by OpenAI's definition).

Refused with a 400 naming the field (`REFUSED`, and the value rules in `VALUE_REASONS`):
output audio, moderation, predicted outputs, web search, explicit prompt-cache breakpoints
and lifetimes, image/audio/file input parts (the served model takes text only), and
`stream_options.include_obfuscation: true` (no padding of streamed chunks: a client that asks
for that side-channel mitigation is told it does not get it; `false` is accepted).

Not here: `tools`, `tool_choice`, `parallel_tool_calls`, `functions` (tool calling) and
`response_format` (structured outputs) have their own modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Field
from pydantic_core import PydanticCustomError

# OpenAI's logit_bias: token ids as decimal strings, biases in [-100, 100], at most 300.
LOGIT_BIAS_MAX = 300
TOKEN_ID_PATTERN = r"^[0-9]{1,10}$"
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=TOKEN_ID_PATTERN)],
         Annotated[float, Field(ge=-100.0, le=100.0)]],
    Field(max_length=LOGIT_BIAS_MAX),
]
ServiceTier = Literal["auto", "default"]
SERVED_TIER: Literal["default"] = "default"  # the one tier this server runs
Modalities = Annotated[list[Literal["text"]], Field(min_length=1, max_length=1)]
SafetyIdentifier = Annotated[str, Field(max_length=128)]  # OpenAI's documented maximum
Verbosity = Literal["medium"]
PromptCacheRetention = Literal["in_memory"]

_TEXT_ONLY = ("image_url", "input_audio", "file")


def _text_only(part: Any) -> Any:
    """A content part the served model can't read is refused here, by its own position
    (`messages.<i>.content.<j>`), before pydantic tries (and fails) every text shape."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _TEXT_ONLY:
        raise PydanticCustomError(
            "text_only", "the model takes text only: '{kind}' content parts are not supported "
            "(send the content as text parts)", {"kind": kind})
    return part


TextOnly = BeforeValidator(_text_only)


def _part_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "TextPart", "refusal": "RefusalPart"}.get(kind) if isinstance(kind, str) \
        else None


# Which part class a content part is, by its `type` (one error for an unknown type, instead
# of one per class; the tags are class names, which an error's `param` leaves out).
PartKind = Discriminator(
    _part_kind, custom_error_type="content_part_type",
    custom_error_message="a content part's type is 'text' (or 'refusal', in an assistant "
                         "message)")

# OpenAI fields this server refuses, each with the reason the 400 gives. They are not in the
# wire models, so the closed request schemas (and the OpenAPI document) refuse them too.
_NO_CACHE_CONTROL = ("the prefix cache here is automatic (vLLM's prefix caching shares every "
                     "common prompt prefix), with no breakpoints or lifetimes to set")
REFUSED: dict[str, str] = {
    "audio": "this server's models generate text only; there is no audio output",
    "moderation": "no moderation model runs on this server",
    "prediction": "predicted outputs are not supported: the engine takes no per-request "
                  "prediction to speculate with",
    "web_search_options": "this server has no web search",
    "prompt_cache_options": _NO_CACHE_CONTROL,
    "prompt_cache_breakpoint": _NO_CACHE_CONTROL,
    "functions": "deprecated by OpenAI: send `tools` instead",
    "function_call": "deprecated by OpenAI: send `tool_choice` instead",
}
# Why a field takes only the values it does (appended to pydantic's "Input should be ...").
VALUE_REASONS: dict[str, str] = {
    "service_tier": "this server has one processing tier, answered as 'default'; flex, "
                    "scale and priority processing are not offered",
    "modalities": "this server's models generate text only",
    "verbosity": "an answer is as long as the model makes it; only OpenAI's default, "
                 "'medium', has no effect to implement",
    "prompt_cache_retention": "the prefix cache lives in the engine's memory only",
    "best_of": "for best-of-n, ask for steering {\"strategy\": \"best_of_n\"} on "
               "/v1/chat/completions",
    "suffix": "the model has no fill-in-the-middle (insert) mode",
    "stream_options.include_obfuscation": "streamed chunks are not padded here (no "
                                          "`obfuscation` field); send false or leave it out",
}
# Why a value of a given type is refused, where the type is one OpenAI takes and we don't.
TYPE_REASONS: dict[tuple[str, str], str] = {
    ("prompt", "string_type"): "prompts are text here; token-id prompts are not supported",
}
# Fields whose nested positions are not fields: an error anywhere inside names the field.
_WHOLE = ("logit_bias", "modalities")
_INDEX = re.compile(r"\.\d+$")


def error_param(param: str | None) -> str | None:
    """The request field an error names: `logit_bias.x` is `logit_bias` (its keys are token
    ids, not fields)."""
    if param is None:
        return None
    top = param.split(".", 1)[0]
    return top if top in _WHOLE else param


def refusal_reason(param: str | None, error_type: str | None) -> str | None:
    """Why the server refuses this field (or this value of it), if it is one we refuse on
    purpose; None for an ordinary validation error."""
    if param is None:
        return None
    last = param.rsplit(".", 1)[-1]
    if error_type == "extra_forbidden":
        return REFUSED.get(last)
    field = _INDEX.sub("", param)
    return VALUE_REASONS.get(field) or TYPE_REASONS.get((field, error_type or ""))


def logit_bias_pairs(bias: Mapping[str, float] | None) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as the engine takes it: (token id, bias), in token order."""
    if not bias:
        return ()
    return tuple(sorted((int(token), float(value)) for token, value in bias.items()))


def role_violation(messages: Sequence[Any]) -> tuple[str, str] | None:
    """A cross-field rule of OpenAI's message shapes that one message class can't state: a
    `refusal` (field or content part) belongs to assistant messages only. Returns the 400's
    message and the field it names, or None."""
    for i, message in enumerate(messages):
        if message.role == "assistant":
            continue
        if getattr(message, "refusal", None) is not None:
            return (f"messages.{i}.refusal: only assistant messages carry a refusal",
                    f"messages.{i}.refusal")
        parts = message.content if isinstance(message.content, list) else []
        for j, part in enumerate(parts):
            if part.type == "refusal":
                return (f"messages.{i}.content.{j}: refusal parts belong to assistant messages "
                        "only", f"messages.{i}.content.{j}")
    return None
