"""Kiln runtime: executes an engine directory (model, KV cache, sampler, engine loop).

The public names are imported lazily so that ``import kiln.runtime.kernels`` (or the
config alone) does not pull in the whole engine.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "EngineConfig",
    "RequestOutput",
    "CompletionOutput",
    "TokenLogprob",
    "RequestMetrics",
    "EngineStats",
]

_WHERE = {
    "LLM": "kiln.runtime.llm",
    "LLMEngine": "kiln.runtime.engine",
    "SamplingParams": "kiln.scheduler.sampling_params",
    "EngineConfig": "kiln.runtime.config",
    "RequestOutput": "kiln.runtime.outputs",
    "CompletionOutput": "kiln.runtime.outputs",
    "TokenLogprob": "kiln.runtime.outputs",
    "RequestMetrics": "kiln.runtime.outputs",
    "EngineStats": "kiln.runtime.outputs",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kiln.runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
