"""Generation backends behind one small ABC (see `base.Engine`).

Imports nothing else of Steer's. Backends: `vllm_engine.VllmEngine` (in-process vLLM).
"""

from steer.engine.base import (
    AdapterConflict,
    Engine,
    EngineDead,
    EngineError,
    EngineNotReady,
    EngineRequestError,
    InvalidAdapter,
    PromptTooLong,
    UnknownAdapter,
)
from steer.engine.types import (
    AdapterRef,
    Capabilities,
    Constraint,
    EngineHealth,
    Generation,
    Message,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
    TokenLogprob,
    Tool,
    ToolCall,
    TopLogprob,
)

__all__ = [
    "AdapterConflict",
    "AdapterRef",
    "Capabilities",
    "Constraint",
    "Engine",
    "EngineDead",
    "EngineError",
    "EngineHealth",
    "EngineNotReady",
    "EngineRequestError",
    "Generation",
    "InvalidAdapter",
    "Message",
    "Prompt",
    "PromptTooLong",
    "SamplingParams",
    "StreamDelta",
    "StreamEnd",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "TopLogprob",
    "UnknownAdapter",
]
