"""tinygemm's operands (runtime/quant/tinygemm.py) against their definition: u = q + 8 per
nibble with the even column in the high nibble, (scale, zero) pairs [K/g, N, 2], and
W = (u - 8) * s + z. torch's CPU build of the same kernel checks them against float64."""

from __future__ import annotations

import pytest
import torch

from kiln.engine_builder.int4 import pack_int4
from kiln.runtime.quant.tinygemm import inner_k_tiles, scales_and_zeros, tinygemm_accepts, tinygemm_bytes


def _quantized(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    s = torch.rand(k // group, n, generator=gen) * 0.02 + 0.005
    z = torch.randn(k // group, n, generator=gen) * 0.02
    return q, s, z


def _unsigned_nibbles(b: torch.Tensor) -> torch.Tensor:
    """int32 u [N, K] from tinygemm's bytes, read as the definition says (even column high)."""
    b = b.to(torch.int32)
    return torch.stack((b >> 4, b & 0xF), dim=-1).flatten(-2)


def test_bytes_hold_q_plus_8_with_the_even_column_high() -> None:
    q, _, _ = _quantized(8, 64, 32, 0)
    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every value at both nibble positions
    q[1, :16] = torch.arange(7, -9, -1, dtype=torch.int8)
    b = tinygemm_bytes(pack_int4(q))
    assert b.dtype == torch.uint8 and b.shape == (8, 32)
    assert torch.equal(b >> 4, (q[:, 0::2] + 8).to(torch.uint8))
    assert torch.equal(b & 0xF, (q[:, 1::2] + 8).to(torch.uint8))


def test_scales_and_zeros_pairs() -> None:
    _, s, z = _quantized(16, 128, 64, 1)
    sz = scales_and_zeros(s, z)
    assert sz.shape == (2, 16, 2) and sz.is_contiguous()
    assert torch.equal(sz[..., 0], s) and torch.equal(sz[..., 1], z)
    assert torch.equal(scales_and_zeros(s, None)[..., 1], torch.zeros_like(s))


# torch's CPU tinygemm (_weight_int4pack_mm_for_cpu) ships with the pinned torch (README): its
# absence fails this test rather than skipping the check of our operands.
@pytest.mark.parametrize(("group", "zero"), [(32, True), (128, False), (64, True)])
def test_torch_cpu_int4pack_mm_on_our_operands_matches_float64(group: int, zero: bool) -> None:
    """The CPU kernel computes (u - 8) * s + z on unpacked u; a wrong nibble order, pair order
    or sign convention would be off by the size of the output itself, not bf16 rounding."""
    n, k = 32, 256  # the CPU packing wants N % 16
    q, s, z = _quantized(n, k, group, 2)
    s, z = s.to(torch.bfloat16), z.to(torch.bfloat16)
    u = _unsigned_nibbles(tinygemm_bytes(pack_int4(q)))
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, inner_k_tiles(k))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scales_and_zeros(s, z if zero else None))
    w = q.double() * s.double().t().repeat_interleave(group, 1)
    if zero:
        w = w + z.double().t().repeat_interleave(group, 1)
    want = x.double() @ w.T
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_inner_k_tiles_is_the_widest_dividing_one() -> None:
    assert [inner_k_tiles(k) for k in (4096, 14336, 576, 544, 48)] == [8, 8, 4, 2, None]


@pytest.mark.parametrize(("n", "k", "group", "dtype", "device"), [
    (64, 128, 32, torch.bfloat16, "cpu"),  # tinygemm is CUDA-only here
    (64, 128, 32, torch.float16, "cuda"),  # bf16 activations only
    (64, 128, 32, torch.float32, "cuda"),
    (60, 128, 32, torch.bfloat16, "cuda"),  # N % 8
    (64, 48, 16, torch.bfloat16, "cuda"),  # group 16; K not a multiple of 32
])
def test_refused_linears_keep_the_triton_path(n: int, k: int, group: int, dtype: torch.dtype, device: str) -> None:
    assert not tinygemm_accepts(n, k, group, dtype, torch.device(device))
