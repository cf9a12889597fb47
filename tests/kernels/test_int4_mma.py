"""The tensor-core W4A16 kernel's layout and arithmetic (runtime/kernels/int4_mma.py) on the CPU:
``repack`` places each nibble where the module docstring (PTX's m16n8k16 A fragment) says,
``emulate`` (the kernel's fold, lane by lane, in float64) equals x @ (q s + z)^T, and the CUDA
source is complete for every launch shape. The kernel itself runs in tests/runtime/test_int4_gpu.py
and scripts/check_int4_mma_gpu.py."""

from __future__ import annotations

import pytest
import torch

from kiln.engine_builder.int4 import dequantize, pack_int4
from kiln.runtime.kernels.int4_mma import (MmaConfig, emulate, pack_scales, repack, row_tiles, source,
                                           supported)


def _weights(n: int, k: int, group: int, dtype: torch.dtype, zero: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(k // group, n, generator=gen) * 0.01 + 1e-3).to(dtype)
    z = (torch.randn(k // group, n, generator=gen) * 0.01).to(dtype) if zero else None
    return q, s, z


def test_repack_puts_each_nibble_where_the_docstring_says() -> None:
    n, k = 32, 128
    q, _, _ = _weights(n, k, 64, torch.bfloat16, False, 0)
    u = q.to(torch.int64) + 8
    words = repack(pack_int4(q)).to(torch.int64) & 0xFFFFFFFF
    assert words.shape == (n // 16, k // 64, 32, 4) and repack(pack_int4(q)).dtype == torch.int32
    for tile in range(n // 16):
        for block in range(k // 64):
            for lane in range(32):
                r, c = divmod(lane, 4)
                for t in range(4):
                    p = 64 * block + 32 * (t // 2) + 8 * c + 4 * (t % 2)
                    n0, n1 = 16 * tile + r, 16 * tile + r + 8
                    want = {0: u[n0, p], 4: u[n0, p + 1], 1: u[n1, p], 5: u[n1, p + 1],
                            2: u[n0, p + 2], 6: u[n0, p + 3], 3: u[n1, p + 2], 7: u[n1, p + 3]}
                    word = int(words[tile, block, lane, t])
                    assert all((word >> (4 * pos)) & 0xF == int(v) for pos, v in want.items())


@pytest.mark.parametrize("dtype,magic", [(torch.bfloat16, 128.0), (torch.float16, 1024.0)])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("zero", [True, False])
def test_kernel_arithmetic_equals_the_dequantized_product(dtype: torch.dtype, magic: float, group: int,
                                                          zero: bool) -> None:
    """The fold s * sum x (MAGIC + u) + (z - (MAGIC + 8) s) * sum x over the repacked fragments
    is x @ (q s + z)^T (float64 both; only the summation order differs)."""
    n, k = 48, 512
    q, s, z = _weights(n, k, group, dtype, zero, group)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = x.double() @ dequantize(q, s, z, group).double().t()
    got = emulate(x, repack(pack_int4(q)), pack_scales(s, z), group, magic)
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_a_wrong_layout_is_caught_by_the_emulation() -> None:
    """The check above can fail: rows of two tiles swapped give a different product."""
    q, s, z = _weights(32, 128, 64, torch.bfloat16, True, 3)
    x = torch.randn(2, 128).to(torch.bfloat16)
    words = repack(pack_int4(q)).flip(0)
    want = x.double() @ dequantize(q, s, z, 64).double().t()
    assert float((emulate(x, words, pack_scales(s, z), 64) - want).abs().max()) > 1e-3


def test_pack_scales_keeps_the_bits_of_scale_and_zero() -> None:
    _, s, z = _weights(16, 128, 32, torch.bfloat16, True, 4)
    sz = pack_scales(s, z)
    assert sz.dtype == torch.int32 and sz.shape == s.shape
    assert torch.equal((sz & 0xFFFF).to(torch.int16).view(torch.bfloat16), s)
    assert torch.equal(((sz >> 16) & 0xFFFF).to(torch.int16).view(torch.bfloat16), z)
    assert torch.equal((pack_scales(s, None) >> 16), torch.zeros_like(sz))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [MmaConfig(1, 8, 2), MmaConfig(2, 4, 1), MmaConfig(1, 16, 3)])
@pytest.mark.parametrize("mt", [1, 2, 4])
def test_source_has_every_placeholder_filled(dtype: torch.dtype, config: MmaConfig, mt: int) -> None:
    src = source(dtype, mt, config, 128)
    assert "@" not in src and "kiln_w4a16_mma" in src
    assert f"#define WARPS {config.warps}" in src and f"#define MT {mt}" in src


def test_row_tiles_and_what_the_kernel_takes() -> None:
    assert [row_tiles(m) for m in (1, 8, 9, 16, 17, 32)] == [1, 1, 2, 2, 4, 4]
    cpu = torch.device("cpu")
    assert not supported(64, 128, 64, torch.bfloat16, cpu)  # CUDA only
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        assert not supported(72, 128, 64, torch.bfloat16, gpu)  # N % 16
        assert not supported(64, 96, 32, torch.bfloat16, gpu)  # K % 64
        assert not supported(64, 128, 64, torch.float32, gpu)  # fp32 activations


def test_unknown_small_route_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.runtime.quant.int4 import MMA_ENV, select_int4_ops

    class Ops:
        name = "triton"

    monkeypatch.setenv(MMA_ENV, "marlin")
    with pytest.raises(ValueError, match="KILN_INT4_SMALL"):
        select_int4_ops(Ops())


def test_weight_ring_launch_shapes() -> None:
    """The shared-memory ring: its size, its source switch, and the tuned ring shapes (measured at
    group 128) kept only for group 128; other groups get the same shape on registers."""
    from kiln.runtime.kernels.int4_mma import TUNED, pick_config

    ring = MmaConfig(4, 4, 1, 3)
    assert ring.ring_bytes(128) == 4 * 3 * 4 * 2 * 512 and ring.ring_bytes(32) == ring.ring_bytes(64) == 4 * 3 * 4 * 512
    assert MmaConfig(1, 8, 2).ring_bytes(128) == 0
    src = source(torch.bfloat16, 4, ring, 128)
    assert "#define STAGES 3" in src and "@" not in src and "cp.async.cg.shared.global" in src
    assert "#define STAGES 0" in source(torch.bfloat16, 1, MmaConfig(1, 8, 2), 128)
    ringed = {key: cfg for key, cfg in TUNED.items() if cfg.stages}
    assert ringed and all(mc == 32 for _, _, mc in ringed)  # a win at 17-32 rows only
    for (n, k, _), cfg in ringed.items():
        assert pick_config(n, k, 32, 128) == cfg
        assert pick_config(n, k, 32, 64) == MmaConfig(cfg.nt, cfg.warps, cfg.depth)
