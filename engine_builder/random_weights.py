"""Random-weight sources for ``build-llm --random-weights PRESET`` (benchmarks without
downloads). Presets are HF-style config.json files in ``configs/presets/``.

Speed is the point: a CPU draws only ~100 M normal samples per second, far slower than a
disk writes, so weights are not drawn element by element. Instead one seeded pool of
2**24 normal samples (scaled to std 0.02) is drawn per build, and every block of rows of
every tensor is a copy of a window of that pool, at an offset derived from
(seed, tensor name, block index). Values are normal with std 0.02, deterministic for a
seed, and independent of tp (a rank reading rows [a, b) gets exactly those rows of the
tp=1 tensor). Norm weights are ones and biases zeros, so activations stay finite.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from kiln.engine_builder.architectures import get_architecture
from kiln.engine_builder.errors import BuildOptionError
from kiln.engine_builder.format import SourceTensor, source_tensors
from kiln.engine_builder.options import available_presets, presets_dir

POOL_SIZE = 1 << 24
BLOCK_ELEMENTS = 1 << 22
WEIGHT_STD = 0.02


def load_preset(name: str) -> dict[str, Any]:
    """The HF-style config dict of preset ``name``; BuildOptionError listing presets if unknown."""
    path = presets_dir() / f"{name}.json"
    if not path.is_file():
        raise BuildOptionError(f"unknown preset {name!r} (available: {', '.join(available_presets()) or 'none'})")
    return json.loads(path.read_text())


class RandomSource:
    """A TensorSource whose tensors are drawn on demand; nothing is held between reads.

    Invariant: ``read(name, rows)`` equals ``read(name)[a:b]`` for any row range, so every
    tp sharding of one (preset, seed, dtype) sees the same model.
    """

    def __init__(self, config: dict[str, Any], seed: int, dtype: torch.dtype, preset: str = "custom"):
        self.config = config
        self.seed = seed
        self.preset = preset
        self.torch_dtype = dtype
        mc = get_architecture(config).model_config(config, tp=1, dtype=None)
        self.tensors: dict[str, SourceTensor] = source_tensors(mc, get_architecture(config).names)
        self._pool: torch.Tensor | None = None

    def shape(self, name: str) -> tuple[int, ...] | None:
        entry = self.tensors.get(name)
        return entry.shape if entry else None

    def dtype(self, name: str) -> torch.dtype:
        return self.torch_dtype

    def describe(self) -> dict[str, Any]:
        return {"random_weights": self.preset, "seed": self.seed, "architecture": self.config["architectures"][0]}

    def weight_amax(self) -> float:
        """The largest |value| any weight can hold (every weight is a window of the pool)."""
        return float(self._pool_tensor().abs().max())

    def _pool_tensor(self) -> torch.Tensor:
        if self._pool is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._pool = (torch.randn(POOL_SIZE, generator=gen) * WEIGHT_STD).to(self.torch_dtype)
        return self._pool

    def _offset(self, name: str, block: int, length: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{name}:{block}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % (POOL_SIZE - length + 1)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        parts = self.read_parts(name, rows)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read_parts(self, name: str, rows: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Rows [a, b) of ``name`` as dim-0 blocks; weight blocks are views of the pool (no copy)."""
        entry = self.tensors[name]
        shape = entry.shape
        a, b = rows if rows is not None else (0, shape[0])
        if entry.kind != "weight":  # norms = 1, biases = 0
            fill = 1.0 if entry.kind == "norm" else 0.0
            return [torch.full((b - a, *shape[1:]), fill, dtype=self.torch_dtype)]
        row_len = math.prod(shape[1:])
        if row_len > POOL_SIZE:
            raise ValueError(f"{name}: rows of {row_len} elements exceed the random pool")
        block_rows = max(1, BLOCK_ELEMENTS // row_len)
        pool = self._pool_tensor()
        parts, row = [], a
        while row < b:
            block = row // block_rows
            block_start = block * block_rows
            offset = self._offset(name, block, min(block_rows, shape[0] - block_start) * row_len)
            stop = min(b, block_start + block_rows)
            lo = offset + (row - block_start) * row_len
            parts.append(pool[lo : lo + (stop - row) * row_len].view(stop - row, *shape[1:]))
            row = stop
        return parts
