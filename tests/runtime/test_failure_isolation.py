"""One request's failure inside a step stays its own: it finishes with "error", the others in
the step carry on with the tokens they would have made alone, and nothing it took (batch row,
KV blocks) stays taken. Tiny random Llama, transformers greedy as the reference."""

from __future__ import annotations

import pytest
from test_e2e_helpers import TinyEngine, drain, greedy, make_tiny_engine, random_prompts

from kiln.runtime import SamplingParams
from kiln.runtime.sampler import SamplingRows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return make_tiny_engine("llama", tmp_path_factory.mktemp("engine"))


def _rows_accounted_for(engine) -> bool:
    """Every batch row is either free or owned by a live request (none lost)."""
    batch = engine.runner.input_batch
    owned = [state.row for state in batch.requests.values()]
    return sorted(batch.free_rows + owned) == list(range(batch.max_batch_size))


def test_top_k_beyond_int32_samples_like_no_top_k_and_spares_its_neighbour(tiny: TinyEngine) -> None:
    # top_k >= 2**31 used to overflow the sampler's int32 row after the request had taken a
    # batch row: the whole step failed (its neighbour too) and the row was never given back.
    engine = tiny.engine(max_batch_size=2)
    prompts = random_prompts(21, [7, 9], tiny.vocab_size)
    sampled = dict(temperature=0.8, max_tokens=5, ignore_eos=True, seed=11)
    engine.add_request("neighbour", prompts[0], greedy(6))
    engine.add_request("huge_k", prompts[1], SamplingParams(top_k=2**40, **sampled))
    results = drain(engine)
    assert results["neighbour"].outputs[0].token_ids == tiny.hf_greedy(prompts[0], 6)
    huge_k = results["huge_k"].outputs[0]
    assert huge_k.finish_reason == "length"
    # A top_k wider than the vocabulary keeps every token: the same draw as top-k off.
    engine.add_request("no_k", prompts[1], SamplingParams(top_k=0, **sampled))
    assert drain(engine)["no_k"].outputs[0].token_ids == huge_k.token_ids
    assert _rows_accounted_for(engine) and engine.get_stats().kv_cache_usage == 0.0


def test_any_failure_while_admitting_fails_that_request_alone_and_frees_its_row(
        tiny: TinyEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not only the runner's own InvalidRequestError: an unexpected exception of any type while
    # a request is admitted to the batch (here a simulated bug in the sampler's row setup).
    real_set = SamplingRows.set

    def flaky_set(self, row, params, eos_token_ids=frozenset()):
        if params.seed == 666:
            raise RuntimeError("simulated bug while setting up a sampling row")
        return real_set(self, row, params, eos_token_ids)

    monkeypatch.setattr(SamplingRows, "set", flaky_set)
    engine = tiny.engine(max_batch_size=2)
    prompts = random_prompts(22, [6, 8, 5], tiny.vocab_size)
    engine.add_request("neighbour", prompts[0], greedy(6))
    engine.add_request("doomed", prompts[1], SamplingParams(temperature=1.0, seed=666, max_tokens=4))
    results = drain(engine)
    assert results["doomed"].finished and results["doomed"].outputs[0].finish_reason == "error"
    assert results["neighbour"].outputs[0].token_ids == tiny.hf_greedy(prompts[0], 6)
    assert engine.get_stats().kv_cache_usage == 0.0
    # Both rows are usable again: two requests at once still run.
    engine.add_request("a", prompts[2], greedy(3))
    engine.add_request("b", prompts[0], greedy(3))
    results = drain(engine)
    assert results["a"].outputs[0].token_ids == tiny.hf_greedy(prompts[2], 3)
    assert results["b"].outputs[0].token_ids == tiny.hf_greedy(prompts[0], 3)
    engine.step()  # hands the finished ids to the runner, which drops their rows
    assert _rows_accounted_for(engine) and not engine.runner.input_batch.requests
