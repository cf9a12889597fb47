"""fused_add_rms_norm and silu_and_mul against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.runtime.kernels import KernelInputError, fused_add_rms_norm, silu_and_mul

from .reference import TOL, rel_err


def _rms_norm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [96, 576, 2048])
@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_add_rms_norm(dtype, hidden, with_residual, device, gen):
    x = torch.randn(5, hidden, generator=gen).to(dtype).to(device)
    residual = torch.randn(5, hidden, generator=gen).to(dtype).to(device) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    normed, new_res = fused_add_rms_norm(x, residual, weight, 1e-5)
    want_res = x.double() + residual.double() if with_residual else x.double()
    assert new_res.dtype == dtype and normed.dtype == dtype
    # The new residual is the fp32 sum rounded once to the model dtype: within one unit in the last
    # place of every element (Triton's CPU interpreter truncates where the GPU rounds to nearest).
    ulp = torch.finfo(dtype).eps * want_res.abs()
    assert bool(((new_res.double() - want_res).abs() <= ulp).all()), f"residual (seed {gen.initial_seed()})"
    err = rel_err(normed, _rms_norm_reference(want_res, weight, 1e-5))
    assert err < TOL[dtype], f"normed error {err:.3g} (seed {gen.initial_seed()})"


def test_rms_norm_strided_rows(device, gen):
    # A row-strided view (e.g. a slice of a wider buffer) is read through its stride.
    wide = torch.randn(4, 160, generator=gen).to(device)
    x, weight = wide[:, :128], torch.rand(128, generator=gen).to(device)
    normed, new_res = fused_add_rms_norm(x, None, weight, 1e-6)
    assert new_res is x
    assert rel_err(normed, _rms_norm_reference(x, weight, 1e-6)) < 1e-5


def test_rms_norm_rejects_mismatched_residual(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(KernelInputError, match="residual"):
        fused_add_rms_norm(x, torch.randn(2, 8, device=device).half(), torch.ones(8, device=device), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter", [7, 1536, 2600])  # 2600 spans two column blocks of the kernel
def test_silu_and_mul(dtype, inter, device, gen):
    x = (2 * torch.randn(3, 2 * inter, generator=gen)).to(dtype).to(device)
    out = silu_and_mul(x)
    ref = F.silu(x[:, :inter].double()) * x[:, inter:].double()
    assert out.shape == (3, inter) and out.dtype == dtype
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"error {err:.3g} (seed {gen.initial_seed()})"


def test_silu_and_mul_rejects_odd_width(device):
    with pytest.raises(KernelInputError, match="2\\*intermediate"):
        silu_and_mul(torch.randn(2, 5, device=device))
