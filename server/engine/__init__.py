"""Inference engine: continuous batching of recurrent decoding (no HTTP framework imports here)."""

from server.engine.detokenizer import Detokenizer
from server.engine.engine import Engine, RequestStream
from server.engine.types import (
    EngineConfig,
    EngineOverloaded,
    EngineRequest,
    EngineSamplingParams,
    IterationStats,
    RequestOutput,
    RequestTimings,
    TokenLogprob,
    Usage,
)

__all__ = [
    "Detokenizer",
    "Engine",
    "EngineConfig",
    "EngineOverloaded",
    "EngineRequest",
    "EngineSamplingParams",
    "IterationStats",
    "RequestOutput",
    "RequestStream",
    "RequestTimings",
    "TokenLogprob",
    "Usage",
]
