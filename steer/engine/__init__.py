"""Generation backends behind one small ABC (see `base.Engine`).

Imports nothing else of Steer's. Backends: `vllm_engine.VllmEngine` (in-process vLLM).
"""

from steer.engine.base import (
    Engine,
    EngineDead,
    EngineError,
    EngineNotReady,
    EngineRequestError,
    PromptTooLong,
    UnknownAdapter,
)
from steer.engine.types import (
    AdapterRef,
    Capabilities,
    EngineHealth,
    Generation,
    Message,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
    TokenLogprob,
    TopLogprob,
)

__all__ = [
    "AdapterRef",
    "Capabilities",
    "Engine",
    "EngineDead",
    "EngineError",
    "EngineHealth",
    "EngineNotReady",
    "EngineRequestError",
    "Generation",
    "Message",
    "Prompt",
    "PromptTooLong",
    "SamplingParams",
    "StreamDelta",
    "StreamEnd",
    "TokenLogprob",
    "TopLogprob",
    "UnknownAdapter",
]
