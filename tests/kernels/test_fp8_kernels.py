"""The FP8 kernels (fused norm / SiLU / quantize writing fp8, the FP8-weight GEMV) against the
runtime's torch references of the same signature (kiln.runtime.quant.fp8)."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime import kernels
from kiln.runtime.kernels import KernelInputError
from kiln.runtime.kernels.gemv import GemvConfig
from kiln.runtime.quant import fp8 as ref

from .reference import TOL, rel_err

EPS = 1e-5
FP8 = torch.float8_e4m3fn


def assert_fp8_close(out: torch.Tensor, want: torch.Tensor, seed: int, model_dtype: torch.dtype) -> None:
    """Equal fp8 values, except a few elements one fp8 step away: an fp32 rounding difference
    upstream of the quantization that lands on a rounding boundary, or, for bf16 on the CPU,
    Triton's interpreter truncating fp32 -> bf16 where torch (and the GPU) round to nearest."""
    assert out.dtype == FP8 and out.shape == want.shape
    a, b = out.cpu().float(), want.cpu().float()
    step = torch.maximum(a.abs(), b.abs()) * 2.0**-3 + 2.0**-9
    assert bool(((a - b).abs() <= step).all()), f"an element differs by more than one fp8 step (seed {seed})"
    allowed = 0.005 if model_dtype == torch.float32 or out.is_cuda else 0.05
    differ = int((a != b).sum())
    assert differ <= max(1, allowed * a.numel()), f"{differ} of {a.numel()} differ (seed {seed})"


def _scale(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_add_rms_norm_fp8(dtype, with_residual, device, gen):
    x = torch.randn(5, 576, generator=gen).to(dtype).to(device)
    residual = torch.randn(5, 576, generator=gen).to(dtype).to(device) if with_residual else None
    weight = (1 + 0.3 * torch.randn(576, generator=gen)).to(dtype).to(device)
    inv = _scale(448 / 3.0, device)  # saturates the largest normed values
    out, new_res = kernels.fused_add_rms_norm_fp8(x, residual, weight, EPS, inv)
    want, want_res = ref.fused_add_rms_norm_fp8(x, residual, weight, EPS, inv)
    assert_fp8_close(out, want, gen.initial_seed(), dtype)
    assert rel_err(new_res, want_res) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_fp8(dtype, device, gen):
    x = (3 * torch.randn(3, 2 * 1300, generator=gen)).to(dtype).to(device)  # 1300: a partial block
    inv = _scale(448 / 20.0, device)
    # The kernel's arithmetic: silu(gate) * up in fp32, rounded once to x's dtype, then quantized.
    # (The torch path's F.silu(gate) * up rounds twice in bf16; on the H200 that moved ~3% of
    # the fp8 values by one step, more than a rounding-boundary difference.)
    gate, up = x.float().chunk(2, dim=-1)
    want = ref.quantize_fp8((torch.nn.functional.silu(gate) * up).to(dtype), inv)
    assert_fp8_close(kernels.silu_and_mul_fp8(x, inv), want, gen.initial_seed(), dtype)


def test_quantize_fp8_saturates_and_reads_strided_rows(device, gen):
    wide = (50 * torch.randn(4, 200, generator=gen)).to(device)
    x = wide[:, :160]
    inv = _scale(448 / 60.0, device)
    out = kernels.quantize_fp8(x, inv)
    assert_fp8_close(out, ref.quantize_fp8(x, inv), gen.initial_seed(), x.dtype)
    assert float(out.float().abs().max()) <= 448.0 and not bool(out.float().isnan().any())


def test_fp8_kernels_reject_bad_scale(device):
    x = torch.randn(2, 32, device=device)
    with pytest.raises(KernelInputError, match="inv_scale"):
        kernels.quantize_fp8(x, torch.ones(2, device=device))
    with pytest.raises(KernelInputError, match="inv_scale"):
        kernels.silu_and_mul_fp8(x, torch.ones(1, dtype=torch.float64, device=device))


def _gemv_inputs(m, n, k, dtype, device, gen, silu_mul):
    x = torch.randn(m, 2 * k if silu_mul else k, generator=gen).to(dtype).to(device)
    w_scale = 0.3 / 448
    weight = ref.quantize_fp8(torch.randn(n, k, generator=gen) * 0.1, _scale(1 / w_scale, torch.device("cpu")))
    nw = (1 + 0.2 * torch.randn(k, generator=gen)).to(dtype).to(device)
    residual = torch.randn(m, n, generator=gen).to(dtype).to(device)
    x_scale = 4.0 / 448
    return x, weight.to(device), nw, residual, _scale(1 / x_scale, device), _scale(x_scale * w_scale, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fusion", ["plain", "norm", "silu_mul+residual"])
@pytest.mark.parametrize("m, use_dot", [(1, False), (3, False), (2, True), (8, True)])
def test_gemv_fp8(m, use_dot, fusion, dtype, device, gen):
    silu = "silu" in fusion
    x, w, nw, residual, inv, out_scale = _gemv_inputs(m, 40, 96, dtype, device, gen, silu)
    fused = dict(norm_weight=nw if fusion == "norm" else None, silu_mul=silu,
                 residual=residual if "residual" in fusion else None)
    out = kernels.gemv_fp8(x, w, inv, out_scale, eps=EPS,
                           config=GemvConfig(16, 64, use_dot=use_dot), **fused)
    want = ref.fused_linear_fp8(x, w, inv, out_scale, eps=EPS, **fused)
    assert out.dtype == dtype and out.shape == (m, 40)
    # bf16 on the CPU: the interpreter truncates the prologue's bf16 rounding (torch rounds to
    # nearest), which moves some fp8 roundings by one step.
    tol = 1e-3 if dtype == torch.float32 else 2e-2 if out.is_cuda else 5e-2
    err = rel_err(out, want)
    assert err < tol, f"{fusion} m={m}: error {err:.3g} (seed {gen.initial_seed()})"


def test_gemv_fp8_default_config_and_rejects(device, gen):
    x, w, _, _, inv, out_scale = _gemv_inputs(2, 33, 80, torch.float32, device, gen, False)
    assert rel_err(kernels.gemv_fp8(x, w, inv, out_scale), ref.fused_linear_fp8(x, w, inv, out_scale)) < 1e-3
    with pytest.raises(KernelInputError, match="float8_e4m3fn"):
        kernels.gemv_fp8(x, w.float(), inv, out_scale)
    with pytest.raises(KernelInputError, match="out_scale"):
        kernels.gemv_fp8(x, w, inv, out_scale.double())
