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
    assert fp8.fast_accum_mode() == "auto"  # on by default, tuned per shape
    monkeypatch.setenv(fp8.FAST_ACCUM_ENV, "1")
    assert fp8.fast_accum_mode() == "1"
    monkeypatch.setenv(fp8.FAST_ACCUM_ENV, "0")
    assert fp8.fast_accum_mode() == "0"
    monkeypatch.setenv(fp8.FAST_ACCUM_ENV, "yes")
    with pytest.raises(ValueError, match="KILN_FP8_FAST_ACCUM='yes': expected auto, 0 or 1"):
        fp8.fast_accum_mode()
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
        assert torch.equal(b.t().float(), method.weight.float())
        assert scale_a is method.input_scale and scale_b is method.weight_scale
        return fp8.emulated_scaled_mm(a, b.t().float(), scale_a * scale_b, bias, out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    method.fp8 = fp8.Fp8Ops(native_gemm=True, fast_accum=fast)
    method._weight_compute = None  # the native path
    x = torch.randn(3, 32, generator=gen)
    y = method.apply(method.prepare(x))
    assert calls == [fast]
    torch.testing.assert_close(y.double(), quantized_linear64(x, tensors["l.weight"], 6.0 / 448, 0.25 / 448),
                               rtol=1e-5, atol=1e-5)


def test_tune_accumulation_keeps_fast_only_where_it_is_faster(monkeypatch):
    """Shapes are timed once each (a stand-in timer: no GPU here); the shape where fast
    accumulation measured slower takes the default at exactly the tuned row count, and the
    _scaled_mm call at that count asks for it; other row counts and shapes stay fast."""
    gen = torch.Generator().manual_seed(4)
    (_, slow_a), (_, slow_b), (_, fast_c) = make_fp8(16, 32, gen), make_fp8(16, 32, gen), make_fp8(32, 32, gen)
    emulated = make_fp8(16, 48, gen)[1]  # not native: never timed
    for method in (slow_a, slow_b, fast_c):
        method.fp8, method.native, method._weight_compute = fp8.Fp8Ops(native_gemm=True, fast_accum=True,
                                                                       tune_accum=True), True, None
    calls = []

    def scaled_mm(a, b, *, scale_a, scale_b, bias=None, out_dtype, use_fast_accum):
        calls.append((b.shape[1], a.shape[0], use_fast_accum))
        return fp8.emulated_scaled_mm(a, b.t().float(), scale_a * scale_b, bias, out_dtype)

    def timer(fn):
        fn()
        out_features, _, fast = calls[-1]
        return 1.2 if fast and out_features == 16 else 1.0  # fast slower on the 16 x 32 shape only

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    agreed = []
    timed = fp8.tune_accumulation([slow_a, slow_b, fast_c, emulated], rows=6,
                                  agree=lambda v: agreed.append(v) or v, timer=timer)
    assert [(n, k) for n, k, _, _ in timed] == [(16, 32), (32, 32)] and agreed == [1, 0]
    assert slow_a.exact_accum_rows == slow_b.exact_accum_rows == {6} and fast_c.exact_accum_rows == set()
    calls.clear()
    for method in (slow_a, fast_c):
        for rows in (6, 5):
            method.apply(method.prepare(torch.randn(rows, 32, generator=gen)))
    assert calls == [(16, 6, False), (16, 5, True), (32, 6, True), (32, 5, True)]


def test_tune_accumulation_follows_the_group(monkeypatch):
    """Every rank takes the group's choice: a rank that measured fast slower keeps it when
    another rank did not (min over ranks)."""
    gen = torch.Generator().manual_seed(5)
    _, method = make_fp8(16, 32, gen)
    method.fp8, method.native, method._weight_compute = fp8.Fp8Ops(native_gemm=True, fast_accum=True,
                                                                   tune_accum=True), True, None
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: None)
    slow_fast = iter([2.0, 1.0, 2.0, 1.0])  # fast, default, fast, default
    fp8.tune_accumulation([method], rows=8, agree=lambda v: 0, timer=lambda fn: next(slow_fast))
    assert method.exact_accum_rows == set()
    # KILN_FP8_FAST_ACCUM=1: fast everywhere, nothing timed
    method.fp8 = fp8.Fp8Ops(native_gemm=True, fast_accum=True, tune_accum=False)
    assert fp8.tune_accumulation([method], rows=8, timer=lambda fn: pytest.fail("timed")) == []


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")
def test_tune_accumulation_on_the_gpu():
    """The real timer on real _scaled_mm calls: every shape timed both ways, and the product at
    the tuned row count (whichever accumulation was chosen) equals float64 of the same fp8
    operands within bf16 rounding."""
    from kiln.runtime.attention import select_kernels

    dev = torch.device("cuda")
    ctx = LinearContext(dev, torch.bfloat16, select_kernels(dev, "auto"), {"quant_algo": "FP8"})
    gen = torch.Generator().manual_seed(6)
    methods = []
    for n, k in ((256, 512), (1024, 512)):
        tensors = make_fp8(n, k, gen)[0]
        methods.append(Fp8Linear.load(ctx, tensors.get, "l"))
        assert methods[-1].native and methods[-1].fp8.fast_accum and methods[-1].fp8.tune_accum
    timed = fp8.tune_accumulation(methods, rows=1024)
    assert [(n, k) for n, k, _, _ in timed] == [(256, 512), (1024, 512)]
    assert all(0 < t < 1 for _, _, fast, default in timed for t in (fast, default))
    for method in methods:
        x = torch.randn(1024, 512, generator=gen)
        got = method.apply(method.prepare(x.to(dev, torch.bfloat16)))
        want = quantized_linear64(x.to(torch.bfloat16).float(), method.weight.cpu(), 6.0 / 448, 0.25 / 448)
        assert float((got.double().cpu() - want).norm() / want.norm()) < 1e-2
