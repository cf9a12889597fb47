"""build-llm --fp8: TensorRT-LLM's FP8 layout (names, dtypes, scale shapes, shared qkv and
gate/up scales, tp shards, manifest), scale round trips, and a tiny FP8 engine computing close
to its source (runtime CPU emulation vs transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import hf_with_engine_weights, make_tiny_hf_checkpoint

from kiln.engine_builder import build_engine, load_engine
from kiln.engine_builder.errors import BuildOptionError
from kiln.engine_builder.quantize import Fp8Options

FP8 = torch.float8_e4m3fn
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
TINY_FP8 = Fp8Options(kv_cache_fp8=True, calib_samples=4, calib_seq_len=32, quality_samples=2, sample_rows=64)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("fp8src") / "src", "llama", with_tokenizer=True, layers=2)


@pytest.fixture(scope="module")
def tiny_fp8(tiny_src: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp8") / "engine"
    build_engine(tiny_src, out, fp8=TINY_FP8, progress=False)
    return out


def test_layout_and_manifest(tiny_fp8: Path, tiny_src: Path):
    config = json.loads((tiny_fp8 / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "group_size": 128,
                                      "has_zero_point": False, "pre_quant_scale": False,
                                      "exclude_modules": ["lm_head", "transformer.vocab_embedding"]}
    tensors = load_file(tiny_fp8 / "rank0.safetensors")
    assert tensors["transformer.vocab_embedding.weight"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.float32
    for layer in range(2):
        pre = f"transformer.layers.{layer}."
        for module in LINEARS:
            assert tensors[f"{pre}{module}.weight"].dtype == FP8
            for scale in ("weights_scaling_factor", "activation_scaling_factor"):
                t = tensors[f"{pre}{module}.{scale}"]
                assert t.dtype == torch.float32 and t.shape == (1,) and float(t) > 0
        kv = tensors[f"{pre}attention.kv_cache_scaling_factor"]
        assert kv.dtype == torch.float32 and kv.shape == (1,) and float(kv) > 0
        # fc and gate are one GEMM at run time: one weight scale and one input scale.
        for scale in ("weights_scaling_factor", "activation_scaling_factor"):
            assert torch.equal(tensors[f"{pre}mlp.fc.{scale}"], tensors[f"{pre}mlp.gate.{scale}"])
    manifest = json.loads((tiny_fp8 / "kiln.json").read_text())["quantization"]
    assert manifest["quant_algo"] == "FP8" and manifest["kv_cache_quant_algo"] == "FP8"
    calib = manifest["calibration"]
    assert calib["name"] == "pydoc-topics" and calib["samples"] == 4 and calib["seq_len"] == 32
    assert len(calib["sha256"]) == 64
    assert manifest["recipe"]["unquantized_layers"] == []
    quality = manifest["quality"]
    assert quality["held_out_samples"] == 2 and quality["source_ppl"] > 1 and quality["fp8_ppl"] > 1
    assert quality["fp8_kv"] in ("measured", "not measured (runtime lacks FP8 KV)")


def test_weights_keep_the_products(tiny_fp8: Path, tiny_src: Path):
    """The engine computes the source's linears up to fp8 rounding: qkv (smoothing folded into
    input_layernorm, undone here as source norm / engine norm) and dense on their own, the MLP
    (smoothing folded into post_layernorm and, for the down projection, into mlp.gate's rows) as
    a whole. GPTQ moves weights by more than one rounding step, so products are compared, not
    elements."""
    src = load_file(tiny_src / "model.safetensors")
    eng = load_file(tiny_fp8 / "rank0.safetensors")
    h = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for layer in range(2):
        pre, hf = f"transformer.layers.{layer}.", f"model.layers.{layer}."
        smooth = src[f"{hf}input_layernorm.weight"] / eng[f"{pre}input_layernorm.weight"]
        deq = {m: eng[f"{pre}{m}.weight"].float() * eng[f"{pre}{m}.weights_scaling_factor"] for m in LINEARS}
        want = torch.cat([src[f"{hf}self_attn.{p}_proj.weight"] for p in "qkv"])
        _assert_close_products(h, deq["attention.qkv"] / smooth, want)
        _assert_close_products(h, deq["attention.dense"], src[f"{hf}self_attn.o_proj.weight"])

        def mlp(norm, gate, up, down):
            x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm
            return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

        want = mlp(src[f"{hf}post_attention_layernorm.weight"], *(src[f"{hf}mlp.{p}_proj.weight"] for p in ("gate", "up", "down")))
        got = mlp(eng[f"{pre}post_layernorm.weight"], deq["mlp.fc"], deq["mlp.gate"], deq["mlp.proj"])
        # Three roundings in a row, GPTQ fitted to calibration inputs rather than these random
        # ones (~8% measured); a missing or misplaced fold scales channels by the smoothing factors.
        assert float((got - want).norm() / want.norm()) < 0.12


def _assert_close_products(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> None:
    # Per-tensor E4M3 rounding of the weights alone costs ~2-3% relative error in x @ W^T.
    assert float((x @ got.T - x @ want.T).norm() / (x @ want.T).norm()) < 0.05


def test_scale_round_trip_into_the_runtime(tiny_fp8: Path):
    """The scales the builder wrote are the ones the runtime multiplies by."""
    from kiln.runtime.attention import KernelSet
    from kiln.runtime.model import LlamaFamilyModel

    engine = load_engine(tiny_fp8)
    model = LlamaFamilyModel(engine.model_config, engine.tensors, torch.device("cpu"), torch.float32, KernelSet())
    pre = "transformer.layers.1."
    qkv = model.layers[1].qkv.method
    w, x = engine.tensors[f"{pre}attention.qkv.weights_scaling_factor"], engine.tensors[f"{pre}attention.qkv.activation_scaling_factor"]
    assert torch.equal(qkv.weight_scale, w) and torch.equal(qkv.input_scale, x) and torch.equal(qkv.out_scale, x * w)
    assert torch.equal(qkv.weight.view(torch.uint8), engine.tensors[f"{pre}attention.qkv.weight"].view(torch.uint8))


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E4M3 number (ties to even) in float arithmetic, not torch's fp8 cast."""
    v = v.clamp(-448.0, 448.0)
    step = torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0**-6))) - 3)
    return torch.round(v / step) * step


