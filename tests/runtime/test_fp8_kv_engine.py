"""Whole engines with an FP8 KV cache (tiny random models, CPU): exactly transformers' arithmetic
with the same K/V quantization, and close to the same engine without it; the kv_cache_dtype
options; on a GPU, Triton kernels and CUDA graphs against the torch reference."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fp8_kv_scales import add_fp8_kv_scales
from test_e2e_helpers import TinyEngine, drain, greedy, make_tiny_engine, random_prompts

from kiln.engine_builder import build_engine
from kiln.runtime import LLMEngine

FP8 = torch.float8_e4m3fn
# E4M3 keeps 3 mantissa bits: each K/V element moves by up to 2^-4 of itself. On these tiny random
# models that moves the chosen tokens' logprobs by ~0.06 nats on average and by at most ~0.27
# (measured over 80 prompts of llama and qwen2); the bounds below leave about 2x.
MAX_LOGPROB_SHIFT = 0.5
MEAN_LOGPROB_SHIFT = 0.15
# The same FP8 engine through Triton kernels and through the torch reference ops on one GPU: the
# same quantization, different rounding of the attention dots (fp16 vs bf16 for bf16 models). On
# an H200 the bf16 tiny models' first tokens moved by up to 0.074 (llama) and 0.067 (qwen2); a
# random bf16 Llama-3.2-1B without FP8 moves by up to 0.062 between the same two paths. A wrong
# scale or a misread cache moves them by whole nats.
GPU_LOGPROB_SHIFT = 0.15


@dataclass
class Fp8Pair:
    tiny: TinyEngine
    hf_dir: Path
    fp8_dir: Path
    scales: list[float]
    last_engine: LLMEngine | None = None  # the engine of the last run (its runner and cache)

    def run(self, engine_dir: Path, prompts: list[list[int]], max_tokens: int, **options) -> list:
        """Greedy completions (with logprobs) of the prompts on a CPU engine of ``engine_dir``."""
        engine = LLMEngine.from_engine_dir(engine_dir, device="cpu", block_size=4, max_model_len=128, **options)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, greedy(max_tokens, logprobs=2))
        outputs = drain(engine)
        self.last_engine = engine
        return [outputs[str(i)].outputs[0] for i in range(len(prompts))]


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # GQA 2 and GQA 4 (+ qkv bias)
def pair(request, tmp_path_factory: pytest.TempPathFactory) -> Fp8Pair:
    root = tmp_path_factory.mktemp(request.param)
    tiny = make_tiny_engine(request.param, root)
    fp8_dir = root / "fp8-engine"
    shutil.copytree(tiny.engine_dir, fp8_dir)
    scales = add_fp8_kv_scales(fp8_dir, _calibration_prompts(tiny.vocab_size))
    return Fp8Pair(tiny, root / f"{request.param}-hf", fp8_dir, scales)


def _calibration_prompts(vocab_size: int) -> list[list[int]]:
    return random_prompts(1, [40, 60, 30], vocab_size)


def _fp8_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention over K/V rounded through E4M3 with the layer's scale
    (x * fp32(1/s), saturated, to fp8 and back times s): the arithmetic of TensorRT-LLM's format."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    s = module.kv_scale
    inv = float(torch.tensor(1.0) / torch.tensor(s))

    def fake_quant(x: torch.Tensor) -> torch.Tensor:
        return (x * inv).clamp(-448, 448).to(FP8).float() * s

    return eager_attention_forward(module, query, fake_quant(key), fake_quant(value), attention_mask, scaling,
                                   dropout, **kwargs)


def _hf_fp8_model(pair: Fp8Pair) -> torch.nn.Module:
    """The pair's transformers model with ``_fp8_attention`` and the engine's scales."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("kiln_fp8_kv", _fp8_attention)
    AttentionMaskInterface.register("kiln_fp8_kv", eager_mask)  # causal, as for "eager"
    model = AutoModelForCausalLM.from_pretrained(pair.hf_dir, dtype=torch.float32,
                                                 attn_implementation="kiln_fp8_kv").eval()
    for layer, scale in zip(model.model.layers, pair.scales):
        layer.self_attn.kv_scale = scale
    return model


def _hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


def test_fp8_engine_computes_transformers_arithmetic_with_quantized_kv(pair: Fp8Pair) -> None:
    prompts = random_prompts(7, [5, 23, 48], pair.tiny.vocab_size)
    outputs = pair.run(pair.fp8_dir, prompts, 8)
    runner = pair.last_engine.runner
    assert all(kv.dtype == FP8 for kv in runner.kv_cache.kv)
    assert [layer.kv_scales["k_scale"] for layer in runner.model.layers] == pair.scales
    hf = _hf_fp8_model(pair)
    for prompt, out in zip(prompts, outputs):
        tokens, logprobs = _hf_greedy(hf, prompt, 8)
        assert out.token_ids == tokens
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs]), torch.tensor(logprobs),
                                   rtol=0, atol=1e-4)


