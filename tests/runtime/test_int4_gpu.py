"""INT4 engines on CUDA (skipped without a GPU): the Triton W4A16 path (repacked weights, fused
small-batch GEMVs; in bf16 the tensor-core kernel for 1-32 rows, or with KILN_INT4_SMALL=tinygemm
tinygemm for 1-31; dequantize + cuBLAS above; CUDA graphs) against the same engine on the CPU
reference path (dequantize, then multiply), teacher-forced and greedy; the bf16 routes against
float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.engine_builder import build_engine
from kiln.runtime import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int4-gpu") / "engine"
    build_engine(None, out, random_weights="tiny-llama", int4_awq=True, group_size=32, dtype="float32", progress=False)
    return out


def _run(engine: Path, device: str, prompts: list[list[int]]) -> list:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    with LLM(engine, device=device, max_model_len=2048, max_num_tokens=2048) as llm:
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_int4_engine_on_cuda_matches_the_cpu_reference(engine: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    # One long prompt and a few short ones (dequantize + cuBLAS prefills), decoding 1..5
    # sequences at once (fp32, no tinygemm: fused GEMVs up to 2 rows, dequantize + cuBLAS above).
    lengths = [1100, 7, 30, 3, 12]
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lengths]
    cuda, cpu = _run(engine, "cuda", prompts), _run(engine, "cpu", prompts)
    for got, want in zip(cuda, cpu):
        a = torch.tensor([e.logprob for e in got.prompt_logprobs[1:]])
        b = torch.tensor([e.logprob for e in want.prompt_logprobs[1:]])
        assert float((a - b).abs().max()) < 1e-2
        assert got.outputs[0].token_ids == want.outputs[0].token_ids


# ----------------------------------------------------------------------------- bf16 routes: mma, tinygemm, cuBLAS


@pytest.fixture(params=["mma", "tinygemm"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The small-batch route of bf16 INT4 linears made in the test (runtime/quant/int4.py MMA_ENV)."""
    monkeypatch.setenv("KILN_INT4_SMALL", request.param)
    return request.param


def _on_route(method, route: str) -> None:
    if route == "mma":
        assert method.mma is not None and method.tinygemm is None
    else:
        assert method.mma is None and method.tinygemm is not None


def _triton_int4(n: int, k: int, group: int, zero: bool, prequant: bool, seed: int, name: str = "l"):
    """An Int4Linear on CUDA with the Triton kernel set in bf16, its float64 W and its prequant."""
    from kiln.engine_builder.int4 import pack_int4
    from kiln.runtime.attention import select_kernels
    from kiln.runtime.linear import LinearContext
    from kiln.runtime.quant.int4 import Int4Linear

    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.005).to(torch.bfloat16)
    z = (torch.randn(k // group, n, generator=gen) * 0.02).to(torch.bfloat16)
    p = (0.5 + torch.rand(1, k, generator=gen)).to(torch.bfloat16)
    tensors = {f"{name}.weight": pack_int4(q), f"{name}.weights_scaling_factor": s, f"{name}.zero": z,
               f"{name}.prequant_scaling_factor": p}
    quant = {"quant_algo": "W4A16_AWQ", "group_size": group, "has_zero_point": zero, "pre_quant_scale": prequant}
    dev = torch.device("cuda")
    ctx = LinearContext(dev, torch.bfloat16, select_kernels(dev, "triton"), quant)
    w = q.double() * s.double().t().repeat_interleave(group, 1)
    if zero:
        w = w + z.double().t().repeat_interleave(group, 1)
    return Int4Linear.load(ctx, tensors.get, name), tensors, w.cuda(), (p.reshape(-1).cuda() if prequant else None)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 output: one rounding (2^-9) plus the summation order, relative to the output's size."""
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("m", [1, 2, 8, 16])
@pytest.mark.parametrize("fusion", ["none", "norm", "silu_mul", "residual", "prequant"])
def test_small_matches_float64(m: int, fusion: str, route: str) -> None:
    """``small`` with each fusion (unfused around the tensor-core kernel or tinygemm) against
    float64 of the reference's rounding points: the prologue (layers.linear_prologue, one bf16
    rounding), dtype(x * p), then x' @ W^T (+ residual) in float64."""
    from kiln.runtime.layers import linear_prologue

    n, k = 384, 256
    method, _, w, p = _triton_int4(n, k, 32 if fusion == "prequant" else 128, zero=fusion != "prequant",
                                   prequant=fusion == "prequant", seed=m)
    _on_route(method, route)
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 2 * k if fusion == "silu_mul" else k, device="cuda", generator=gen).to(torch.bfloat16)
    norm_w = (1 + 0.3 * torch.randn(k, device="cuda", generator=gen)).to(torch.bfloat16)
    residual = torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16)
    kwargs = {"none": {}, "prequant": {}, "norm": {"norm_weight": norm_w, "eps": 1e-5},
              "silu_mul": {"silu_mul": True}, "residual": {"residual": residual}}[fusion]
    got = method.small(x, **kwargs)
    x_in = linear_prologue(x, kwargs.get("norm_weight"), 1e-5, fusion == "silu_mul")
    if p is not None:
        x_in = (x_in.float() * p.float()).to(torch.bfloat16)
    want = x_in.double() @ w.T
    if fusion == "residual":
        want = want + residual.double()
    _close(got, want)


