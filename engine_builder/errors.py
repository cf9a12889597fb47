"""Exceptions of the engine builder. Each carries one line that names the problem; the CLI
prints it without a traceback. All derive from ``EngineBuilderError``."""

from __future__ import annotations


class EngineBuilderError(Exception):
    """Base class: a bad input or environment the user can fix."""


class SourceError(EngineBuilderError):
    """The source checkpoint is missing, unreadable or incomplete."""


class CorruptSafetensorsError(SourceError):
    """A safetensors file whose header or data is damaged."""


class UnsupportedArchitectureError(EngineBuilderError):
    """The source's architecture (or one of its options) has no converter."""


class BuildOptionError(EngineBuilderError, ValueError):
    """An option that does not fit the model: tp, dtype, preset name."""


class OutputError(EngineBuilderError):
    """The output directory exists (without --force) or the disk is too small."""


class EngineFormatError(EngineBuilderError):
    """An engine directory that cannot be loaded: missing files, unknown version, bad rank."""
