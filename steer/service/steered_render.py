"""A steered request's results in OpenAI's shapes: usage with its details, the choices of a
chat completion or a text completion, and the stream's chunks for each endpoint.

Owns only rendering; running the searches is `steer.search`, the flow `steering.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from steer.engine import StreamDelta
from steer.search import SteerResult
from steer.service.protocol import (
    AssistantMessage,
    ChatChoice,
    CompletionChoice,
    SteeringUsage,
    Usage,
)
from steer.service.serving import (
    ChatRenderer,
    CompletionRenderer,
    _chat_logprobs,
    _completion_logprobs,
)
from steer.service.tools import Answer


def steered_usage(results: Sequence[SteerResult]) -> Usage:
    """Every search's calls summed (prompt, completion, cached), `reasoning_tokens` what they
    spent beyond the returned answers, and `usage.steering`."""
    cached = [r.cached_tokens for r in results if r.cached_tokens is not None]
    usage = Usage.of(
        sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results),
        reasoning_tokens=sum(r.reasoning_tokens for r in results),
        cached_tokens=sum(cached) if cached else None,
    )
    usage.steering = SteeringUsage(
        model_calls=sum(r.model_calls for r in results),
        candidates=sum(r.candidates for r in results),
        pruned=sum(r.pruned for r in results),
        budget_exhausted=any(r.budget_exhausted for r in results),
    )
    return usage


def chat_choices(results: Sequence[SteerResult], answer: Answer | None = None
                 ) -> list[ChatChoice]:
    """`answer`: a request with tools reads each result as content or calls (`tools.py`)."""
    choices = []
    for r in results:
        message, finish = (answer(r.text, r.finish_reason) if answer is not None
                           else (AssistantMessage(content=r.text), r.finish_reason))
        choices.append(ChatChoice(index=r.index, message=message,
                                  logprobs=_chat_logprobs(r.logprobs), finish_reason=finish))
    return choices


def completion_choices(results: Sequence[SteerResult], echo: Sequence[str]
                       ) -> list[CompletionChoice]:
    """`echo[i]`: the text put before choice i's answer (its prompt, or "")."""
    return [CompletionChoice(index=r.index, text=echo[r.index] + r.text,
                             logprobs=_completion_logprobs(r.logprobs),
                             finish_reason=r.finish_reason)
            for r in results]


@dataclass
class SteeredChunks:
    """The stream's chunks for one endpoint: progress (chat only: a text completion chunk
    has no place for it), answer deltas, a choice's finish, the usage chunk."""

    out: ChatRenderer | CompletionRenderer

    @property
    def chat(self) -> bool:
        return isinstance(self.out, ChatRenderer)

    def start(self, n: int) -> list[str]:
        return self.out.start(n)

    def progress(self, event: dict[str, Any], index: int) -> list[str]:
        if isinstance(self.out, ChatRenderer):
            return [self.out.progress(event, index)]
        return []

    def delta(self, d: StreamDelta) -> list[str]:
        # The finish goes out with the choice's result (and its trace), not with its tokens.
        if not d.text and not d.logprobs:
            return []
        return self.out.delta(replace(d, finish_reason=None))

    def finish(self, result: SteerResult, steering: dict[str, Any] | None) -> list[str]:
        if isinstance(self.out, ChatRenderer):
            if self.out.tools is not None:  # what the call stream held back, then the finish
                return self.out.tool_events(result.index, "", result.finish_reason,
                                            steering=steering)
            return [self.out.finish(result.finish_reason, steering, result.index)]
        return [self.out.finish(result.finish_reason, result.index)]

    def usage(self, usage: Usage) -> str:
        return self.out.usage(usage)
