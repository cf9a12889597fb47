"""INT4 engines on CUDA (skipped without a GPU): the Triton W4A16 path (repacked weights, fused
small-batch GEMVs, the GEMM, dequantize + cuBLAS for big prefills, CUDA graphs) against the same
engine on the CPU reference path (dequantize, then multiply), teacher-forced and greedy."""

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
    # One prompt long enough for the dequantize + cuBLAS prefill (>= 1024 rows), a few short
    # ones (GEMM prefill), decoding 1..5 sequences at once (fused GEMVs, then GEMVs and GEMMs).
    lengths = [1100, 7, 30, 3, 12]
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lengths]
    cuda, cpu = _run(engine, "cuda", prompts), _run(engine, "cpu", prompts)
    for got, want in zip(cuda, cpu):
        a = torch.tensor([e.logprob for e in got.prompt_logprobs[1:]])
        b = torch.tensor([e.logprob for e in want.prompt_logprobs[1:]])
        assert float((a - b).abs().max()) < 1e-2
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
