"""LLMEngine greedy outputs against transformers' generate on the same weights (CPU, float32).

Every architecture (Llama, Llama tied + llama3 rope scaling, Mistral, Qwen2, Qwen3) goes
through the builder and the whole engine (scheduler, runner, sampler) and must reproduce HF's
greedy tokens exactly, alone and under batching, chunked prefill, prefix caching, preemption
and requests arriving mid-decode.
"""

from __future__ import annotations

import pytest
from test_e2e_helpers import (
    TINY_KINDS,
    OutputCollector,
    TinyEngine,
    drain,
    greedy,
    make_tiny_engine,
    random_prompts,
)

NEW_TOKENS = 8
BATCH_LENGTHS = [1, 3, 5, 7, 9, 11, 13, 16, 17, 19, 21, 24, 27, 30, 33, 38]  # 16 requests


@pytest.fixture(scope="module", params=TINY_KINDS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return make_tiny_engine(request.param, tmp_path_factory.mktemp(request.param))


def batch_prompts(tiny: TinyEngine) -> list[list[int]]:
    """The same 16 prompts in every test (HF references are memoised per prompt)."""
    return random_prompts(1, BATCH_LENGTHS, tiny.vocab_size)


def run_and_compare(tiny: TinyEngine, engine, prompts: list[list[int]], max_tokens: int = NEW_TOKENS) -> dict:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(max_tokens))
    outputs = drain(engine)
    assert sorted(outputs) == sorted(f"r{i}" for i in range(len(prompts)))
    for i, prompt in enumerate(prompts):
        out = outputs[f"r{i}"]
        assert out.finished and out.prompt_token_ids == prompt
        (choice,) = out.outputs
        assert choice.finish_reason == "length"
        assert choice.token_ids == tiny.hf_greedy(prompt, max_tokens), f"request r{i} ({len(prompt)} prompt tokens)"
    return outputs


def test_single_request(tiny: TinyEngine) -> None:
    engine = tiny.engine()
    (prompt,) = random_prompts(0, [12], tiny.vocab_size)
    run_and_compare(tiny, engine, [prompt], max_tokens=16)
    stats = engine.get_stats()
    assert stats.prompt_tokens == 12 and stats.generation_tokens == 16
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_batch_of_16_different_lengths(tiny: TinyEngine) -> None:
    engine = tiny.engine()
    run_and_compare(tiny, engine, batch_prompts(tiny))


def test_chunked_prefill_small_token_budget(tiny: TinyEngine) -> None:
    """A 16-token step budget splits the longer prompts over several steps."""
    engine = tiny.engine(max_num_tokens=16)
    run_and_compare(tiny, engine, batch_prompts(tiny)[-6:])


def test_prefix_cache_hits_keep_outputs(tiny: TinyEngine) -> None:
    """A shared 'system prompt' of 5 full blocks is served from the cache to later requests."""
    (system,) = random_prompts(3, [20], tiny.vocab_size)
    prompts = random_prompts(4, [3, 6, 9], tiny.vocab_size, prefix=system)
    engine = tiny.engine()
    run_and_compare(tiny, engine, prompts[:1])  # fills the cache
    before = engine.get_stats()
    assert before.prefix_cache_hits == 0
    run_and_compare(tiny, engine, prompts[1:])
    stats = engine.get_stats()
    assert stats.prefix_cache_hits - before.prefix_cache_hits >= 2 * 20  # every later request hit the prefix
    assert stats.prefix_cache_queries > before.prefix_cache_queries


def test_preemption_and_recompute(tiny: TinyEngine) -> None:
    """A 64-token KV pool cannot hold 8 growing requests: some are preempted and recomputed."""
    engine = tiny.engine(capacity_policy="max_utilization", num_kv_cache_tokens=64, max_model_len=64)
    run_and_compare(tiny, engine, batch_prompts(tiny)[6:14])
    stats = engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.kv_cache_usage == 0.0


def test_requests_arriving_while_others_decode(tiny: TinyEngine) -> None:
    engine = tiny.engine()
    prompts = batch_prompts(tiny)[::3]
    collector = OutputCollector()
    engine.add_request("r0", prompts[0], greedy(NEW_TOKENS))
    for i, prompt in enumerate(prompts[1:], start=1):
        for _ in range(i):  # let the earlier ones decode a few tokens first
            collector.step(engine)
        engine.add_request(f"r{i}", prompt, greedy(NEW_TOKENS))
    final = drain(engine, collector)
    for i, prompt in enumerate(prompts):
        assert final[f"r{i}"].outputs[-1].token_ids == tiny.hf_greedy(prompt, NEW_TOKENS), f"request r{i}"
