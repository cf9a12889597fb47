"""build-llm --int4-awq / --int4: TensorRT-LLM's W4A16 layout (names, packed int8 weights, group
scales and zero points, manifest), tensor-parallel shards, the AWQ search beating plain
round-to-nearest on held-out activations of a tiny model, and tiny INT4 engines computing their
INT4 function (runtime CPU reference vs transformers on the engine's dequantized weights) close
to the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import ENGINE_LINEARS as LINEARS
from tiny_models import hf_with_engine_weights, make_tiny_hf_checkpoint

from kiln.engine_builder import build_engine, load_engine
from kiln.engine_builder.awq import output_error
from kiln.engine_builder.int4 import dequantize, fake_quantize, unpack_int4
from kiln.engine_builder.int4_quantize import GROUPS, AwqCalibrator, Int4Options, Int4Recipe

TINY = dict(group_size=32, calib_samples=4, calib_seq_len=64, quality_samples=2, sample_rows=256)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    """A tiny Llama whose norms amplify a few channels (as real models' do), so AWQ has salient
    input channels to protect."""
    src = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("int4src") / "src", "llama", with_tokenizer=True, layers=2)
    tensors = load_file(src / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("layernorm.weight"):
            t[:4] *= 8.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.fixture(scope="module")
def engines(tiny_src: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int4")
    out = {"awq": root / "awq", "prequant": root / "prequant"}
    build_engine(tiny_src, out["awq"], int4=Int4Options(**TINY), progress=False)
    build_engine(tiny_src, out["prequant"], int4=Int4Options(dense="prequant", clip=False, **TINY),
                 quality_samples=0, progress=False)
    return out


def test_layout_and_manifest(engines: dict[str, Path]):
    config = json.loads((engines["awq"] / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 32,
                                      "has_zero_point": True, "pre_quant_scale": False,
                                      "exclude_modules": ["lm_head", "transformer.vocab_embedding"]}
    tensors = load_file(engines["awq"] / "rank0.safetensors")
    assert tensors["transformer.vocab_embedding.weight"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.float32
    shapes = {"attention.qkv": (128, 64), "attention.dense": (64, 64), "mlp.fc": (128, 64), "mlp.gate": (128, 64),
              "mlp.proj": (64, 128)}
    for layer in range(2):
        pre = f"transformer.layers.{layer}."
        for module, (n, k) in shapes.items():
            weight = tensors[f"{pre}{module}.weight"]
            assert weight.dtype == torch.int8 and weight.shape == (n, k // 2)
            for name in ("weights_scaling_factor", "zero"):
                t = tensors[f"{pre}{module}.{name}"]
                assert t.dtype == torch.float32 and t.shape == (k // 32, n)
            assert f"{pre}{module}.prequant_scaling_factor" not in tensors
    manifest = json.loads((engines["awq"] / "kiln.json").read_text())["quantization"]
    recipe, quality = manifest["recipe"], manifest["quality"]
    assert manifest["quant_algo"] == "W4A16_AWQ" and recipe["method"] == "awq" and recipe["group_size"] == 32
    assert manifest["calibration"]["samples"] == 4 and quality["scored"] == ["rtn", "awq"]
    assert quality["source_ppl"] > 1 and quality["rtn_ppl"] > 1 and quality["awq_ppl"] > 1
    # alpha = 0 (plain RTN) is on the grid: on the calibration rows the search never does worse.
    assert all(0 < g["mean_error_vs_rtn"] <= 1 for g in recipe["groups"].values())


def test_prequant_layout(engines: dict[str, Path]):
    """dense="prequant": TensorRT-LLM's pre-quantization scale on every linear; ones where AWQ
    folded the scale into the previous op, 1/s on attention.dense."""
    config = json.loads((engines["prequant"] / "config.json").read_text())["quantization"]
    assert config["pre_quant_scale"] is True
    tensors = load_file(engines["prequant"] / "rank0.safetensors")
    for module in LINEARS:
        p = tensors[f"transformer.layers.0.{module}.prequant_scaling_factor"]
        assert p.shape == (1, 128 if module == "mlp.proj" else 64)
        assert bool((p == 1).all()) == (module != "attention.dense")


def _engine_function_hf(src: Path, engine: Path):
    """transformers' model of the source with the engine's weights dequantized (W = q * s + z),
    its norms (AWQ scales folded in) and pre-quantization scales (hooks): the engine's function,
    computed without Kiln's runtime."""
    eng = load_file(engine / "rank0.safetensors")

    def weight(pre: str, m: str) -> torch.Tensor:
        return dequantize(unpack_int4(eng[f"{pre}{m}.weight"]), eng[f"{pre}{m}.weights_scaling_factor"],
                          eng[f"{pre}{m}.zero"], 32)

    def prequant(pre: str, m: str):
        p = eng.get(f"{pre}{m}.prequant_scaling_factor")
        return None if p is None else (lambda mod, args: (args[0] * p,))

    return hf_with_engine_weights(src, eng, weight, prequant)


@pytest.mark.parametrize("kind", ["awq", "prequant"])
def test_tiny_int4_engine_computes_its_int4_function(kind: str, engines: dict[str, Path], tiny_src: Path):
    """Teacher-forced logprobs of the INT4 engine (runtime, CPU reference) against transformers
    running the engine's dequantized weights (tight) and the unquantized source (INT4 noise)."""
    from transformers import AutoModelForCausalLM

    from kiln.runtime import LLM, SamplingParams

    prompt = torch.randint(3, 1000, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    with LLM(engines[kind], device="cpu", max_model_len=128) as llm:
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1),
                           use_tqdm=False)[0]
    got = torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]], dtype=torch.float64)
    function = _engine_function_hf(tiny_src, engines[kind])
    source = AutoModelForCausalLM.from_pretrained(tiny_src, dtype=torch.float32).eval()
    with torch.no_grad():
        for model, relative_bound in ((function, 1e-5), (source, 0.05)):  # of the mean |logprob| (~12 here)
            logits = model(torch.tensor([prompt])).logits[0].double()
            want = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            assert float((got - want).abs().mean()) < relative_bound * float(want.abs().mean())
        assert out.outputs[0].token_ids[0] == int(function(torch.tensor([prompt])).logits[0, -1].argmax())


