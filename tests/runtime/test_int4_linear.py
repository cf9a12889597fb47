"""The INT4 linear method (CPU reference path) against float64 computations of the layout's
definition, W[n, k] = q[n, k] * s[k // g, n] + z[k // g, n], x' = x * prequant."""

from __future__ import annotations

import pytest
import torch

from kiln.engine_builder.int4 import pack_int4
from kiln.runtime.attention import KernelSet
from kiln.runtime.linear import Linear, LinearContext, UnsupportedQuantizationError, linear_method_for
from kiln.runtime.quant.int4 import Int4Linear, Int4RtnLinear


def ctx(zero=True, pre=False, group=32):
    quant = {"quant_algo": "W4A16_AWQ", "group_size": group, "has_zero_point": zero, "pre_quant_scale": pre}
    return LinearContext(torch.device("cpu"), torch.float32, KernelSet(), quant)


def make_int4(n, k, gen, group=32, zero=True, prequant=False, name="l"):
    """Engine tensors of one linear and its float64 W (and prequant)."""
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    s = torch.rand(k // group, n, generator=gen) * 0.02 + 0.01
    z = torch.randn(k // group, n, generator=gen) * 0.02
    w = q.double() * s.double().t().repeat_interleave(group, 1)
    tensors = {f"{name}.weight": pack_int4(q), f"{name}.weights_scaling_factor": s}
    if zero:
        tensors[f"{name}.zero"] = z
        w = w + z.double().t().repeat_interleave(group, 1)
    p = None
    if prequant:
        p = 0.5 + torch.rand(1, k, generator=gen)
        tensors[f"{name}.prequant_scaling_factor"] = p
    return tensors, w, p


def test_registered_under_both_algos():
    assert linear_method_for("W4A16_AWQ") is Int4Linear and linear_method_for("W4A16") is Int4RtnLinear


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("prequant", [False, True])
def test_apply_matches_float64(zero, prequant):
    gen = torch.Generator().manual_seed(0)
    tensors, w, p = make_int4(48, 128, gen, zero=zero, prequant=prequant)
    method = Int4Linear.load(ctx(zero, prequant), tensors.get, "l")
    x, bias = torch.randn(7, 128, generator=gen), torch.randn(48, generator=gen)
    y = Linear(method, bias)(method.prepare(x))
    x64 = x.double() if p is None else x.double() * p.double()
    torch.testing.assert_close(y.double(), x64 @ w.T + bias.double(), rtol=1e-5, atol=1e-5)


def test_small_matches_the_unfused_chain():
    gen = torch.Generator().manual_seed(1)
    tensors, w, p = make_int4(32, 64, gen, prequant=True)
    method = Int4Linear.load(ctx(pre=True), tensors.get, "l")
    h, residual, norm_w = (torch.randn(3, 64, generator=gen), torch.randn(3, 32, generator=gen),
                           1 + 0.3 * torch.randn(64, generator=gen))
    normed = method.norm_input(h, None, norm_w, 1e-5)[0]
    want = residual + method.apply(normed)
    torch.testing.assert_close(method.small(h, norm_weight=norm_w, eps=1e-5, residual=residual), want)
    gate_up = torch.randn(3, 128, generator=gen)
    torch.testing.assert_close(method.small(gate_up, silu_mul=True), method.apply(method.act_input(gate_up)))


def test_concat_and_identity_prequant():
    gen = torch.Generator().manual_seed(2)
    ta, wa, _ = make_int4(16, 64, gen, name="a")
    tb, wb, _ = make_int4(24, 64, gen, name="b")
    tensors = {**ta, **tb, "a.prequant_scaling_factor": torch.ones(1, 64), "b.prequant_scaling_factor": torch.ones(1, 64)}
    c = ctx(pre=True)
    fused = Int4Linear.concat([Int4Linear.load(c, tensors.get, "a"), Int4Linear.load(c, tensors.get, "b")])
    assert fused.prequant is None  # all ones: the builder folded these scales, the multiply is skipped
    x = torch.randn(5, 64, generator=gen)
    torch.testing.assert_close(fused.apply(fused.prepare(x)).double(), x.double() @ torch.cat([wa, wb]).T,
                               rtol=1e-5, atol=1e-5)


def test_rejects_bad_tensors():
    gen = torch.Generator().manual_seed(3)
    tensors, _, _ = make_int4(16, 64, gen)
    with pytest.raises(UnsupportedQuantizationError, match="int8"):
        Int4Linear.load(ctx(), {**tensors, "l.weight": tensors["l.weight"].float()}.get, "l")
    with pytest.raises(UnsupportedQuantizationError, match="expected a float"):
        Int4Linear.load(ctx(), {**tensors, "l.weights_scaling_factor": torch.ones(16, 2)}.get, "l")
    with pytest.raises(UnsupportedQuantizationError, match="group_size 48"):
        Int4Linear.load(ctx(group=48), tensors.get, "l")
    with pytest.raises(KeyError, match="l.zero"):
        Int4Linear.load(ctx(), {k: v for k, v in tensors.items() if k != "l.zero"}.get, "l")
