"""W4A16 kernels (gemv_int4 with gemv's prologues/epilogue and a pre-quantization scale,
dequantize_int4) against a float64 reference written here from the layout's definition
(W[n, k] = q[n, k] * s[k // g, n] + z[k // g, n]), on random int4 values, scales and zeros."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.engine_builder.int4 import pack_int4
from kiln.runtime.kernels import KernelInputError

from .conftest import import_interpreted
from .reference import TOL, rel_err

int4 = import_interpreted("kiln.runtime.kernels.int4", "_gemv_int4_kernel")
EPS = 1e-5


def _weights(n, k, group, zero, dtype, device, gen):
    """(kernel-layout packed weight, scales, zeros, float64 W) for random q in [-8, 7]."""
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = (torch.randn(k // group, n, generator=gen) * 0.02).to(dtype) if zero else None
    w = q.double() * scales.double().t().repeat_interleave(group, 1)
    if zero:
        w = w + zeros.double().t().repeat_interleave(group, 1)
    packed = int4.repack(pack_int4(q), group)
    return packed.to(device), scales.to(device), None if zeros is None else zeros.to(device), w


def _reference(x, w, norm_weight=None, silu_mul=False, residual=None, prequant=None):
    """Float64 product with the prologue rounded to x's dtype at the points the unfused chain rounds."""
    dtype = x.dtype
    x = x.cpu()
    if norm_weight is not None:
        xf = x.double()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.cpu().double()).to(dtype)
    if silu_mul:
        half = x.shape[1] // 2
        x = (F.silu(x[:, :half].double()) * x[:, half:].double()).to(dtype)
    if prequant is not None:
        x = (x.double() * prequant.cpu().double()).to(dtype)
    y = x.double() @ w.T
    if residual is None:
        return y
    return residual.cpu().double() + y.to(dtype).double()


FUSIONS = {  # name: (norm prologue, silu_mul prologue, residual epilogue, prequant)
    "plain": (False, False, False, False), "norm": (True, False, False, False),
    "silu_mul+residual": (False, True, True, False), "norm+prequant": (True, False, False, True),
    "prequant+residual": (False, False, True, True),
}
CONFIGS = {  # name: (config, K, group); N=40 leaves a partial column block
    "two": (int4.Int4GemvConfig(block_n=8, groups_per_step=2), 256, 64),  # 4 groups, 2 per step
    "one": (int4.Int4GemvConfig(block_n=16, groups_per_step=4, num_warps=2), 192, 64),  # 3 groups: 1 per step
    "g128": (int4.Int4GemvConfig(block_n=32), 256, 128),
    "even_n": (int4.Int4GemvConfig(block_n=8, groups_per_step=4), 384, 128),  # 3 groups; 40 = 5 x 8 columns
}


# Every fusion in bf16; fp32 (tight tolerance) on two of them: the interpreter is slow.
CASES = [(fusion, torch.bfloat16) for fusion in FUSIONS] + [(f, torch.float32) for f in ("plain", "norm+prequant")]


@pytest.mark.parametrize("fusion, dtype", CASES)
@pytest.mark.parametrize("m, config", [(1, "two"), (3, "one"), (8, "g128"), (2, "even_n")])
def test_gemv_int4(m, config, fusion, dtype, device, gen):
    norm, silu, res, pre = FUSIONS[fusion]
    cfg, k, group = CONFIGS[config]
    n = 40
    w8, scales, zeros, w = _weights(n, k, group, zero=True, dtype=dtype, device=device, gen=gen)
    x = torch.randn(m, 2 * k if silu else k, generator=gen).to(dtype).to(device)
    kwargs = dict(norm_weight=(1 + 0.2 * torch.randn(k, generator=gen)).to(dtype).to(device) if norm else None,
                  silu_mul=silu, residual=torch.randn(m, n, generator=gen).to(dtype).to(device) if res else None,
                  prequant=(0.5 + torch.rand(k, generator=gen)).to(dtype).to(device) if pre else None)
    out = int4.gemv_int4(x, w8, scales, zeros, group, eps=EPS, config=cfg, **kwargs)
    assert out.shape == (m, n) and out.dtype == dtype
    err = rel_err(out, _reference(x, w, **kwargs))
    # Triton 3.9's CPU interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), which roughly
    # doubles the error of a prologue that rounds twice (norm or SiLU, then the pre-scale).
    tol = TOL[dtype] * (2 if pre and dtype == torch.bfloat16 and not torch.cuda.is_available() else 1)
    assert err < tol, f"{config} {fusion} m={m}: error {err:.3g} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("zero", [False, True])
def test_gemv_int4_groups_and_symmetric(group, zero, device, gen):
    w8, scales, zeros, w = _weights(16, 128, group, zero, torch.float32, device, gen)
    x = torch.randn(2, 128, generator=gen).to(device)
    for config, _, _ in CONFIGS.values():
        out = int4.gemv_int4(x, w8, scales, zeros, group, config=config)
        assert rel_err(out, _reference(x, w)) < TOL[torch.float32]


