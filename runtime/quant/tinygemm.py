"""PyTorch's built-in W4A16 kernel, tinygemm (``torch._weight_int4pack_mm``, the one gpt-fast and
torchao use), as ``Int4Linear``'s product below ``TINYGEMM_BELOW_ROWS`` rows on CUDA with bf16.

tinygemm computes y = x @ W^T, W = (u - 8) * s + z per group of g inputs, u an unsigned nibble:
with u = q + 8 that is exactly Kiln's W = q * s + z (engine_builder/int4.py), accumulated in fp32
and rounded to bf16 once. Its operands, made once at load from the engine's packing:

  * weight: u as uint8 [N, K/2] with the EVEN column in the HIGH nibble (torch >= 2.5's order),
    then ``torch._convert_weight_to_int4pack(bytes, inner_k_tiles)`` -> int32
    [N/8, K/(16 inner_k_tiles), 32, inner_k_tiles/2], its tensor-core tile layout. Tiles of 8
    outputs are the outer dimension, so linears fused into one GEMM concatenate along dim 0;
  * scales_and_zeros: stack((s, z), -1), [K/g, N, 2] in bf16 (z = 0 for symmetric groups).

What it accepts (aten/src/ATen/native/cuda/int4mm.cu): contiguous 2-D bf16 activations (not
fp16 or fp32), N % 8 == 0, K a multiple of 16 * inner_k_tiles (8, 4 or 2: the largest that
divides K is taken), groups of 32/64/128/256, sm >= 80. ``tinygemm_accepts`` says whether a
linear qualifies; every other one keeps the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.torch_version import TorchVersion

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = (8, 4, 2)  # widest first: 8 inner k tiles load 16 bytes at once


def inner_k_tiles(k: int) -> int | None:
    """The widest inner_k_tiles whose 16 * inner_k_tiles divides K, or None (tinygemm refuses K)."""
    return next((t for t in INNER_K_TILES if k % (16 * t) == 0), None)


def tinygemm_accepts(n: int, k: int, group_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tinygemm runs an [N, K] linear with this group size on bf16 activations on ``device``."""
    if device.type != "cuda" or dtype != torch.bfloat16 or TorchVersion(torch.__version__) < "2.5":
        return False  # torch < 2.5 packs another byte order (int32 input): not this module's operands
    if group_size not in TINYGEMM_GROUP_SIZES or k % group_size or n % 8 or inner_k_tiles(k) is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def tinygemm_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The engine's packing (int8 [N, K/2], byte j = q[2j] low nibble | q[2j+1] high nibble, two's
    complement) -> tinygemm's input bytes (uint8 [N, K/2], u = q + 8, even column high).

    Per nibble u = q + 8 is the two's-complement nibble with its top bit flipped (q = -8 is
    0b1000 -> 0, q = 7 is 0b0111 -> 15): swap the nibbles and xor 0x88, byte by byte.
    """
    b = packed.view(torch.uint8)
    return ((b << 4) | (b >> 4)) ^ 0x88


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """tinygemm's [K/g, N, 2] (scale, zero) pairs from Kiln's s and z [K/g, N] (z None: zero)."""
    z = torch.zeros_like(scales) if zeros is None else zeros.to(scales.dtype)
    return torch.stack((scales, z), dim=-1).contiguous()


@dataclass(frozen=True)
class TinygemmWeight:
    """One linear's INT4 weight in tinygemm's layout; calling it is x @ W^T.

    Invariants: ``packed`` is ``_convert_weight_to_int4pack``'s tile layout of the same q as the
    linear's Kiln-layout weight, ``scales_and_zeros`` its s and z, both on the same CUDA device;
    x passed in is bf16 [M, K].
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int

    @classmethod
    def from_engine(cls, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> TinygemmWeight:
        """From the engine's packing (on the CUDA device; ``tinygemm_accepts`` must hold)."""
        tiles = inner_k_tiles(packed.shape[1] * 2)
        assert tiles is not None, "tinygemm_accepts(...) is the caller's check"
        weight = torch._convert_weight_to_int4pack(tinygemm_bytes(packed).contiguous(), tiles)
        return cls(weight, scales_and_zeros(scales, zeros), group_size)

    @classmethod
    def concat(cls, parts: Sequence[TinygemmWeight | None]) -> TinygemmWeight | None:
        """The parts' outputs side by side (None when any part has no tinygemm weight)."""
        if any(p is None for p in parts):
            return None
        ok: list[TinygemmWeight] = list(parts)  # type: ignore[arg-type]
        return cls(torch.cat([p.packed for p in ok]), torch.cat([p.scales_and_zeros for p in ok], dim=1),
                   ok[0].group_size)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0] * 8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # tinygemm would launch an empty grid
            return x.new_empty((0, self.out_features))
        return torch._weight_int4pack_mm(x.contiguous(), self.packed, self.group_size, self.scales_and_zeros)