def _fake_quant_hf(tiny_src: Path, engine_dir: Path):
    """transformers' model of the source with the engine's FP8 weights (dequantized), norms
    (smoothing folded in) and input quantization (hooks): the engine's function, computed
    independently of Kiln's runtime."""
    eng = load_file(engine_dir / "rank0.safetensors")

    def weight(pre: str, m: str) -> torch.Tensor:
        return eng[f"{pre}{m}.weight"].float() * eng[f"{pre}{m}.weights_scaling_factor"]

    def quantize_input(pre: str, m: str):
        s_x = float(eng[f"{pre}{m}.activation_scaling_factor"])
        return lambda mod, args: (_e4m3(args[0] / s_x) * s_x,)

    return hf_with_engine_weights(tiny_src, eng, weight, quantize_input)


def test_tiny_fp8_engine_computes_its_fp8_function(tiny_fp8: Path, tiny_src: Path):
    """Teacher-forced logprobs of the FP8 engine (runtime, CPU emulation) against (1) transformers
    running the engine's own FP8 arithmetic (tight) and (2) the unquantized source (FP8 noise).
    The KV cache stays in the model dtype: the engine has KV scales, which ``auto`` would use,
    and the FP8 KV cache has its own tests (tests/runtime, tests/kernels)."""
    from transformers import AutoModelForCausalLM

    from kiln.runtime import LLM, SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (48,), generator=gen).tolist()
    with LLM(tiny_fp8, device="cpu", max_model_len=128, kv_cache_dtype="model") as llm:
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1),
                           use_tqdm=False)[0]
    got = torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]], dtype=torch.float64)
    with torch.no_grad():
        for model, mean_bound in ((_fake_quant_hf(tiny_src, tiny_fp8), 2e-3),
                                  (AutoModelForCausalLM.from_pretrained(tiny_src, dtype=torch.float32).eval(), 0.4)):
            want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1)
            ref = want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            assert float((got - ref).abs().mean()) < mean_bound
    # The fake-quant model's greedy continuation is the engine's.
    assert out.outputs[0].token_ids[0] == int(torch.log_softmax(_fake_quant_hf(tiny_src, tiny_fp8)(
        torch.tensor([prompt])).logits[0, -1], -1).argmax())


def test_tp2_shards_of_a_random_fp8_engine(tmp_path: Path):
    """Random weights with plausible scales; tp 2 shards reassemble to the tp 1 engine bit for bit."""
    one, two = tmp_path / "tp1", tmp_path / "tp2"
    build_engine(None, one, random_weights="tiny-llama", fp8=Fp8Options(), progress=False)
    build_engine(None, two, random_weights="tiny-llama", fp8=Fp8Options(), tp=2, progress=False)
    full = load_file(one / "rank0.safetensors")
    ranks = [load_file(two / f"rank{r}.safetensors") for r in range(2)]
    pre = "transformer.layers.0."
    for module, dim in (("mlp.fc", 0), ("mlp.gate", 0), ("mlp.proj", 1), ("attention.dense", 1)):
        joined = torch.cat([r[f"{pre}{module}.weight"] for r in ranks], dim=dim)
        assert joined.dtype == FP8 and torch.equal(joined.view(torch.uint8), full[f"{pre}{module}.weight"].view(torch.uint8))
        for scale in ("weights_scaling_factor", "activation_scaling_factor"):
            assert all(torch.equal(r[f"{pre}{module}.{scale}"], full[f"{pre}{module}.{scale}"]) for r in ranks)
    qkv = [r[f"{pre}attention.qkv.weight"].float() for r in ranks]  # 4 heads, 2 KV heads of 16: per rank q 32, k 16, v 16
    q, k, v = torch.cat([t[:32] for t in qkv]), torch.cat([t[32:48] for t in qkv]), torch.cat([t[48:] for t in qkv])
    assert torch.equal(torch.cat([q, k, v]), full[f"{pre}attention.qkv.weight"].float())
    assert json.loads((two / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"


def test_fp8_options_rejected_without_fp8(capsys, tiny_src: Path, tmp_path: Path):
    from kiln.engine_builder.cli import main

    assert main([str(tiny_src), "--output", str(tmp_path / "x"), "--kv-cache-dtype", "fp8"]) == 1
    assert "need --fp8" in capsys.readouterr().err
    with pytest.raises(BuildOptionError, match="calib"):
        Fp8Options(calib_samples=0)
