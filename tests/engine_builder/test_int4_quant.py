"""INT4 packing and group quantization (engine_builder/int4.py) and the AWQ search (awq.py)."""

from __future__ import annotations

import pytest
import torch

from kiln.engine_builder.awq import AwqOptions, clip_for, output_error, search_clip, search_scales
from kiln.engine_builder.int4 import dequantize, fake_quantize, pack_int4, quantize_gptq, quantize_rtn, unpack_int4


def test_pack_round_trip_and_byte_layout():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 64), generator=gen, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed), q)
    # Byte j holds column 2j in its low nibble and 2j + 1 in its high one (two's complement).
    one = pack_int4(torch.tensor([[-8, 7, -1, 0]], dtype=torch.int8)).view(torch.uint8)
    assert one.tolist() == [[0x78, 0x0F]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_groups(dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 128, generator=gen)
    qw = quantize_rtn(w, 32, zero_point=False, dtype=dtype)
    assert qw.zeros is None and qw.scales.shape == (4, 8) and qw.scales.dtype == dtype
    amax = w.reshape(8, 4, 32).abs().amax(-1).t()
    torch.testing.assert_close(qw.scales, (amax / 7).to(dtype))
    assert int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
    step = qw.scales.float().t().repeat_interleave(32, 1)
    assert bool(((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_asymmetric_groups_reach_both_ends(dtype):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 128, generator=gen) + 0.5
    w[0, :32] = 0.25  # a constant group is reproduced exactly
    qw = quantize_rtn(w, 32, zero_point=True, dtype=dtype)
    deq = qw.dequantize().reshape(8, 4, 32)
    groups = w.reshape(8, 4, 32)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(deq.amin(-1), groups.amin(-1), atol=tol * groups.abs().amax(), rtol=0)
    torch.testing.assert_close(deq.amax(-1), groups.amax(-1), atol=tol * groups.abs().amax(), rtol=0)
    assert torch.equal(deq[0, 0], torch.full((32,), 0.25))
    step = qw.scales.float().t().repeat_interleave(32, 1)
    assert bool(((qw.dequantize() - w).abs() <= step / 2 + tol).all())


def test_zero_points_reproduce_a_q4_1_grid():
    """Weights already on a 4-bit grid with a minimum per group of 32 (GGUF Q4_1, as SmolLM2's
    are) come back unchanged from asymmetric g32 quantization."""
    gen = torch.Generator().manual_seed(3)
    levels = torch.randint(0, 16, (16, 256), generator=gen)
    levels[:, ::32], levels[:, 1::32] = 0, 15  # Q4_1 maps each group's min to 0 and max to 15
    d = torch.rand(16, 8, 1, generator=gen) * 0.01 + 0.001
    m = -torch.rand(16, 8, 1, generator=gen) * 0.05
    w = (m + d * levels.reshape(16, 8, 32).float()).reshape(16, 256)
    torch.testing.assert_close(fake_quantize(w, 32, True, torch.float32), w, rtol=0, atol=1e-6)
    assert (fake_quantize(w, 64, True, torch.float32) - w).abs().max() > 1e-4  # g64 cannot


def test_clipping_shrinks_the_range():
    w = torch.linspace(-1, 1, 32).repeat(2).reshape(1, 64)  # two groups centred on 0
    clip = torch.full((1, 2), 0.5)
    # Symmetric groups keep q = -8, one step beyond -max: |w| <= 8/7 of the clipped max.
    assert fake_quantize(w, 32, False, torch.float32, clip).abs().max() <= 0.5 * 8 / 7 + 1e-6
    assert fake_quantize(w, 32, True, torch.float32, clip).abs().max() <= 0.5 + 1e-6


def test_dequantize_matches_the_definition():
    q = torch.tensor([[1, -2, 3, -4]], dtype=torch.int8)
    s, z = torch.tensor([[0.5], [2.0]]), torch.tensor([[0.25], [-1.0]])
    assert dequantize(q, s, z, 2).tolist() == [[0.75, -0.75, 5.0, -9.0]]


def _activations(rows, k, gen):
    """LLM-like inputs: most channels small, a few much larger (the 'salient' channels AWQ protects)."""
    x = torch.randn(rows, k, generator=gen)
    x[:, :4] *= 20
    return x


def test_awq_scales_beat_rtn_on_calibration_and_held_out_rows():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(96, 128, generator=gen) * 0.05
    x, held_out = _activations(256, 128, gen), _activations(256, 128, gen)
    options = AwqOptions(group_size=32, zero_point=True, dtype=torch.float32)
    found = search_scales(x, x.abs().mean(0), w, options)
    assert found.alpha > 0 and found.error < 0.8 * found.rtn_error
    rtn = fake_quantize(w, 32, True, torch.float32)
    awq = fake_quantize(w * found.scales, 32, True, torch.float32) / found.scales
    assert output_error(held_out, w, awq) < 0.8 * output_error(held_out, w, rtn)


def test_tied_scales_repeat_per_group():
    gen = torch.Generator().manual_seed(5)
    x, w = _activations(64, 64, gen), torch.randn(16, 64, generator=gen)
    tie = torch.arange(64) % 16  # 4 "query heads" of 16 channels sharing one KV head
    s = search_scales(x, x.abs().mean(0), w, AwqOptions(group_size=32, dtype=torch.float32, grid=5), tie).scales
    assert torch.equal(s.reshape(4, 16), s[:16].expand(4, 16))


def test_clip_search_never_loses_to_no_clipping():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(32, 128, generator=gen) * 0.05
    w[:, 7] *= 8  # outlier weights: clipping them helps the rest of their group
    x = torch.randn(128, 128, generator=gen)
    options = AwqOptions(group_size=32, zero_point=False, dtype=torch.float32, clip_grid=10)
    index = search_clip(x, w, options)
    assert index.shape == (32, 4) and index.dtype == torch.uint8 and int(index.max()) > 0
    clipped = fake_quantize(w, 32, False, torch.float32, clip_for(index, options))
    assert output_error(x, w, clipped) < output_error(x, w, fake_quantize(w, 32, False, torch.float32))


@pytest.mark.parametrize("zero_point", [True, False])
def test_gptq_keeps_the_grid_and_beats_rtn_on_held_out_rows(zero_point: bool):
    """GPTQ rounding onto round-to-nearest's group scales: the same scales and zero points, every
    value on that grid, and a lower output error on rows it never saw (correlated inputs)."""
    gen = torch.Generator().manual_seed(7)
    mix = torch.randn(128, 128, generator=gen) / 8 + torch.eye(128)
    x, held_out = _activations(512, 128, gen) @ mix, _activations(512, 128, gen) @ mix
    w = torch.randn(48, 128, generator=gen) * 0.05
    rtn = quantize_rtn(w, 32, zero_point, torch.float32)
    gptq = quantize_gptq(w, x.T @ x, rtn)
    assert gptq.scales is rtn.scales and gptq.zeros is rtn.zeros
    assert int(gptq.q.min()) >= -8 and int(gptq.q.max()) <= 7 and not torch.equal(gptq.q, rtn.q)
    assert output_error(held_out, w, gptq.dequantize()) < 0.8 * output_error(held_out, w, rtn.dequantize())
