"""FP8 KV cache reference arithmetic (runtime/fp8_kv.py, runtime/attention.py) against float64
computations, the dtype choice and the KV sizing."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_attention import SEQUENCES, build_case, naive_attention

from kiln.runtime import fp8_kv
from kiln.runtime.attention import paged_attention, write_kv_cache
from kiln.runtime.kv_cache import KVCacheSpec, cpu_num_blocks
from kiln.runtime.linear import MissingWeightError


def e4m3_grid() -> np.ndarray:
    """The 127 non-negative finite E4M3 values in code order (code i has value grid[i])."""
    subnormal = [m / 8 * 2.0**-6 for m in range(8)]
    normal = [2.0 ** (e - 7) * (1 + m / 8) for e in range(1, 16) for m in range(8)]
    return np.array(subnormal + normal[:-1])  # exponent 15, mantissa 7 is NaN


def expected_codes(y: torch.Tensor) -> torch.Tensor:
    """E4M3 bit patterns of the float32 values y: saturate to 448, round to nearest, ties to
    the even code; computed in float64 on the grid (no fp8 cast involved)."""
    grid = e4m3_grid()
    a = np.minimum(np.abs(y.double().numpy()), grid[-1])
    hi = np.searchsorted(grid, a)  # grid[hi - 1] < a <= grid[hi]
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    sign = torch.signbit(y).numpy().astype(np.int64) << 7
    return torch.from_numpy(code + sign).to(torch.uint8)


def test_quantize_rounds_to_nearest_even_and_saturates() -> None:
    gen = torch.Generator().manual_seed(0)
    grid = torch.tensor(e4m3_grid())
    mid = (grid[1:] + grid[:-1]) / 2  # every tie, exactly representable in float32
    wide = torch.randn(20000, generator=gen) * torch.exp2(torch.empty(20000).uniform_(-14, 10, generator=gen))
    edges = torch.tensor([0.0, -0.0, 448.0, 464.0, 479.0, 1e9, -1e9, 2.0**-10, -(2.0**-10), 3 * 2.0**-10])
    y = torch.cat([mid, -mid, grid, wide, edges]).float()
    for scale in (1.0, 0.5, 4.0):  # powers of two: y * (1/scale) is exact, so the ties stay ties
        got = fp8_kv.quantize(y * scale, scale).view(torch.uint8)
        assert torch.equal(got, expected_codes(y))
    scale = 0.0123  # a general scale: the product is one float32 multiply by inverse_scale
    x = wide * 3
    want = expected_codes((x.float() * np.float32(1) / np.float32(scale)).float())
    assert torch.equal(fp8_kv.quantize(x, scale).view(torch.uint8), want)
    assert fp8_kv.inverse_scale(scale) == float(np.float32(1) / np.float32(scale))


@pytest.mark.parametrize("gqa", [1, 4])
def test_fp8_reference_attention_matches_float64_of_the_dequantized_cache(gqa: int) -> None:
    seqs, q, slots, k32, v32, meta = build_case(block_size=4, gqa=gqa, seed=5)
    k_scale, v_scale = 0.0071, 0.013  # amax of a N(0,1) cache is ~4.5: values up to ~630 saturate
    k_cache, v_cache = fp8_kv.quantize(k32, k_scale), fp8_kv.quantize(v32, v_scale)
    new_k = torch.cat([k[c:] for (_, k, _), (c, _) in zip(seqs, SEQUENCES)])
    new_v = torch.cat([v[c:] for (_, _, v), (c, _) in zip(seqs, SEQUENCES)])
    write_kv_cache(new_k, new_v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    flat = k_cache.view(-1, *k_cache.shape[2:])
    assert torch.equal(flat[slots].view(torch.uint8), fp8_kv.quantize(new_k, k_scale).view(torch.uint8))
    scale = 8**-0.5
    out = paged_attention(q, k_cache, v_cache, scale=scale, k_scale=k_scale, v_scale=v_scale, **meta)

    def dequantized(x: torch.Tensor, s: float) -> torch.Tensor:
        return fp8_kv.quantize(x, s).double() * s

    expected = torch.cat([naive_attention(sq, dequantized(k, k_scale), dequantized(v, v_scale), scale)
                          for sq, k, v in seqs])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Quantization costs accuracy against the unquantized cache, but only a few percent.
    exact = torch.cat([naive_attention(sq, k, v, scale) for sq, k, v in seqs])
    assert 1e-3 < (out - exact).norm() / exact.norm() < 0.1


def test_scales_need_an_fp8_cache() -> None:
    k = torch.zeros(2, 1, 4)
    cache = torch.zeros(2, 4, 1, 4)
    with pytest.raises(ValueError, match="FP8 cache only"):
        write_kv_cache(k, k, cache, cache, torch.tensor([0, 1]), k_scale=0.5)


def _mc(algo: str | None) -> SimpleNamespace:
    return SimpleNamespace(quantization={"quant_algo": None, "kv_cache_quant_algo": algo})


def test_kv_cache_dtype_choice(caplog: pytest.LogCaptureFixture) -> None:
    cpu, f32 = torch.device("cpu"), torch.float32
    assert fp8_kv.resolve_kv_cache_dtype("auto", _mc(None), f32, cpu) == f32
    assert fp8_kv.resolve_kv_cache_dtype("auto", _mc("FP8"), f32, cpu) == torch.float8_e4m3fn
    assert fp8_kv.resolve_kv_cache_dtype("model", _mc("FP8"), f32, cpu) == f32
    with caplog.at_level(logging.WARNING, logger="kiln.runtime.fp8_kv"):
        assert fp8_kv.resolve_kv_cache_dtype("fp8", _mc(None), f32, cpu) == torch.float8_e4m3fn
    assert "scale 1.0" in caplog.text
    with pytest.raises(fp8_kv.KVCacheDtypeError, match="INT8"):
        fp8_kv.resolve_kv_cache_dtype("auto", _mc("INT8"), f32, cpu)


def test_layer_scales() -> None:
    name = fp8_kv.KV_SCALE_NAME.format(l=3)
    fp8 = {"kv_cache_quant_algo": "FP8"}
    assert fp8_kv.layer_kv_scales({name: torch.tensor([0.25])}, 3, fp8) == {"k_scale": 0.25, "v_scale": 0.25}
    assert fp8_kv.layer_kv_scales({}, 3, {"kv_cache_quant_algo": None}) == {"k_scale": 1.0, "v_scale": 1.0}
    with pytest.raises(MissingWeightError, match="layers.3.attention.kv_cache_scaling_factor"):
        fp8_kv.layer_kv_scales({}, 3, fp8)
    with pytest.raises(ValueError, match="positive finite"):
        fp8_kv.layer_kv_scales({name: torch.tensor([-1.0])}, 3, fp8)


def test_fp8_blocks_hold_twice_the_tokens_of_bf16() -> None:
    def spec(dtype: torch.dtype) -> KVCacheSpec:
        return KVCacheSpec(num_layers=32, block_size=32, num_kv_heads=8, head_size=128, dtype=dtype)

    bf16, fp8 = spec(torch.bfloat16), spec(torch.float8_e4m3fn)
    assert 2 * fp8.block_bytes == bf16.block_bytes == 2 * 32 * 32 * 8 * 128 * 2
    # The CPU default is capped in bytes (2 GiB = 512 bf16 blocks here): FP8 gets twice the blocks.
    assert cpu_num_blocks(bf16, 12000) == 512
    assert cpu_num_blocks(fp8, 12000) == 1024