def test_awq_search_beats_rtn_on_held_out_activations(tiny_src: Path):
    """Scales searched on calibration windows lower every linear group's output error against
    round-to-nearest on held-out windows the search never saw (activations of the source model,
    layer by layer, through the calibration module)."""
    from kiln.engine_builder.architectures import get_architecture
    from kiln.engine_builder.calibration import run_layerwise
    from kiln.engine_builder.quantize import tokenizer
    from kiln.engine_builder.source import HFCheckpoint

    src = HFCheckpoint(tiny_src)
    arch = get_architecture(src.config)
    mc = arch.model_config(src.config, 1, None)
    options = Int4Options(clip=False, gptq=False, **TINY)
    calib = options.calibration_set(tokenizer(tiny_src))
    recipe = Int4Recipe.for_options(options, torch.float32)
    run_layerwise(src, mc, arch.names, calib.calibration, AwqCalibrator(recipe, mc), sample_rows=256, progress=False)
    errors = {"awq": 0.0, "rtn": 0.0}

    def score(layer, w, stats):
        for group, (keys, site) in GROUPS.items():
            x, weight = stats[site].samples, torch.cat([w[k] for k in keys])
            s = recipe.layers[layer].scales[group]
            errors["awq"] += output_error(x, weight, fake_quantize(weight * s, 32, True, torch.float32) / s)
            errors["rtn"] += output_error(x, weight, fake_quantize(weight, 32, True, torch.float32))

    run_layerwise(src, mc, arch.names, calib.held_out[:4], score, sample_rows=256, progress=False)
    assert errors["awq"] < 0.9 * errors["rtn"], errors


def test_tp2_shards_reassemble_and_decode_like_tp1(tmp_path: Path):
    """Random weights at tp 1 and tp 2: the column-parallel shards are row blocks of the tp 1
    tensors (scales: column blocks), the row-parallel ones column blocks (scales: whole groups,
    row blocks); both engines decode the same greedy tokens."""
    from kiln.runtime import LLM, SamplingParams

    one, two = tmp_path / "tp1", tmp_path / "tp2"
    for out, tp in ((one, 1), (two, 2)):
        build_engine(None, out, random_weights="tiny-llama", int4=True, group_size=32, tp=tp, progress=False)
    full = load_file(one / "rank0.safetensors")
    ranks = [load_file(two / f"rank{r}.safetensors") for r in range(2)]
    pre = "transformer.layers.1."
    for module, dim in (("mlp.fc", 0), ("mlp.gate", 0), ("mlp.proj", 1), ("attention.dense", 1)):
        assert torch.equal(torch.cat([r[f"{pre}{module}.weight"] for r in ranks], dim=dim), full[f"{pre}{module}.weight"])
        for name in ("weights_scaling_factor", "zero"):
            joined = torch.cat([r[f"{pre}{module}.{name}"] for r in ranks], dim=1 - dim)
            assert torch.equal(joined, full[f"{pre}{module}.{name}"])
    prompts = [[5, 17, 99, 3, 250, 7], [42, 8, 600]]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    tokens = []
    for engine in (one, two):
        with LLM(engine, device="cpu", max_model_len=64) as llm:
            tokens.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                      params, use_tqdm=False)])
    assert tokens[0] == tokens[1]


def test_int4_with_fp8_kv_cache_layout(tmp_path: Path):
    out = tmp_path / "kv"
    build_engine(None, out, random_weights="tiny-llama", int4_awq=True, group_size=64, kv_cache_dtype="fp8",
                 progress=False)
    engine = load_engine(out)
    assert engine.model_config.quantization["kv_cache_quant_algo"] == "FP8"
    assert engine.model_config.quantization["has_zero_point"] is True
    for layer in range(2):
        kv = engine.tensors[f"transformer.layers.{layer}.attention.kv_cache_scaling_factor"]
        assert kv.dtype == torch.float32 and kv.shape == (1,) and float(kv) > 0


@pytest.mark.parametrize("args, message", [
    (["--int4-awq", "--tp", "4"], "attention.dense at tp 4: input width 16 is not a multiple of the group size 32"),
    (["--int4", "--group-size", "48"], "--group-size 48 is not supported"),
    (["--group-size", "64"], "need --int4-awq or --int4"),
    (["--int4", "--fp8"], "choose one of --fp8, --int4-awq and --int4"),
])
def test_rejected_options_are_one_line(args: list[str], message: str, tiny_src: Path, tmp_path: Path, capsys):
    from kiln.engine_builder.cli import main

    extra = ["--group-size", "32"] if "--group-size" not in args and "--fp8" not in args else []
    assert main([str(tiny_src), "--output", str(tmp_path / "x"), *args, *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()