@pytest.mark.parametrize("zero", [False, True])
def test_dequantize_int4(zero, device, gen):
    w8, scales, zeros, w = _weights(40, 128, 64, zero, torch.float32, device, gen)
    torch.testing.assert_close(int4.dequantize_int4(w8, scales, zeros, 64).cpu().double(), w, rtol=1e-6, atol=1e-7)


def test_repack_puts_strided_inputs_in_the_nibbles_of_a_word():
    """Word row j*g/8 + w, column n, holds u = q + 8 of input j*g + i*(g/8) + w in nibble i."""
    group = 32
    q = torch.randint(-8, 8, (3, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    words = int4.repack(pack_int4(q), group)
    assert words.dtype == torch.int32 and words.shape == (12, 3)
    for n in range(3):
        for j in range(3):
            for w in range(group // 8):
                word = int(words[j * 4 + w, n]) & 0xFFFFFFFF
                for i in range(8):
                    assert (word >> (4 * i)) & 0xF == int(q[n, j * group + i * 4 + w]) + 8


@pytest.mark.parametrize("case, match", [
    ("nine_rows", "at most 8 rows"),
    ("group", "group size 48"),
    ("k_not_group", "multiple of the group"),
    ("scales_shape", "scales must be"),
    ("zeros_dtype", "zeros must be"),
    ("weight_dtype", "weight must be int32"),
    ("silu_width", "with silu_mul"),
])
def test_int4_rejects(case, match, device):
    x, w = torch.randn(2, 64, device=device), torch.zeros(8, 8, dtype=torch.int32, device=device)  # [K/8, N]
    scales, zeros = torch.ones(2, 8, device=device), None
    group, kwargs = 32, {}
    if case == "nine_rows":
        x = torch.randn(9, 64, device=device)
    elif case == "group":
        group = 48
    elif case == "k_not_group":
        w, scales, group = torch.zeros(12, 8, dtype=torch.int32, device=device), torch.ones(1, 8, device=device), 64
        x = torch.randn(2, 96, device=device)
    elif case == "scales_shape":
        scales = torch.ones(8, 2, device=device)
    elif case == "zeros_dtype":
        zeros = torch.ones(2, 8, device=device, dtype=torch.float16)
    elif case == "weight_dtype":
        w = torch.zeros(8, 32, dtype=torch.int8, device=device)  # the engine's packing, not repacked
    else:
        kwargs = dict(silu_mul=True)
    with pytest.raises(KernelInputError, match=match):
        int4.gemv_int4(x, w, scales, zeros, group, **kwargs)


def test_pick_configs_cover_every_shape():
    for n, k, group in [(40, 192, 64), (576, 576, 64), (4096, 14336, 128), (128256, 4096, 128), (1536, 576, 32)]:
        for m in (1, 2, 5, 8):
            cfg = int4.pick_gemv_config(n, k, m, group)
            assert cfg.block_n & (cfg.block_n - 1) == 0 and cfg.groups_per_step & (cfg.groups_per_step - 1) == 0


def test_int4_linear_on_the_triton_kernel_set_equals_the_reference(device, gen):
    """The method's Triton path (repack at load, concat of repacked parts, gemv or dequantize +
    F.linear by row count, the fused prologue) computes what its reference path computes."""
    from kiln.runtime.attention import KernelSet
    from kiln.runtime.linear import LinearContext
    from kiln.runtime.quant.int4 import Int4Linear

    quant = {"quant_algo": "W4A16_AWQ", "group_size": 32, "has_zero_point": True, "pre_quant_scale": True}
    tensors = {}
    for name, n in (("a", 24), ("b", 40)):
        tensors[f"{name}.weight"] = pack_int4(torch.randint(-8, 8, (n, 64), generator=gen, dtype=torch.int8))
        tensors[f"{name}.weights_scaling_factor"] = torch.rand(2, n, generator=gen) * 0.02 + 0.01
        tensors[f"{name}.zero"] = torch.randn(2, n, generator=gen) * 0.02
        tensors[f"{name}.prequant_scaling_factor"] = torch.full((1, 64), 1.5)

    def method(ops):
        c = LinearContext(device, torch.float32, ops, quant)
        return Int4Linear.concat([Int4Linear.load(c, tensors.get, "a"), Int4Linear.load(c, tensors.get, "b")])

    ref, kern = method(KernelSet()), method(KernelSet(name="triton"))
    assert kern.has_small and not ref.has_small
    for rows in (int4.GEMV_MAX_ROWS, int4.GEMV_MAX_ROWS + 1):  # gemv (no tinygemm in fp32), dequantize + F.linear
        x = torch.randn(rows, 64, generator=gen).to(device)
        assert rel_err(kern.apply(kern.prepare(x)), ref.apply(ref.prepare(x))) < TOL[torch.float32]
    h, res, norm_w = torch.randn(2, 64, generator=gen), torch.randn(2, 64, generator=gen), torch.rand(64, generator=gen)
    h, res, norm_w = h.to(device), res.to(device), norm_w.to(device)
    fused = dict(norm_weight=norm_w, eps=EPS, residual=res)
    assert rel_err(kern.small(h, **fused), ref.small(h, **fused)) < TOL[torch.float32]
