"""EngineProcess: LLMEngine in a child process, against the same engine in this process
(tiny random-weight Llama on the CPU)."""

from __future__ import annotations

import time

import pytest

from kiln.engine_builder import build_engine
from kiln.runtime import LLMEngine
from kiln.runtime.config import EngineConfig
from kiln.scheduler import RequestRejected
from kiln.scheduler.sampling_params import SamplingParams
from kiln.server.engine_process import EngineProcessError, EngineProcess

OPTIONS = dict(device="cpu", max_model_len=96, num_kv_cache_tokens=1024)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("remote") / "tiny"
    build_engine(None, path, random_weights="tiny-llama", progress=False)
    return path


@pytest.fixture(scope="module")
def remote(engine_dir):
    engine = EngineProcess(EngineConfig(engine_dir=str(engine_dir), **OPTIONS))
    yield engine
    engine.shutdown()


def drain(engine, deadline_s: float = 60.0) -> dict:
    final: dict = {}
    deltas: dict = {}
    deadline = time.monotonic() + deadline_s
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish"
        for out in engine.step():
            final[out.request_id] = out
            for c in out.outputs:
                deltas.setdefault((out.request_id, c.index), []).extend(c.delta_token_ids)
    for (rid, index), ids in deltas.items():  # the deltas add up to the cumulative ids
        assert [c for c in final[rid].outputs if c.index == index][0].token_ids == ids
    return final


REQUESTS = [
    ("greedy", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
    ("n2-seeded", [9, 10], SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=7, ignore_eos=True)),
    ("logprobs", [11, 12, 13], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, ignore_eos=True)),
]


def test_outputs_equal_the_engine_in_this_process(remote, engine_dir):
    local = LLMEngine.from_engine_dir(engine_dir, **OPTIONS)
    try:
        for engine in (remote, local):
            for rid, prompt, params in REQUESTS:
                engine.add_request(rid, prompt, params)
        got, want = drain(remote), drain(local)
    finally:
        local.shutdown()
    assert sorted(got) == sorted(want) == sorted(r for r, _, _ in REQUESTS)
    for rid in want:
        assert got[rid].finished and got[rid].prompt_token_ids == want[rid].prompt_token_ids
        for g, w in zip(got[rid].outputs, want[rid].outputs, strict=True):
            assert (g.index, g.token_ids, g.finish_reason) == (w.index, w.token_ids, w.finish_reason)
            if w.logprobs is not None:
                # Another process may use another CPU thread count: the same tokens, logprobs equal to float
                # rounding.
                def ids(lps):
                    return [(x.token_id, [t for t, _ in x.top]) for x in lps]

                def values(lps):
                    return [v for x in lps for v in [x.logprob, *(lp for _, lp in x.top)]]

                assert ids(g.logprobs) == ids(w.logprobs)
                assert values(g.logprobs) == pytest.approx(values(w.logprobs), abs=1e-4)


def test_bad_requests_are_rejected_at_once_and_aborts_free_the_engine(remote):
    with pytest.raises(RequestRejected, match="max_model_len"):
        remote.add_request("long", list(range(1, 100)), SamplingParams(max_tokens=4))
    with pytest.raises(RequestRejected, match="vocabulary"):
        remote.add_request("vocab", [10**7], SamplingParams(max_tokens=4))
    with pytest.raises(RequestRejected, match="no tokenizer"):
        remote.add_request("text", "hello", SamplingParams(max_tokens=4))
    remote.add_request("long-run", [3, 4], SamplingParams(max_tokens=80, ignore_eos=True))
    while not remote.step():
        pass
    remote.abort_request("long-run")
    assert not remote.has_unfinished_requests()
    deadline = time.monotonic() + 30
    while remote.get_stats().num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remote.get_stats().num_running == 0 and remote.get_stats().kv_cache_usage == 0.0


