"""Streaming safetensors I/O: a writer that never holds more than one tensor, and a reader
that reads one tensor (or a range of its rows) with plain file reads.

The safetensors format: an 8-byte little-endian header length N, then N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(padded with spaces to a multiple of 8), then the raw little-endian tensor bytes, with
offsets relative to the end of the header. Because names, dtypes and shapes are known
before any data is produced, the header is written first and tensors are appended in order.

The reader uses ``readinto`` instead of a memory map on purpose: pages of a mapped file
count towards the process's resident set, so mapping a 16 GB source would make a build
look (and, under pressure, behave) like it holds the whole model.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from kiln.engine_builder.errors import CorruptSafetensorsError

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor to be written (its bytes come later)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def encode_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Return the length prefix plus the space-padded JSON header for ``specs`` in order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        header[spec.name] = {
            "dtype": DTYPE_TO_ST[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data section 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def file_size(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """Exact size in bytes of the file that a writer over ``specs`` produces."""
    return len(encode_header(specs, metadata)) + sum(s.nbytes for s in specs)


class StreamingSafetensorsWriter:
    """Writes one safetensors file tensor by tensor.

    Invariants: the header (all names, dtypes, shapes) is on disk before any data; tensors
    are written exactly in the order of ``specs`` with exactly the declared dtype and shape
    (a tensor may arrive as several row blocks, concatenated along dim 0); ``close()``
    refuses a file with tensors missing. The SHA-256 of every byte written is kept.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._file: BinaryIO | None = open(self.path, "wb")
        self._emit(encode_header(self.specs, metadata))

    def _emit(self, data) -> None:
        assert self._file is not None, "writer is closed"
        self._file.write(data)
        self._sha.update(data)
        self._bytes += len(memoryview(data).cast("B"))

    def write(self, name: str, *parts: torch.Tensor) -> None:
        """Append tensor ``name``; ``parts`` are row blocks whose dim-0 concatenation is it."""
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path.name}: unexpected extra tensor {name!r}")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"{self.path.name}: expected tensor {spec.name!r} next, got {name!r}")
        rows = 0
        for part in parts:
            if part.dtype != spec.dtype or tuple(part.shape[1:]) != spec.shape[1:]:
                raise ValueError(
                    f"{name}: part {part.dtype} {tuple(part.shape)} does not fit {spec.dtype} {spec.shape}"
                )
            rows += part.shape[0] if part.dim() else 1
        if rows != (spec.shape[0] if spec.shape else 1):
            raise ValueError(f"{name}: parts hold {rows} rows, expected shape {spec.shape}")
        for part in parts:
            self._emit(part.contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def bytes_written(self) -> int:
        return self._bytes

    def close(self) -> None:
        """Flush and close; raise if some declared tensor was never written."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._next != len(self.specs):
            raise ValueError(f"{self.path.name}: only {self._next} of {len(self.specs)} tensors written")

    def abort(self) -> None:
        """Close without the completeness check (the caller discards the file)."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives inside a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse and validate the header of ``path``; raise CorruptSafetensorsError if it is bad."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if n < 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptSafetensorsError(f"{path}: not a valid safetensors file (bad header length)")
            raw = json.loads(f.read(n))
    except OSError as exc:
        raise CorruptSafetensorsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptSafetensorsError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(raw, dict):
        raise CorruptSafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    tensors: dict[str, StoredTensor] = {}
    for name, info in raw.items():
        tensors[name] = _parse_entry(path, name, info, data_start=8 + n, file_size=size)
    return tensors, metadata


def _parse_entry(path: Path, name: str, info: object, data_start: int, file_size: int) -> StoredTensor:
    try:
        dtype = ST_TO_DTYPE[info["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        begin, end = (int(o) for o in info["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise CorruptSafetensorsError(f"{path}: bad header entry for tensor {name!r}") from None
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise CorruptSafetensorsError(f"{path}: tensor {name!r} has inconsistent offsets")
    if data_start + end > file_size:
        raise CorruptSafetensorsError(f"{path}: truncated (tensor {name!r} runs past the end)")
    return StoredTensor(dtype, shape, data_start + begin, data_start + end)


def read_tensor(path: Path, stored: StoredTensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a tensor (or rows ``[a, b)`` of it, along dim 0) into fresh memory."""
    shape = list(stored.shape)
    begin = stored.begin
    if rows is not None:
        a, b = rows
        row_bytes = (stored.end - stored.begin) // max(shape[0], 1)
        begin += a * row_bytes
        shape[0] = b - a
    out = torch.empty(shape, dtype=stored.dtype)
    buf = out.reshape(-1).view(torch.uint8).numpy()
    with open(path, "rb") as f:
        f.seek(begin)
        if f.readinto(buf) != len(buf):
            raise CorruptSafetensorsError(f"{path}: truncated while reading a tensor")
    return out
