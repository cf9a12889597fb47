"""The engine cache: `serve-llm SOURCE` builds a model directory (or the `smollm2-135m` alias)
once into ``$KILN_CACHE_DIR/engines`` and serves the cached engine on later starts.

An entry's name is ``{model name}-{key}``, the key a hash of everything the engine depends
on: the source's files (names, sizes, modification times, config.json's bytes), the build
options, the engine format version and Kiln's version. A changed source or option therefore
builds a new entry; nothing is ever rebuilt in place. Builds are atomic (``build_engine``
renames a finished temporary folder into place), so two servers starting at once are safe:
the second to finish finds the entry there and uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kiln.engine_builder.errors import BuildOptionError, OutputError
from kiln.engine_builder.format import FORMAT_VERSION, MANIFEST_FILE
from kiln.engine_builder.options import DtypeError, canonical_dtype
from kiln.engine_builder.source import DEFAULT_ALIAS, kiln_cache_dir, resolve_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedEngine:
    """An engine directory ready to load. ``name`` is what it is a build of (the alias, or the
    source directory's name); ``built`` is True when this call built it."""

    path: Path
    name: str
    built: bool


def is_engine_dir(path: Path) -> bool:
    """A directory written by build-llm (it has the manifest)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def engine_cache_root() -> Path:
    return kiln_cache_dir() / "engines"


def cache_path(source: str, hf_dir: Path, options: Mapping[str, Any], root: Path) -> Path:
    """Where the engine of ``hf_dir`` built with ``options`` lives in the cache ``root``."""
    name = DEFAULT_ALIAS if source == DEFAULT_ALIAS else hf_dir.resolve().name
    return root / f"{name}-{cache_key(hf_dir, options)}"


def cache_key(hf_dir: Path, options: Mapping[str, Any]) -> str:
    """16 hex digits of a hash over the source's files, the build options and the versions."""
    from kiln.engine_builder.build import kiln_version

    files = {
        f.name: [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(Path(hf_dir).iterdir()) if f.is_file()
    }
    identity = {
        "source": str(Path(hf_dir).resolve()),
        "config_sha256": hashlib.sha256((Path(hf_dir) / "config.json").read_bytes()).hexdigest(),
        "files": files,
        "options": normalize_options(options),
        "format_version": FORMAT_VERSION,
        "kiln_version": kiln_version(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def normalize_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as the builder reads them: a dtype alias and its full name are one option."""
    out = dict(options)
    if out.get("dtype") is not None:
        try:
            out["dtype"] = canonical_dtype(out["dtype"])
        except DtypeError as e:
            raise BuildOptionError(str(e)) from None
    return out


def prepare_engine(source: str | os.PathLike[str], options: Mapping[str, Any] | None = None,
                   progress: bool = True) -> PreparedEngine:
    """An engine for ``source``: an engine directory as is, or a model directory / the alias
    built once into the cache with ``options`` (``build_engine`` keyword arguments)."""
    options = normalize_options(options or {})
    path = Path(source).expanduser()
    if is_engine_dir(path):
        if options:
            flags = ", ".join("--" + k.replace("_", "-") for k in options)
            raise BuildOptionError(f"{source} is an engine directory, already built; build options ({flags}) "
                                   "apply only to a model directory or 'smollm2-135m': rebuild it with build-llm")
        return PreparedEngine(path, path.resolve().name, built=False)
    hf_dir = resolve_source(source)  # the alias, a model directory, or a one-line error
    target = cache_path(str(source), hf_dir, options, engine_cache_root())
    name = target.name.rsplit("-", 1)[0]
    if is_engine_dir(target):
        logger.info("Using the engine of %s built earlier: %s", source, target)
        return PreparedEngine(target, name, built=False)
    logger.info("Building %s into the engine cache (once; later starts reuse it): %s", source, target)
    from kiln.engine_builder.build import build_engine

    try:
        # force: a leftover that is not an engine (no manifest) is replaced once the build is done
        build_engine(hf_dir, target, force=target.exists(), progress=progress, **options)
    except OutputError:
        if not is_engine_dir(target):  # not "someone else finished the same build first"
            raise
        return PreparedEngine(target, name, built=False)
    return PreparedEngine(target, name, built=True)
