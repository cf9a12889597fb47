"""Offline engine builder: Hugging Face checkpoint (or random-weight preset) -> Kiln engine
directory in TensorRT-LLM's checkpoint layout. See ``format`` for the layout itself.

The public names are imported lazily, so that the command lines (``--help``) and
``kiln.engine_builder.errors`` / ``options`` do not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BuildSummary", "EngineBuilderError", "EngineFormatError", "LoadedEngine", "ModelConfig",
    "build_engine", "load_engine", "resolve_source",
]

_WHERE = {
    "BuildSummary": "kiln.engine_builder.build",
    "build_engine": "kiln.engine_builder.build",
    "EngineBuilderError": "kiln.engine_builder.errors",
    "EngineFormatError": "kiln.engine_builder.errors",
    "LoadedEngine": "kiln.engine_builder.format",
    "ModelConfig": "kiln.engine_builder.format",
    "load_engine": "kiln.engine_builder.format",
    "resolve_source": "kiln.engine_builder.source",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kiln.engine_builder' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
