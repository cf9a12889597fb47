"""Speculative decoding on CUDA (skipped without a GPU): verify steps through their CUDA graphs
(padded to 1 + K tokens per row), the Triton kernels and a draft model with graphs of its own,
greedy-equal to transformers on the same tiny weights (float32)."""

from __future__ import annotations

import pytest
import torch
from test_e2e_helpers import TinyEngine, drain, greedy, make_tiny_engine, random_prompts

from kiln.runtime.bench import AcceptanceControlledProposer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_OPTIONS = {"device": "cuda", "num_kv_cache_tokens": 4096, "max_batch_size": 16, "max_num_tokens": 256}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return make_tiny_engine("qwen3", tmp_path_factory.mktemp("spec-gpu"))


def run_then_shut_down(engine, prompts: list[list[int]], new_tokens: int, check=None) -> tuple[dict, object]:
    """Greedy outputs by request id and the speculation counters; the engine is freed after."""
    try:
        if check is not None:
            check(engine)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(new_tokens))
        outputs = {rid: out.outputs[0].token_ids for rid, out in drain(engine).items()}
        return outputs, engine.get_stats().spec_decode
    finally:
        engine.shutdown()


@pytest.mark.parametrize("num_requests", [1, 3, 6])
def test_verify_graphs_keep_greedy_outputs(tiny: TinyEngine, num_requests: int) -> None:
    prompts = random_prompts(60 + num_requests, [5, 9, 3, 12, 7, 4][:num_requests], tiny.vocab_size)
    expected = {f"r{i}": tiny.hf_greedy(p, 24) for i, p in enumerate(prompts)}
    proposer = AcceptanceControlledProposer(expected, 0.6, tiny.vocab_size, seed=num_requests)
    engine = tiny.engine(speculative="external", proposer=proposer, num_speculative_tokens=3, **GPU_OPTIONS)
    replayed: list[int] = []

    def count_replays(engine) -> None:
        graphs = engine.runner.verify_graphs
        assert graphs is not None and graphs.graphs, "verify graphs were not captured"
        replay = graphs.replay
        graphs.replay = lambda size: replayed.append(size) or replay(size)

    outputs, stats = run_then_shut_down(engine, prompts, 24, count_replays)
    assert outputs == expected
    assert replayed and 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_draft_model_with_its_own_graphs(tiny: TinyEngine) -> None:
    prompts = random_prompts(70, [6, 11], tiny.vocab_size)
    engine = tiny.engine(speculative="draft", draft_engine=str(tiny.engine_dir), num_speculative_tokens=4,
                         **GPU_OPTIONS)
    outputs, stats = run_then_shut_down(engine, prompts, 20,
                                        lambda e: e.proposer.runner.graphs is not None or pytest.fail("no draft graphs"))
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"] == tiny.hf_greedy(prompt, 20)
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0  # it drafts for itself