@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16, 17, 32, 33, 200])
def test_apply_matches_float64(m: int, route: str) -> None:
    """``apply`` on each route: the tensor-core kernel (1-32 rows: one to four B tiles) or tinygemm
    (1-31), dequantize + cuBLAS above."""
    method, _, w, _ = _triton_int4(208, 512, 64, zero=True, prequant=False, seed=10 + m)
    _on_route(method, route)
    x = torch.randn(m, 512, device="cuda").to(torch.bfloat16)
    _close(method.apply(x), x.double() @ w.T)


def test_concat_is_the_layout_of_the_joined_weight(route: str) -> None:
    """Gate and up joined: tinygemm's tiles of 8 outputs and the tensor-core kernel's tiles of 16
    are their layouts' outer dimension, so the parts' packed weights concatenate into exactly the
    joined weight's."""
    from kiln.runtime.quant.int4 import Int4Linear

    a, ta, _, _ = _triton_int4(64, 256, 128, zero=True, prequant=False, seed=20, name="a")
    b, tb, _, _ = _triton_int4(48, 256, 128, zero=True, prequant=False, seed=21, name="b")
    joined = {f"j.{key}": torch.cat([ta[f"a.{key}"], tb[f"b.{key}"]], dim=0 if key == "weight" else 1)
              for key in ("weight", "weights_scaling_factor", "zero")}
    whole = Int4Linear.load(a.ctx, joined.get, "j")
    fused = Int4Linear.concat([a, b])
    _on_route(fused, route)
    if route == "mma":
        assert all(torch.equal(f, w) for f, w in zip(fused.mma, whole.mma))
    else:
        assert torch.equal(fused.tinygemm.packed, whole.tinygemm.packed)
        assert torch.equal(fused.tinygemm.scales_and_zeros, whole.tinygemm.scales_and_zeros)
    assert torch.equal(fused.weight, whole.weight)


@pytest.mark.parametrize("m", [2, 16])
def test_small_captures_in_a_cuda_graph(m: int, route: str) -> None:
    method, _, w, _ = _triton_int4(256, 256, 128, zero=True, prequant=False, seed=30)
    norm_w = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
    residual = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (Triton compiles) outside the capture
        method.small(x, norm_weight=norm_w, eps=1e-5)
        method.small(x, residual=residual)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = method.small(method.small(x, norm_weight=norm_w, eps=1e-5), residual=residual)
    x.copy_(torch.randn(m, 256, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, method.small(method.small(x, norm_weight=norm_w, eps=1e-5), residual=residual))


@pytest.fixture(scope="module")
def bf16_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int4-gpu-bf16") / "engine"
    build_engine(None, out, random_weights="tiny-llama", int4_awq=True, group_size=32, dtype="bfloat16", progress=False)
    return out


LOGPROB_SHIFT = 0.05  # bf16 engines: rounding of activations differs between paths, not the weights


def test_int4_bf16_engine_matches_the_reference_path(bf16_engine: Path, route: str) -> None:
    """The bf16 engine on CUDA on the Triton kernel set (graphs and eager; every linear holds a
    weight of the route: tensor-core kernel or tinygemm) against the same engine on the torch reference ops (CUDA, eager)
    and on the CPU (fp32): prompt logprobs (prefills of 3..1100 rows: the route up to 31-32 rows,
    dequantize + cuBLAS above) and the top
    logprobs of each generated token while the tokens before it agree (decode of 5 rows on
    ``apply``, then of 1 row on the fused small-batch path) are within LOGPROB_SHIFT; graphs
    and eager give the same first tokens."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in [1100, 7, 30, 3, 12]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0, logprobs=2)
    runs = {}
    for name, options in {"graphs": {"device": "cuda"}, "eager": {"device": "cuda", "enforce_eager": True},
                          "torch": {"device": "cuda", "kernel_backend": "torch", "enforce_eager": True},
                          "cpu": {"device": "cpu"}}.items():
        with LLM(bf16_engine, max_model_len=2048, max_num_tokens=2048, **options) as llm:
            if name != "cpu":
                linears = [lin.method for layer in llm.engine.runner.model.layers for lin in layer.linears]
                for lin in linears:
                    if name == "torch":
                        assert lin.mma is None and lin.tinygemm is None
                    else:
                        _on_route(lin, route)
            batch = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            alone = llm.generate([{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)
            runs[name] = batch + alone
    for got_g, got_e in zip(runs["graphs"], runs["eager"]):
        assert got_g.outputs[0].token_ids[:3] == got_e.outputs[0].token_ids[:3]
    for ref_name in ("torch", "cpu"):
        for got, want in zip(runs["graphs"], runs[ref_name]):
            _assert_logprobs_agree(got, want, ref_name)


def _assert_logprobs_agree(got, want, ref_name: str) -> None:
    a = torch.tensor([e.logprob for e in got.prompt_logprobs[1:]])
    b = torch.tensor([e.logprob for e in want.prompt_logprobs[1:]])
    assert float((a - b).abs().max()) < LOGPROB_SHIFT, ref_name
    out, ref = got.outputs[0], want.outputs[0]
    for i, (lp, ref_lp) in enumerate(zip(out.logprobs, ref.logprobs)):
        if out.token_ids[:i] != ref.token_ids[:i]:
            break  # a near-tie flipped earlier: later positions condition on different tokens
        top, ref_top = dict(lp.top), dict(ref_lp.top)
        shared = top.keys() & ref_top.keys()
        assert shared and max(abs(top[t] - ref_top[t]) for t in shared) < LOGPROB_SHIFT, (ref_name, i)