def test_wake_ends_a_step_waiting_on_an_idle_child(remote, monkeypatch):
    """AsyncEngine wakes a waiting step() when it has adds or aborts to hand over: with nothing
    coming from the child, step() would otherwise wait out its whole poll."""
    import threading

    from kiln.server import engine_process

    monkeypatch.setattr(engine_process, "_POLL_S", 60.0)
    assert not remote.has_unfinished_requests()
    timer = threading.Timer(0.2, remote.wake)
    start = time.monotonic()
    timer.start()
    assert remote.step() == []
    assert time.monotonic() - start < 30.0  # woken, not timed out


def test_a_failed_start_and_a_dead_engine_are_one_line_errors(engine_dir, tmp_path):
    with pytest.raises(EngineProcessError, match="kiln.json|engine"):
        EngineProcess(EngineConfig(engine_dir=str(tmp_path / "missing"), **OPTIONS))
    engine = EngineProcess(EngineConfig(engine_dir=str(engine_dir), **OPTIONS))
    try:
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
        engine._proc.kill()  # the GPU process dying under a request (OOM, driver error)
        engine._proc.join(10)
        with pytest.raises(EngineProcessError, match="exit"):
            for _ in range(100):
                engine.step()
        with pytest.raises(EngineProcessError, match="exit"):  # also when idle: /health goes 503
            engine.check_alive()
    finally:
        engine.shutdown()


def test_wire_messages_round_trip() -> None:
    """A step message is plain data: pickling it changes nothing, and no cumulative field crosses."""
    import pickle

    from kiln.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
    from kiln.server.engine_process import pack_output

    out = RequestOutput("r", None, [1, 2], [CompletionOutput(
        1, text="ab" * 100, token_ids=list(range(200)), finish_reason="stop", stop_reason="x",
        logprobs=[TokenLogprob(5, -0.5, [(5, -0.5), (6, -1.0)])], delta_text="b", delta_token_ids=[7],
        delta_logprobs=[TokenLogprob(7, -0.25, [(7, -0.25)])])], True, RequestMetrics(1.0, 2.0, 3.0, 4.0, 5.0, 6), 6)
    packed = pack_output(out)
    assert pickle.loads(pickle.dumps(packed)) == packed
    assert packed == ("r", True, (1.0, 2.0, 3.0, 4.0, 5.0, 6), 6, [(1, "b", [7], "stop", "x", [(7, -0.25, [(7, -0.25)])])],
                      None)


def test_new_fields_cross_the_boundary() -> None:
    """SamplingParams' constraints pickle as they are; prompt logprobs cross once (with a
    request's first output) and every later output of it still carries them."""
    import pickle

    from kiln.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
    from kiln.scheduler.sampling_params import StructuredOutput
    from kiln.server.engine_process import EngineProcess, _Live, _pack_once

    params = SamplingParams(logit_bias={3: -100.0, 7: 2.5}, prompt_logprobs=2,
                            structured_output=StructuredOutput("json", '{"type": "object"}'))
    assert pickle.loads(pickle.dumps(params)) == params
    prompt_lps = [None, TokenLogprob(2, -1.5, [(4, -0.5), (2, -1.5)])]
    metrics = RequestMetrics(1.0)

    def step(ids: list[int], finished: bool) -> RequestOutput:
        return RequestOutput("r", None, [1, 2], [CompletionOutput(0, delta_token_ids=ids, finish_reason=(
            "stop" if finished else None))], finished, metrics, prompt_logprobs=prompt_lps)

    sent: set[str] = set()
    wire = [pickle.loads(pickle.dumps(_pack_once(step(ids, done), sent))) for ids, done in (([5], False), ([6], True))]
    assert wire[0][-1] == [None, (2, -1.5, [(4, -0.5), (2, -1.5)])] and wire[1][-1] is None and not sent
    receiver = EngineProcess.__new__(EngineProcess)  # only its request table: no child process
    receiver._live = {"r": _Live(None, [1, 2])}
    outs = [receiver._unpack(w) for w in wire]
    assert [o.prompt_logprobs for o in outs] == [prompt_lps, prompt_lps]
    assert outs[1].outputs[0].token_ids == [5, 6]
