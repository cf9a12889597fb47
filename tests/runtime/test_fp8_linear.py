"""The FP8 linear method (CPU reference path) against a float64 computation of the same
quantized arithmetic: y = (q(x, s_x) @ W8^T) * s_x * s_w, q rounding x / s_x to E4M3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.runtime.attention import KernelSet
from kiln.runtime.linear import Linear, LinearContext, UnsupportedQuantizationError, linear_method_for
from kiln.runtime.quant import fp8
from kiln.runtime.quant.fp8 import Fp8Linear

CTX = LinearContext(torch.device("cpu"), torch.float32, KernelSet(), {"quant_algo": "FP8"})
E4M3_MAX = 448.0


def e4m3_round64(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|v| <= 448) to the nearest E4M3 number, ties to even, without
    torch's fp8 cast: 3 mantissa bits in the normal range, multiples of 2^-9 below 2^-6."""
    v = v.double().clamp(-E4M3_MAX, E4M3_MAX)
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    step = torch.exp2(exponent - 3)
    return torch.round(v / step) * step  # torch.round rounds half to even


def quantized_linear64(x, w8, x_scale, w_scale, bias=None):
    xq = e4m3_round64(x.double() / x_scale)
    y = (xq @ w8.double().T) * (x_scale * w_scale)
    return y if bias is None else y + bias.double()


def make_fp8(out_features, in_features, gen, w_scale=0.25 / 448, x_scale=6.0 / 448):
    w8 = (torch.randn(out_features, in_features, generator=gen) * 0.08 / w_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    tensors = {"l.weight": w8, "l.weights_scaling_factor": torch.tensor([w_scale]),
               "l.activation_scaling_factor": torch.tensor([x_scale])}
    return tensors, Fp8Linear.load(CTX, tensors.get, "l")


def test_registered_under_quant_algo():
    assert linear_method_for("FP8") is Fp8Linear


@pytest.mark.parametrize("with_bias", [False, True])
def test_apply_matches_float64(with_bias):
    gen = torch.Generator().manual_seed(0)
    tensors, method = make_fp8(48, 64, gen)
    x = torch.randn(7, 64, generator=gen) * 2
    x[0, 0] = 100.0  # saturates at 448 * s_x
    bias = torch.randn(48, generator=gen) if with_bias else None
    y = Linear(method, bias)(method.prepare(x))
    want = quantized_linear64(x, tensors["l.weight"], 6.0 / 448, 0.25 / 448, bias)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    # The quantization is not a no-op: the plain float product differs by far more.
    assert (F.linear(x, tensors["l.weight"].float() * 0.25 / 448).double() - want).abs().max() > 1e-3


def test_norm_and_silu_inputs_match_float64():
    gen = torch.Generator().manual_seed(1)
    tensors, method = make_fp8(32, 64, gen)
    x, residual = torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen)
    norm_w = 1 + 0.3 * torch.randn(64, generator=gen)
    x8, new_res = method.norm_input(x, residual, norm_w, 1e-5)
    h = (x + residual).double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double()
    torch.testing.assert_close(new_res.double(), h)
    torch.testing.assert_close(method.apply(x8).double(), quantized_linear64(normed, tensors["l.weight"], 6.0 / 448, 0.25 / 448),
                               rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(5, 128, generator=gen) * 2
    act = F.silu(gate_up[:, :64].double()) * gate_up[:, 64:].double()
    torch.testing.assert_close(method.apply(method.act_input(gate_up)).double(),
                               quantized_linear64(act, tensors["l.weight"], 6.0 / 448, 0.25 / 448), rtol=1e-5, atol=1e-5)


def test_concat_shares_scales_and_requantizes():
    gen = torch.Generator().manual_seed(2)
    t1, a = make_fp8(16, 32, gen, w_scale=0.25 / 448)
    t2, b = make_fp8(16, 32, gen, w_scale=0.5 / 448, x_scale=8.0 / 448)
    fused = Fp8Linear.concat([a, b])
    assert float(fused.weight_scale) == pytest.approx(0.5 / 448) and float(fused.input_scale) == pytest.approx(8.0 / 448)
    x = torch.randn(3, 32, generator=gen)
    y = fused.apply(fused.prepare(x))
    # b's half is exact (its scales are the shared ones); a's weights were re-quantized to the
    # coarser scale: within one fp8 step of each weight.
    torch.testing.assert_close(y[:, 16:].double(), quantized_linear64(x, t2["l.weight"], 8.0 / 448, 0.5 / 448),
                               rtol=1e-5, atol=1e-5)
    w_a = t1["l.weight"].double() * 0.25 / 448
    requantized = fused.weight[:16].double() * 0.5 / 448
    assert bool(((requantized - w_a).abs() <= w_a.abs() / 8 + 2.0**-9 * 0.5 / 448).all())


def test_rejects_non_fp8_weight_and_bad_scale():
    gen = torch.Generator().manual_seed(3)
    tensors, _ = make_fp8(16, 32, gen)
    with pytest.raises(UnsupportedQuantizationError, match="float8_e4m3fn"):
        Fp8Linear.load(CTX, {**tensors, "l.weight": tensors["l.weight"].float()}.get, "l")
    with pytest.raises(UnsupportedQuantizationError, match="positive"):
        Fp8Linear.load(CTX, {**tensors, "l.activation_scaling_factor": torch.tensor([0.0])}.get, "l")


def test_fast_accumulation_setting(monkeypatch):
    monkeypatch.delenv(fp8.FAST_ACCUM_ENV, raising=False)
    assert fp8.fast_accum_enabled()  # on by default (cuBLASLt's fast accumulation)
    monkeypatch.setenv(fp8.FAST_ACCUM_ENV, "0")
    assert not fp8.fast_accum_enabled()
    monkeypatch.setenv(fp8.FAST_ACCUM_ENV, "yes")
    with pytest.raises(ValueError, match="KILN_FP8_FAST_ACCUM='yes': expected 0 or 1"):
        fp8.fast_accum_enabled()
    monkeypatch.setenv(fp8.FAST_ACCUM_ENV, "1")
    assert not fp8.select_fp8_ops(KernelSet(), torch.device("cpu")).fast_accum  # no FP8 GEMM on the CPU


@pytest.mark.parametrize("fast", [False, True])
def test_native_gemm_asks_for_the_configured_accumulation(monkeypatch, fast):
    """The _scaled_mm call (stood in for by the exact emulation: no FP8 GEMM on the CPU) gets the
    accumulation mode of the linear's ops, the scales and the stored weight."""
    gen = torch.Generator().manual_seed(3)
    tensors, method = make_fp8(16, 32, gen)
    calls = []

    def scaled_mm(a, b, *, scale_a, scale_b, bias, out_dtype, use_fast_accum):
        calls.append(use_fast_accum)
        assert torch.equal(b.t().float(), method.weight.float()) and scale_a is method.input_scale and scale_b is method.weight_scale
        return fp8.emulated_scaled_mm(a, b.t().float(), scale_a * scale_b, bias, out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    method.fp8 = fp8.Fp8Ops(native_gemm=True, fast_accum=fast)
    method._weight_compute = None  # the native path
    x = torch.randn(3, 32, generator=gen)
    y = method.apply(method.prepare(x))
    assert calls == [fast]
    torch.testing.assert_close(y.double(), quantized_linear64(x, tensors["l.weight"], 6.0 / 448, 0.25 / 448),
                               rtol=1e-5, atol=1e-5)
