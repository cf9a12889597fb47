"""gemv (M <= 8 rows, fused RMSNorm / SiLU-and-mul prologues and residual epilogue) against
float64 references that round at the same points as the unfused chain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.runtime.kernels import KernelInputError

from .conftest import import_interpreted
from .reference import TOL, rel_err

gemv_mod = import_interpreted("kiln.runtime.kernels.gemv", "_gemv_kernel")
gemv, GemvConfig = gemv_mod.gemv, gemv_mod.GemvConfig

EPS = 1e-5


def _rms_normed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The norm kernel's output: fp32 arithmetic, stored in the model dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def _reference(x, weight, norm_weight=None, silu_mul=False, residual=None) -> torch.Tensor:
    if norm_weight is not None:
        x = _rms_normed(x, norm_weight)
    if silu_mul:
        k = weight.shape[1]
        x = (F.silu(x[:, :k].float()) * x[:, k:].float()).to(x.dtype)
    y = x.double() @ weight.double().T
    if residual is None:
        return y
    # The GEMM result is rounded to the model dtype before the residual add, as in the unfused chain.
    return residual.double() + y.to(x.dtype).double()


def _inputs(m, n, k, dtype, device, gen, *, silu_mul=False):
    x = torch.randn(m, 2 * k if silu_mul else k, generator=gen)
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    norm_weight = 1 + 0.2 * torch.randn(k, generator=gen)
    residual = torch.randn(m, n, generator=gen)
    return [t.to(dtype).to(device) for t in (x, weight, norm_weight, residual)]


FUSIONS = {  # name: (norm prologue, silu_mul prologue, residual epilogue)
    "plain": (False, False, False), "norm": (True, False, False), "residual": (False, False, True),
    "silu_mul": (False, True, False), "silu_mul+residual": (False, True, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("m", range(1, 9))
def test_gemv_fusions(m, fusion, dtype, device, gen):
    norm, silu, res = FUSIONS[fusion]
    # N=40 leaves a partial column block; K=96 with BLOCK_K=64 a partial K step.
    x, weight, nw, residual = _inputs(m, 40, 96, dtype, device, gen, silu_mul=silu)
    kwargs = dict(norm_weight=nw if norm else None, silu_mul=silu, residual=residual if res else None)
    out = gemv(x, weight, eps=EPS, config=GemvConfig(block_n=16, block_k=64), **kwargs)
    assert out.shape == (m, 40) and out.dtype == dtype
    err = rel_err(out, _reference(x, weight, **kwargs))
    assert err < TOL[dtype], f"{fusion} m={m}: error {err:.3g} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion", ["norm", "silu_mul+residual"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_cuda_core_path(m, fusion, dtype, device, gen):
    norm, silu, res = FUSIONS[fusion]
    x, weight, nw, residual = _inputs(m, 70, 128, dtype, device, gen, silu_mul=silu)
    kwargs = dict(norm_weight=nw if norm else None, silu_mul=silu, residual=residual if res else None)
    out = gemv(x, weight, eps=EPS, config=GemvConfig(block_n=8, block_k=32, use_dot=False), **kwargs)
    err = rel_err(out, _reference(x, weight, **kwargs))
    assert err < TOL[dtype], f"{fusion} m={m}: error {err:.3g} (seed {gen.initial_seed()})"


def test_gemv_default_config_and_strided_rows(device, gen):
    # x and residual as row-strided views of wider buffers; default (heuristic) launch shape.
    wide_x = torch.randn(3, 112, generator=gen).to(device)
    wide_r = torch.randn(3, 50, generator=gen).to(device)
    weight = torch.randn(33, 80, generator=gen).to(device)
    x, residual = wide_x[:, :80], wide_r[:, :33]
    out = gemv(x, weight, residual=residual)
    assert rel_err(out, _reference(x, weight, residual=residual)) < TOL[torch.float32]


def test_gemv_in_place_residual(device, gen):
    x, weight, _, residual = _inputs(4, 48, 64, torch.float32, device, gen, silu_mul=True)
    want = _reference(x, weight, silu_mul=True, residual=residual)
    out = gemv(x, weight, silu_mul=True, residual=residual, out=residual, config=GemvConfig(16, 32))
    assert out is residual
    assert rel_err(residual, want) < TOL[torch.float32]


def test_gemv_zero_rows(device):
    out = gemv(torch.empty(0, 32, device=device), torch.randn(5, 32, device=device))
    assert out.shape == (0, 5)


@pytest.mark.parametrize("case, match", [
    ("nine_rows", "at most 8 rows"),
    ("k_not_16", "multiple of 16"),
    ("silu_width", "with silu_mul"),
    ("dtype_mismatch", "weight dtype"),
    ("norm_and_silu", "cannot be combined"),
    ("residual_shape", "residual must be"),
])
def test_gemv_rejects(case, match, device):
    x, w = torch.randn(2, 32, device=device), torch.randn(8, 32, device=device)
    kwargs = {}
    if case == "nine_rows":
        x = torch.randn(9, 32, device=device)
    elif case == "k_not_16":
        x, w = torch.randn(2, 24, device=device), torch.randn(8, 24, device=device)
    elif case == "silu_width":
        kwargs = dict(silu_mul=True)
    elif case == "dtype_mismatch":
        w = w.half()
    elif case == "norm_and_silu":
        x, kwargs = torch.randn(2, 64, device=device), dict(silu_mul=True, norm_weight=torch.ones(32, device=device))
    else:
        kwargs = dict(residual=torch.randn(2, 7, device=device))
    with pytest.raises(KernelInputError, match=match):
        gemv(x, w, **kwargs)


def test_pick_config_covers_every_shape():
    for n, k in [(1, 16), (40, 96), (4096, 14336), (128256, 4096)]:
        for m in (1, 2, 5):
            cfg = gemv_mod.pick_config(n, k, m)
            assert cfg.block_n & (cfg.block_n - 1) == 0 and cfg.block_k & (cfg.block_k - 1) == 0
            assert 16 <= cfg.block_k and (cfg.use_dot is False or cfg.block_n >= 16)


def test_tuned_tiles_fit_shared_memory_for_every_operand_size():
    """The tables hold bf16 / FP8 tiles tuned on Hopper; fp32 operands (an fp32 engine's decode)
    and GPUs with less shared memory take fewer stages or shorter K steps, never a launch that
    exceeds the limit (an fp32 8B engine failed on an H200 with 265 KB asked of 227 KB)."""
    fit = gemv_mod.fit_shared_memory
    rows_of = {"m1": 1, "m2": 2, "m8": 8}
    for table, fp8 in ((gemv_mod.TUNED, False), (gemv_mod.TUNED_FP8, True)):
        for (n, k, mc), tuned in table.items():
            m = rows_of[mc]
            assert gemv_mod.pick_config(n, k, m, fp8) == tuned  # Hopper at the tuned dtypes: as tuned
            for elsize, limit in ((4, 232448), (2, 166912), (2, 101376)):  # fp32 on H200; A100; L40S
                cfg = gemv_mod.pick_config(n, k, m, fp8, weight_bytes=elsize, x_bytes=elsize, shared_memory=limit)
                rows = 16 if cfg.use_dot else m
                staged = (cfg.num_stages - 1) * cfg.block_k * (cfg.block_n * (1 if fp8 else elsize) + rows * elsize)
                assert staged <= limit - gemv_mod.SMEM_SLACK, (n, k, mc, elsize, limit, cfg)
                assert (cfg.block_n, cfg.use_dot, cfg.num_warps) == (tuned.block_n, tuned.use_dot, tuned.num_warps)
    # The launch that failed: qkv of Llama-3.1-8B, 8 rows, fp32 -> one stage fewer, same tile.
    assert fit(gemv_mod.GemvConfig(64, 256, 4, 4, True), 4, 4, 8, 232448) == gemv_mod.GemvConfig(64, 256, 4, 3, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (the shared-memory limit is the GPU's)")
@pytest.mark.parametrize("m", [1, 2, 8])
def test_gemv_fp32_at_a_tuned_llama_shape(m, gen):
    """fp32 at a shape the bf16 table tunes (Llama-3.1-8B qkv, norm prologue): launches and is right."""
    x, weight, nw, _ = _inputs(m, 6144, 4096, torch.float32, "cuda", gen)
    out = gemv(x, weight, norm_weight=nw, eps=EPS)
    assert rel_err(out, _reference(x, weight, norm_weight=nw)) < TOL[torch.float32]
