"""The engine runs one step ahead of its host work (step N+1 is launched before step N's
tokens reach the host). These cases stress what that changes, against transformers on the
same tiny Llama (CPU, float32): token history needed on the host (penalties), a request that
stops while the next step already runs for it and whose row is then reused, and an aborted
id reused while its last step is in flight.
"""

from __future__ import annotations

import pytest
import torch
from test_e2e_helpers import OutputCollector, TinyEngine, drain, greedy, make_tiny_engine, random_prompts

from kiln.runtime import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return make_tiny_engine("llama", tmp_path_factory.mktemp("pipelined"))


def hf_generate(tiny: TinyEngine, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = tiny.hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                     eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_sees_the_token_still_pending(tiny: TinyEngine) -> None:
    # Every step's penalty needs all earlier outputs, the one sampled by the step still
    # running included: the runner must bring it to the host before preparing the next step.
    prompts = random_prompts(40, [4, 7], tiny.vocab_size)
    engine = tiny.engine()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.8)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params)
    engine.add_request("plain", prompts[0], greedy(12))  # batched with them, no penalty
    outputs = drain(engine)
    for i, prompt in enumerate(prompts):
        assert outputs[f"p{i}"].outputs[0].token_ids == hf_generate(tiny, prompt, 12, repetition_penalty=1.8)
    assert outputs["plain"].outputs[0].token_ids == tiny.hf_greedy(prompts[0], 12)


def test_a_stop_while_the_next_step_runs_then_the_row_is_reused(tiny: TinyEngine) -> None:
    a, b, c = random_prompts(41, [6, 9, 5], tiny.vocab_size)
    reference = tiny.hf_greedy(a, 10)
    stop_at = next(i for i in range(2, 10) if reference[i] not in reference[:i])
    engine = tiny.engine(max_batch_size=2)  # c can only run in a's row
    engine.add_request("a", a, greedy(10, stop_token_ids=[reference[stop_at]]))
    engine.add_request("b", b, greedy(10))
    collector = OutputCollector()
    while "a" not in collector.final or not collector.final["a"].finished:
        collector.step(engine)
    engine.add_request("c", c, greedy(10))
    final = drain(engine, collector)
    assert final["a"].outputs[0].token_ids == reference[: stop_at + 1]
    assert final["a"].outputs[0].finish_reason == "stop"
    assert final["b"].outputs[0].token_ids == tiny.hf_greedy(b, 10)
    assert final["c"].outputs[0].token_ids == tiny.hf_greedy(c, 10)
    assert engine.get_stats().kv_cache_usage == 0.0


def test_an_aborted_id_reused_while_its_step_runs_gets_only_its_own_tokens(tiny: TinyEngine) -> None:
    first, second = random_prompts(42, [8, 5], tiny.vocab_size)
    engine = tiny.engine()
    engine.add_request("x", first, greedy(10))
    collector = OutputCollector()
    for _ in range(3):
        collector.step(engine)  # the third call left a step in flight for the old "x"
    engine.abort_request("x")
    engine.add_request("x", second, greedy(6))
    fresh = OutputCollector()
    final = drain(engine, fresh)
    assert final["x"].outputs[0].token_ids == tiny.hf_greedy(second, 6)
    assert final["x"].prompt_token_ids == second