def test_fp8_engine_is_close_to_the_unquantized_engine(pair: Fp8Pair) -> None:
    prompts = random_prompts(11, [3, 9, 17, 30, 44, 61, 75, 90], pair.tiny.vocab_size)
    plain = pair.run(pair.tiny.engine_dir, prompts, 1)
    fp8 = pair.run(pair.fp8_dir, prompts, 1)
    shifts = []
    for a, b in zip(plain, fp8):
        top_a, top_b = dict(a.logprobs[0].top), dict(b.logprobs[0].top)
        shifts += [abs(top_a[t] - top_b[t]) for t in top_a.keys() & top_b.keys()]
        margin = a.logprobs[0].top[0][1] - a.logprobs[0].top[1][1]
        if margin > 2 * MAX_LOGPROB_SHIFT:  # no shift within the bound can reorder these two
            assert a.token_ids == b.token_ids
    assert len(shifts) >= len(prompts)
    assert max(shifts) < MAX_LOGPROB_SHIFT and sum(shifts) / len(shifts) < MEAN_LOGPROB_SHIFT
    assert max(shifts) > 1e-4  # the cache really was quantized


def test_model_option_ignores_the_engine_scales(pair: Fp8Pair) -> None:
    prompts = random_prompts(3, [6, 20], pair.tiny.vocab_size)
    plain = pair.run(pair.tiny.engine_dir, prompts, 4)
    forced = pair.run(pair.fp8_dir, prompts, 4, kv_cache_dtype="model")
    assert pair.last_engine.runner.kv_cache.kv[0].dtype == torch.float32
    assert [o.token_ids for o in forced] == [o.token_ids for o in plain]
    assert [[lp.logprob for lp in o.logprobs] for o in forced] == [[lp.logprob for lp in o.logprobs] for o in plain]


def test_fp8_option_without_scales_uses_scale_one(pair: Fp8Pair, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kiln.runtime.fp8_kv"):
        out = pair.run(pair.tiny.engine_dir, random_prompts(4, [12], pair.tiny.vocab_size), 3, kv_cache_dtype="fp8")
    assert "scale 1.0" in caplog.text
    runner = pair.last_engine.runner
    assert runner.kv_cache.kv[0].dtype == FP8 and runner.model.layers[0].kv_scales == {"k_scale": 1.0, "v_scale": 1.0}
    assert len(out[0].token_ids) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the attention dots run in fp16
def test_fp8_kv_on_gpu_matches_the_torch_reference(pair: Fp8Pair, dtype: str, tmp_path: Path) -> None:
    """Triton kernels with CUDA graphs, Triton eager and the torch reference ops on the same FP8
    engine: graphs and eager agree on the first decode tokens (later ones may flip near-ties of a
    random model); the reference's first-token logprobs sit within GPU_LOGPROB_SHIFT of the
    kernels' (bf16: Triton's attention dots run in fp16, the reference's in bf16), and its first
    token is the same wherever the kernels' top-2 margin is wider than twice that."""
    engine_dir = pair.fp8_dir
    if dtype == "bfloat16":
        engine_dir = tmp_path / "bf16-fp8"
        build_engine(pair.hf_dir, engine_dir, dtype="bfloat16", progress=False)
        add_fp8_kv_scales(engine_dir, _calibration_prompts(pair.tiny.vocab_size))
    prompts = random_prompts(5, [7, 33, 64, 90], pair.tiny.vocab_size)
    runs = {}
    for name, options in {"graphs": {}, "eager": {"enforce_eager": True},
                          "torch": {"kernel_backend": "torch", "enforce_eager": True}}.items():
        engine = LLMEngine.from_engine_dir(engine_dir, device="cuda", block_size=16, max_model_len=128,
                                           num_kv_cache_tokens=4096, max_batch_size=8, **options)
        try:
            for i, prompt in enumerate(prompts):
                engine.add_request(str(i), prompt, greedy(8, logprobs=2))
            outputs = drain(engine)
            assert engine.runner.kv_cache.kv[0].dtype == FP8
            runs[name] = [outputs[str(i)].outputs[0] for i in range(len(prompts))]
        finally:
            engine.shutdown()
    assert [o.token_ids[:3] for o in runs["graphs"]] == [o.token_ids[:3] for o in runs["eager"]]
    for kernels, reference in zip(runs["eager"], runs["torch"]):
        top = dict(kernels.logprobs[0].top)
        ref_top = dict(reference.logprobs[0].top)
        shared = top.keys() & ref_top.keys()
        assert shared and max(abs(top[t] - ref_top[t]) for t in shared) < GPU_LOGPROB_SHIFT
        margin = kernels.logprobs[0].top[0][1] - kernels.logprobs[0].top[1][1]
        if margin > 2 * GPU_LOGPROB_SHIFT:
            assert reference.token_ids[0] == kernels.token_ids[0]
