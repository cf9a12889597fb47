"""The paged KV cache tensors and how many blocks they get.

Layout (DESIGN.md): per layer ``kv[layer]`` of shape
``[2, num_blocks, block_size, num_kv_heads_per_rank, head_size]``, index 0 = K, 1 = V.
On GPU the size comes from a profiled peak (see ``gpu_num_blocks``); on the CPU from an
explicit token budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kiln.scheduler.block_manager import cdiv

logger = logging.getLogger(__name__)

_CPU_DEFAULT_MAX_BYTES = 2 << 30


class KVCacheTooSmallError(ValueError):
    """The KV budget cannot hold even one sequence of max_model_len tokens."""


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one layer's cache block; ``block_bytes`` counts K and V of all layers."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_size * itemsize

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)


def _check_fits(spec: KVCacheSpec, num_blocks: int, max_model_len: int, source: str) -> int:
    needed = spec.blocks_for_tokens(max_model_len)
    if num_blocks < needed:
        raise KVCacheTooSmallError(
            f"KV cache from {source} holds {num_blocks * spec.block_size} tokens, fewer than one "
            f"max_model_len sequence ({max_model_len}); lower max_model_len or give the cache more memory"
        )
    return num_blocks


def explicit_num_blocks(spec: KVCacheSpec, num_tokens: int, max_model_len: int) -> int:
    """Blocks for an explicit ``num_kv_cache_tokens`` budget."""
    return _check_fits(spec, spec.blocks_for_tokens(num_tokens), max_model_len, f"num_kv_cache_tokens={num_tokens}")


def cpu_num_blocks(spec: KVCacheSpec, max_model_len: int) -> int:
    """CPU default: room for max(4 * max_model_len, 16384) tokens, capped near 2 GiB, but
    never less than one max_model_len sequence."""
    wanted = spec.blocks_for_tokens(max(4 * max_model_len, 16384))
    capped = max(1, _CPU_DEFAULT_MAX_BYTES // spec.block_bytes)
    return max(min(wanted, capped), spec.blocks_for_tokens(max_model_len))


def gpu_num_blocks(
    spec: KVCacheSpec, device: torch.device, fraction: float, peak_bytes: int, max_model_len: int
) -> int:
    """Blocks that fit in ``fraction`` of the device memory next to the profiled peak.

    ``peak_bytes`` is torch's max allocated memory during the profiling forward pass: weights
    plus the activations of the largest batch. Memory other processes hold is subtracted too.
    """
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = max(0, total - free - torch.cuda.memory_reserved(device))
    available = int(total * fraction) - peak_bytes - used_by_others
    num_blocks = max(0, available // spec.block_bytes)
    logger.info(
        "GPU memory: total %.2f GiB, fraction %.2f, profiled peak %.2f GiB, other processes %.2f GiB",
        total / 2**30, fraction, peak_bytes / 2**30, used_by_others / 2**30,
    )
    return _check_fits(spec, num_blocks, max_model_len, f"kv_cache_fraction={fraction}")


class KVCache:
    """The per-layer KV tensors. Invariant: ``len(self.kv) == spec.num_layers`` and every
    tensor has the DESIGN.md layout with ``num_blocks`` blocks on one device."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
        self.kv = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens, %.3f GiB (%s, %s)",
            num_blocks, spec.block_size, num_blocks * spec.block_size,
            num_blocks * spec.block_bytes / 2**30, spec.dtype, device,
        )
