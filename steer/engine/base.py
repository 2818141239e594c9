"""The engine seam: one small ABC every backend implements.

Exception tree (inner layers raise; `service/errors.py` maps these to HTTP):

    EngineError
    ├── EngineNotReady       not loaded yet, shutting down, or draining
    ├── EngineDead           the backend crashed; nothing will succeed until a restart
    ├── PromptTooLong        prompt (+ max_tokens) does not fit the context window
    ├── UnknownAdapter       a LoRA name the engine does not hold
    ├── InvalidAdapter       an adapter that must not be loaded (path, files, rank, shapes)
    ├── AdapterConflict      the name is taken, or the adapter is busy (unload while in use)
    └── EngineRequestError   the backend refused this one request (bad params)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence

from steer.engine.types import (
    AdapterRef,
    Capabilities,
    Constraint,
    EngineHealth,
    Generation,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
)


class EngineError(Exception):
    """Base of everything an engine raises on purpose."""


class EngineNotReady(EngineError):
    pass


class EngineDead(EngineError):
    pass


class PromptTooLong(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        asked = prompt_tokens + (max_tokens or 0)
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {asked} tokens ({prompt_tokens} in the prompt, {max_tokens or 0} for "
            "the completion). Please reduce the length of the prompt or of max_tokens."
        )

    @property
    def prompt_alone_too_long(self) -> bool:
        return self.prompt_tokens >= self.max_model_len


class UnknownAdapter(EngineError):
    pass


class InvalidAdapter(EngineError):
    """`reason` is a short code (`path_outside_root`, `pickle_weights_refused`, ...);
    `field` says which input was wrong: "path" or "name"."""

    def __init__(self, message: str, reason: str, field: str = "path") -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field


class AdapterConflict(EngineError):
    """`reason`: `adapter_exists` (name taken) or `adapter_in_use` (unload timed out)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class EngineRequestError(EngineError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field the backend named, when it named one


class Engine(ABC):
    """Generation backend. Every method is safe to call concurrently."""

    model_name: str
    max_model_len: int
    capabilities: Capabilities

    @abstractmethod
    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> list[Generation]:
        """Generate `params.n` sequences for each prompt, all submitted at once so the
        backend batches them. Returned prompt-major: prompt 0's n sequences first."""

    @abstractmethod
    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        """Yield deltas as tokens are produced, then one `StreamEnd`.
        Closing the iterator early aborts the request in the backend."""

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort every in-flight sequence started under `request_id`."""

    @abstractmethod
    async def health(self) -> EngineHealth: ...

    @abstractmethod
    def count_prompt_tokens(self, prompt: Prompt) -> int: ...

    async def count_prompt_tokens_async(self, prompt: Prompt) -> int:
        """The same count, for callers on the event loop: a backend whose tokenizing is slow
        for long prompts does it off the loop."""
        return self.count_prompt_tokens(prompt)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        raise EngineRequestError("this engine does not support LoRA adapters")

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        raise EngineRequestError("this engine does not support LoRA adapters")

    def adapters(self) -> list[AdapterRef]:
        return []

    async def check_constraint(self, constraint: Constraint) -> None:  # noqa: B027 - optional
        """Raise `EngineRequestError` for a decoding constraint this backend cannot
        enforce, before any generation (so a refusal is never a failure mid-search or
        mid-stream). The default accepts every constraint."""
