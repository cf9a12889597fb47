"""Offline engine builder: Hugging Face checkpoint (or random-weight preset) -> Kiln engine
directory in TensorRT-LLM's checkpoint layout. See ``format`` for the layout itself."""

from kiln.engine_builder.build import BuildSummary, build_engine
from kiln.engine_builder.errors import EngineBuilderError, EngineFormatError
from kiln.engine_builder.format import LoadedEngine, ModelConfig, load_engine
from kiln.engine_builder.source import resolve_source

__all__ = [
    "BuildSummary", "EngineBuilderError", "EngineFormatError", "LoadedEngine", "ModelConfig",
    "build_engine", "load_engine", "resolve_source",
]
