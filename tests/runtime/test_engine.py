"""LLMEngine behaviour on a tiny random Llama (token-id prompts, no tokenizer): request
validation, fan-out, stops, aborts, logprobs, metrics, and surviving a failed step."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_e2e_helpers import OutputCollector, TinyEngine, drain, greedy, make_tiny_engine, random_prompts

from kiln.runtime import SamplingParams, TokenLogprob
from kiln.runtime.model_runner import EngineShutDownError
from kiln.scheduler import RequestRejected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return make_tiny_engine("llama", tmp_path_factory.mktemp("engine"))


@pytest.fixture
def engine(tiny: TinyEngine):
    return tiny.engine()


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "empty"),
        ([5, 1001, 6], "out of the vocabulary"),
        ([5, -1], "out of the vocabulary"),
        ([5] * 128, "max_model_len"),
        ("text needs a tokenizer", "no tokenizer"),
    ],
)
def test_prompts_that_can_never_run_are_rejected_at_once(engine, prompt, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, greedy(4))
    assert not engine.has_unfinished_requests()


def test_too_many_tokens_for_max_model_len_is_rejected(engine) -> None:
    with pytest.raises(RequestRejected, match="max_model_len"):
        engine.add_request("long", [5] * 100, greedy(29))
    engine.add_request("long", [5] * 100, greedy(28))  # exactly fits 128; the id is free again
    assert engine.has_unfinished_requests()


def test_duplicate_request_id_is_rejected(engine) -> None:
    engine.add_request("a", [5, 6, 7], greedy(4, n=2))
    for rid in ("a", "a#1"):
        with pytest.raises(RequestRejected, match="already in use"):
            engine.add_request(rid, [5, 6, 7], greedy(4))
    assert drain(engine)["a"].finished


def test_max_tokens_finishes_with_length_and_metrics_are_ordered(engine) -> None:
    engine.add_request("a", [5, 6, 7, 8, 9], greedy(6))
    out = drain(engine)["a"]
    (choice,) = out.outputs
    assert (len(choice.token_ids), choice.finish_reason, choice.stop_reason) == (6, "length", None)
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert engine.get_stats().generation_tokens == 6


def test_stop_token_ids_end_the_choice(tiny: TinyEngine, engine) -> None:
    (prompt,) = random_prompts(10, [9], tiny.vocab_size)
    reference = tiny.hf_greedy(prompt, 16)
    stop = reference[4]
    engine.add_request("a", prompt, greedy(16, stop_token_ids=[stop]))
    (choice,) = drain(engine)["a"].outputs
    expected = reference[: reference.index(stop) + 1]  # the stop token is reported, then nothing
    assert choice.token_ids == expected
    assert (choice.finish_reason, choice.stop_reason) == ("stop", stop)


def test_eos_stops_unless_ignored(tiny: TinyEngine, engine) -> None:
    (prompt,) = random_prompts(11, [6], tiny.vocab_size)
    ignoring = greedy(12)
    engine.add_request("a", prompt, ignoring)
    tokens = drain(engine)["a"].outputs[0].token_ids
    # Make the engine's EOS the 3rd greedy token: the choice must end there, stop_reason None.
    engine.eos_token_ids = frozenset({tokens[2]})
    engine.add_request("b", prompt, SamplingParams(temperature=0.0, max_tokens=12))
    (choice,) = drain(engine)["b"].outputs
    assert choice.token_ids == tokens[: tokens.index(tokens[2]) + 1]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", None)


def test_n_fans_out_into_seeded_children(tiny: TinyEngine, engine) -> None:
    (prompt,) = random_prompts(12, [7], tiny.vocab_size)
    params = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=8, ignore_eos=True)
    engine.add_request("fan", prompt, params)
    out = drain(engine)["fan"]
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    # Child i is the same as a lone request seeded seed + i.
    for i, choice in enumerate(out.outputs):
        engine.add_request(f"alone{i}", prompt, SamplingParams(temperature=1.0, seed=123 + i, max_tokens=8, ignore_eos=True))
        assert drain(engine)[f"alone{i}"].outputs[0].token_ids == choice.token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_abort_frees_blocks_and_silences_the_request(tiny: TinyEngine, engine) -> None:
    prompts = random_prompts(13, [20, 30, 10], tiny.vocab_size)
    engine.add_request("a", prompts[0], greedy(40))
    engine.add_request("b", prompts[1], greedy(40, n=2))
    engine.add_request("c", prompts[2], greedy(5))
    collector = OutputCollector()
    for _ in range(3):
        collector.step(engine)
    usage = engine.get_stats().kv_cache_usage
    assert usage > 0
    engine.abort_request("b")  # both of its choices
    assert engine.get_stats().kv_cache_usage < usage
    engine.abort_request("b")  # twice, and unknown ids, are harmless
    engine.abort_request("nope")
    results = drain(engine, collector)
    assert results["b"].finished is False  # no output after the abort
    assert results["c"].outputs[0].token_ids == tiny.hf_greedy(prompts[2], 5)
    engine.abort_request("a")  # already finished: nothing happens
    engine.add_request("d", prompts[0], greedy(40))
    collector.step(engine)
    engine.abort_request("d")
    stats = engine.get_stats()
    assert (stats.kv_cache_usage, stats.num_running, stats.num_waiting) == (0.0, 0, 0)
    assert not engine.has_unfinished_requests()


def test_logprobs_match_transformers(tiny: TinyEngine, engine) -> None:
    (prompt,) = random_prompts(14, [8], tiny.vocab_size)
    engine.add_request("lp", prompt, greedy(6, logprobs=3))
    (choice,) = drain(engine)["lp"].outputs
    assert len(choice.logprobs) == len(choice.token_ids) == 6
    with torch.no_grad():
        logits = tiny.hf_model(torch.tensor([prompt + choice.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    for pos, (token, entry) in enumerate(zip(choice.token_ids, choice.logprobs)):
        assert isinstance(entry, TokenLogprob) and entry.token_id == token
        assert entry.logprob == pytest.approx(expected[pos, token].item(), abs=1e-4)
        assert len(entry.top) == 3
        assert entry.top[0][0] == token  # greedy: the chosen token is the most likely
        top_ids = expected[pos].topk(3).indices.tolist()
        assert [t for t, _ in entry.top] == top_ids
        assert [lp for _, lp in entry.top] == pytest.approx(expected[pos, top_ids].tolist(), abs=1e-4)


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(tiny: TinyEngine, engine, monkeypatch) -> None:
    prompts = random_prompts(15, [6, 9], tiny.vocab_size)
    engine.add_request("doomed", prompts[0], greedy(8))
    real = engine.runner.launch
    calls = {"n": 0}

    def flaky(scheduler_output):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real(scheduler_output)

    monkeypatch.setattr(engine.runner, "launch", flaky)
    collector = OutputCollector()
    collector.step(engine)
    collector.step(engine)
    doomed = collector.final["doomed"]
    assert doomed.finished and doomed.outputs[0].finish_reason == "error"
    engine.add_request("fine", prompts[1], greedy(8))
    results = drain(engine, collector)
    assert results["fine"].outputs[0].token_ids == tiny.hf_greedy(prompts[1], 8)
    stats = engine.get_stats()
    assert stats.num_failed_steps == 1 and stats.kv_cache_usage == 0.0


def test_tokens_arrive_from_the_next_step_call(tiny: TinyEngine, engine) -> None:
    (prompt,) = random_prompts(16, [5], tiny.vocab_size)
    engine.add_request("a", prompt, greedy(4))
    deltas, scheduled = [], []
    launch = engine.runner.launch

    def spy(scheduler_output):
        scheduled.append(dict(scheduler_output.num_scheduled_tokens))
        return launch(scheduler_output)

    engine.runner.launch = spy
    while engine.has_unfinished_requests():
        deltas.append([o.outputs[0].delta_token_ids for o in engine.step()])
    # Call k launches step k and delivers step k-1's token. Step 2 feeds token 1 to the model
    # from the device before the host has it; the 4th token ends the request (max_tokens),
    # so call 5 schedules nothing and only delivers it.
    tokens = tiny.hf_greedy(prompt, 4)
    assert deltas == [[], [tokens[:1]], [tokens[1:2]], [tokens[2:3]], [tokens[3:4]]]
    assert scheduled == [{"a": 5}, {"a": 1}, {"a": 1}, {"a": 1}, {}]


def test_shutdown_releases_the_tensors_even_after_gc_freeze(tiny: TinyEngine) -> None:
    engine = tiny.engine()
    engine.runner.enable_decode_graphs(use_graphs=False)  # the graphs' cycle with the runner, as on CUDA
    engine.add_request("a", [5, 6, 7], greedy(8))
    engine.step()
    runner = engine.runner
    held = [weakref.ref(t) for t in (runner.kv_cache.kv[0], runner.model.layers[0].qkv.method.weight,
                                     runner.input_batch.staging.dev_bytes)]
    del runner
    gc.collect()
    gc.freeze()  # what the runner does after CUDA-graph capture: cycles are never collected again
    try:
        engine.shutdown()
        assert [ref() for ref in held] == [None] * len(held)
        assert not engine.has_unfinished_requests()
        engine.shutdown()  # idempotent
        with pytest.raises(EngineShutDownError, match="shut down"):
            engine.step()
        with pytest.raises(EngineShutDownError, match="shut down"):
            engine.add_request("b", [5, 6], greedy(2))
    finally:
        gc.unfreeze()


def test_gc_configuration_freezes_and_takes_thresholds(monkeypatch) -> None:
    """What a GPU engine does at the end of its start (CPU engines skip it): freeze everything alive
    so full GC passes skip it, and take KILN_GC_THRESHOLD when set."""
    from kiln.runtime import engine as engine_module

    before = gc.get_threshold()
    try:
        gc.unfreeze()
        monkeypatch.setenv("KILN_GC_THRESHOLD", "5000,15,12")
        engine_module._configure_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (5000, 15, 12)
        monkeypatch.delenv("KILN_GC_THRESHOLD")
        gc.set_threshold(*before)
        engine_module._configure_gc()
        assert gc.get_threshold() == before  # Python's own thresholds unless asked
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
