"""Speculative decoding through the whole engine (CPU, float32, tiny models): greedy outputs
must be token for token those of transformers (and of the engine without speculation).

Drafts come from the acceptance-controlled benchmark proposer (the reference continuation,
each token kept with a probability, so accepted runs and rejections both happen), from a
draft model (the model itself: everything accepted; another random model: almost nothing),
and from n-gram lookup. Around them: every architecture, chunked prefill, prefix hits,
preemption, an abort while the verify step runs, stop tokens inside accepted drafts, the
padded CUDA-graph verify path, penalties, min_tokens, logprobs and seeded sampling with n > 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_e2e_helpers import TINY_KINDS, OutputCollector, TinyEngine, drain, greedy, make_tiny_engine, random_prompts

from kiln.runtime import LLMEngine, SamplingParams
from kiln.runtime.bench import AcceptanceControlledProposer

pytestmark = pytest.mark.slow

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spec")


@pytest.fixture(scope="module")
def tiny(root: Path) -> TinyEngine:
    return make_tiny_engine("llama", root)


def oracle_engine(tiny: TinyEngine, references: dict[str, list[int]], keep: float = 0.6, k: int = 3,
                  **options) -> LLMEngine:
    proposer = AcceptanceControlledProposer(references, keep, tiny.vocab_size, seed=7)
    return tiny.engine(speculative="external", proposer=proposer, num_speculative_tokens=k, **options)


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    return {rid: out.outputs[0].token_ids for rid, out in drain(engine).items()}


def references(tiny: TinyEngine, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> dict[str, list[int]]:
    return {f"r{i}": tiny.hf_greedy(p, new_tokens) for i, p in enumerate(prompts)}


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_greedy_equal_to_transformers_for_every_architecture(root: Path, kind: str) -> None:
    tiny = make_tiny_engine(kind, root / kind)
    (system,) = random_prompts(3, [8], tiny.vocab_size)  # two full blocks shared: prefix hits
    prompts = random_prompts(4, [3, 13, 1, 6], tiny.vocab_size, prefix=system)
    expected = references(tiny, prompts)
    engine = oracle_engine(tiny, expected, max_num_tokens=16)  # chunked prefill too
    assert run(engine, prompts, greedy(NEW_TOKENS)) == expected
    stats = engine.get_stats()
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.prefix_cache_hits > 0
    assert stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens  # rejections too


def test_draft_models_and_ngram_lookup_keep_greedy_outputs(tiny: TinyEngine, root: Path) -> None:
    prompts = random_prompts(11, [5, 9, 2], tiny.vocab_size)
    expected = references(tiny, prompts)
    other = make_tiny_engine("llama", root / "other", seed=1)  # same vocabulary, other weights
    for draft, all_accepted in ((tiny.engine_dir, True), (other.engine_dir, False)):
        engine = tiny.engine(speculative="draft", draft_engine=str(draft), num_speculative_tokens=3)
        assert run(engine, prompts, greedy(NEW_TOKENS)) == expected
        stats = engine.get_stats().spec_decode
        assert stats.num_draft_tokens > 0 and (stats.num_accepted_tokens == stats.num_draft_tokens) == all_accepted
    # A prompt that repeats itself, so lookup finds the continuation in it now and then.
    looped = [prompts[0] + expected["r0"] + prompts[0]]
    engine = tiny.engine(speculative="ngram", num_speculative_tokens=4, ngram_min=1)
    assert run(engine, looped, greedy(NEW_TOKENS)) == references(tiny, looped)
    assert engine.get_stats().spec_decode.num_draft_tokens > 0


def test_preemption_abort_mid_verify_and_stop_tokens_inside_drafts(tiny: TinyEngine) -> None:
    prompts = random_prompts(21, [6, 9, 4, 7, 5, 8], tiny.vocab_size)
    expected = references(tiny, prompts, 16)
    engine = oracle_engine(tiny, expected, capacity_policy="max_utilization", num_kv_cache_tokens=64,
                           max_model_len=64)
    assert run(engine, prompts, greedy(16)) == expected
    assert engine.get_stats().num_preemptions > 0 and engine.get_stats().kv_cache_usage == 0.0

    engine = oracle_engine(tiny, expected, keep=1.0)
    engine.add_request("r0", prompts[0], greedy(16))
    engine.add_request("r1", prompts[1], greedy(16))
    collector = OutputCollector()
    for _ in range(3):
        collector.step(engine)
    in_flight = engine._in_flight[0]
    assert in_flight.spec_token_ids.get("r0"), "r0's verify step should be running"
    engine.abort_request("r0")  # while its verify step runs; the id comes back with another prompt
    collector.forget("r0")
    engine.add_request("r0", prompts[2], greedy(16))
    final = drain(engine, collector)
    assert final["r1"].outputs[0].token_ids == expected["r1"]
    assert final["r0"].outputs[0].token_ids == expected["r2"]  # despite drafts from the old r0's reference

    # A stop token met inside a run of accepted drafts ends the output there.
    reference = expected["r3"]
    stop_at = next(i for i in range(2, 12) if reference[i] not in reference[:i])
    engine = oracle_engine(tiny, expected, keep=1.0)
    outputs = run(engine, prompts[:4], greedy(16, stop_token_ids=[reference[stop_at]]))
    assert outputs["r3"] == reference[: stop_at + 1]


def test_padded_verify_graph_path(tiny: TinyEngine) -> None:
    """Verify steps padded to 1 + K tokens per row and to captured batch sizes (run eagerly)."""
    prompts = random_prompts(31, [4, 7, 3], tiny.vocab_size)
    expected = references(tiny, prompts)
    engine = oracle_engine(tiny, expected, keep=0.5, max_batch_size=8)
    engine.runner.enable_decode_graphs(use_graphs=False)
    replayed: list[int] = []
    replay = engine.runner.verify_graphs.replay
    engine.runner.verify_graphs.replay = lambda size: replayed.append(size) or replay(size)
    assert run(engine, prompts, greedy(NEW_TOKENS)) == expected
    assert {1, 2, 4} & set(replayed)  # 3 rows pad to 4, then fewer as they finish


def test_penalties_min_tokens_logprobs_and_seeded_sampling(tiny: TinyEngine) -> None:
    prompts = random_prompts(41, [5, 8], tiny.vocab_size)
    expected = references(tiny, prompts, 16)
    plain = tiny.engine()
    for params in (SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.5,
                                  frequency_penalty=0.5, logprobs=2),
                   SamplingParams(temperature=0.0, max_tokens=16, min_tokens=10, stop_token_ids=[expected["r0"][3]])):
        engine = oracle_engine(tiny, expected, keep=0.8)
        for e in (plain, engine):
            for i, prompt in enumerate(prompts):
                e.add_request(f"r{i}", prompt, params)
        want, got = drain(plain), drain(engine)
        for rid, out in want.items():
            assert got[rid].outputs[0].token_ids == out.outputs[0].token_ids, (rid, params)
            for a, b in zip(got[rid].outputs[0].logprobs or [], out.outputs[0].logprobs or []):
                assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top] == [t for t, _ in b.top]

    seeded = SamplingParams(temperature=0.3, top_p=0.9, n=2, seed=5, max_tokens=10, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = tiny.engine(speculative="draft", draft_engine=str(tiny.engine_dir), num_speculative_tokens=3)
        engine.add_request("s", prompts[0], seeded)
        runs.append([c.token_ids for c in drain(engine)["s"].outputs])
        assert engine.get_stats().spec_decode.num_accepted_tokens > 0
    assert runs[0] == runs[1] and all(len(t) == 10 for t in runs[0]) and runs[0][0] != runs[0][1]
