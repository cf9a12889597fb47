"""The whole engine on CUDA (skipped without a GPU): one step ahead, CUDA graphs, the fused
small-batch layers and the Triton kernels, against transformers on the same tiny weights."""

from __future__ import annotations

import pytest
import torch
from test_e2e_helpers import TinyEngine, drain, greedy, make_tiny_engine, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return make_tiny_engine("qwen3", tmp_path_factory.mktemp("gpu-engine"))


@pytest.mark.parametrize("num_requests", [1, 2, 5])
def test_engine_on_cuda_matches_transformers(tiny: TinyEngine, num_requests: int) -> None:
    # 1 and 2 requests decode through the fused GEMV layers; 5 through the unfused graphs;
    # the staggered prompt lengths make mixed prefill + decode steps too.
    prompts = random_prompts(50 + num_requests, [5, 9, 3, 12, 7][:num_requests], tiny.vocab_size)
    engine = tiny.engine(device="cuda", num_kv_cache_tokens=4096, max_batch_size=16, max_num_tokens=256)
    try:
        assert engine.runner.graphs is not None and engine.runner.model.small_batch_rows >= 1
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(16))
        outputs = drain(engine)
    finally:
        engine.shutdown()
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"].outputs[0].token_ids == tiny.hf_greedy(prompt, 16), f"request r{i}"
