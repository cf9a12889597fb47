"""Hypothesis: random arrivals, aborts, stop-string finishes and failures against the scheduler.

A FakeRunner (see _sched_helpers) executes every plan and checks the KV each step attends
to, so block-table or prefix-cache mistakes fail here too, not only bookkeeping ones.
"""

from __future__ import annotations

import pytest
from _sched_helpers import FakeRunner, make_request
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from kiln.scheduler import RequestRejected, RequestStatus, Scheduler, SchedulerConfig

EOS = 0

configs = st.builds(
    SchedulerConfig,
    num_blocks=st.integers(3, 12),
    max_model_len=st.integers(8, 40),
    max_num_tokens=st.integers(1, 24),
    max_batch_size=st.integers(1, 5),
    block_size=st.sampled_from([1, 2, 4]),
    capacity_policy=st.sampled_from(["guaranteed_no_evict", "max_utilization"]),
    enable_prefix_caching=st.booleans(),
    long_prefill_token_threshold=st.sampled_from([0, 0, 3]),
)

# A request: prompt tokens from a tiny alphabet (so prefixes repeat), max_tokens, priority.
request_specs = st.tuples(
    st.lists(st.integers(0, 2), min_size=0, max_size=30),
    st.one_of(st.none(), st.integers(1, 20)),
    st.integers(0, 2),
    st.integers(0, 3),  # min_tokens
)
events = st.lists(
    st.tuples(
        st.lists(request_specs, max_size=3),  # arrivals before this step
        st.one_of(st.none(), st.integers(0, 100)),  # abort one unfinished request
        st.one_of(st.none(), st.integers(0, 100)),  # finish one (a stop string matched)
        st.one_of(st.none(), st.integers(0, 100)),  # the runner fails on one scheduled request
    ),
    max_size=25,
)


def reservation(req, cfg: SchedulerConfig) -> int:
    total = min(req.num_prompt_tokens + req.max_tokens, cfg.max_model_len)
    return -(-total // cfg.block_size)


def check_plan(sched: Scheduler, out, cfg: SchedulerConfig, pipelined: bool = False) -> None:
    bm = sched.block_manager
    assert out.total_num_scheduled_tokens <= cfg.max_num_tokens
    assert len(out.num_scheduled_tokens) <= cfg.max_batch_size
    assert sched.num_running <= cfg.max_batch_size
    if cfg.guaranteed_no_evict:
        assert not out.preempted_request_ids
    owed = 0
    for req in sched._running:
        # schedule() already counted this step's tokens as computed (and its sample as pending).
        assert req.num_computed_tokens <= req.num_tokens + req.num_pending_tokens
        assert req.num_pending_tokens <= 1 + pipelined
        # Exactly the blocks the computed + scheduled tokens need: no hoarding, no leak.
        assert len(bm.get_block_ids(req.request_id)) == -(-req.num_computed_tokens // cfg.block_size)
        owed += reservation(req, cfg) - len(bm.get_block_ids(req.request_id))
    if cfg.guaranteed_no_evict:  # never over-committed: every running request can finish
        assert owed <= bm.num_free_blocks
    for rid in out.preempted_request_ids:
        assert bm.get_block_ids(rid) == []
    bm.check_invariants()


def submit(sched: Scheduler, spec, admitted: list) -> None:
    prompt, max_tokens, priority, min_tokens = spec
    if max_tokens is not None:
        min_tokens = min(min_tokens, max_tokens)
    req = make_request(prompt, max_tokens=max_tokens, eos=EOS, priority=priority, min_tokens=min_tokens)
    try:
        sched.add_request(req)
    except RequestRejected:
        cfg = sched.config
        limit = min(cfg.max_model_len, cfg.kv_cache_capacity)
        if max_tokens is None:  # resolved to whatever room is left
            assert not prompt or len(prompt) + max(min_tokens, 1) > limit
        else:
            total = len(prompt) + max_tokens
            assert not prompt or total > cfg.max_model_len or -(-total // cfg.block_size) > cfg.num_blocks
        return
    admitted.append(req)


def pick(items: list, index: int | None):
    return items[index % len(items)] if items and index is not None else None


def drive(cfg: SchedulerConfig, script, seed: int, vocab: int, pipelined: bool = False) -> Scheduler:
    """Play the script against a scheduler and a FakeRunner, checking every step.

    ``pipelined``: like the engine, step N+1 is scheduled and run before ``update`` gets step
    N's results (the FakeRunner, like the real one, appends what it sampled itself).
    """
    sched = Scheduler(cfg)
    runner = FakeRunner(cfg.block_size, seed=seed, vocab=vocab, pipelined=pipelined)  # EOS (0) comes up now and then
    admitted: list = []
    in_flight = None

    def run(out, failed=frozenset()):
        nonlocal in_flight
        result = runner.execute(out, failed=failed)
        if not pipelined:
            sched.update(out, result)
            return
        if in_flight is not None:
            sched.update(*in_flight)
        in_flight = (out, result)

    for arrivals, abort_i, finish_i, fail_i in script:
        for spec in arrivals:
            submit(sched, spec, admitted)
        unfinished = [r for r in admitted if not r.is_finished]
        if (victim := pick(unfinished, abort_i)) is not None:
            assert sched.abort_request(victim.request_id)
            assert sched.block_manager.get_block_ids(victim.request_id) == []
        out = sched.schedule()
        check_plan(sched, out, cfg, pipelined)
        unfinished = [r for r in admitted if not r.is_finished and r.status is RequestStatus.RUNNING]
        if (stopped := pick(unfinished, finish_i)) is not None:  # mid-step, like the engine
            sched.finish_request(stopped.request_id, RequestStatus.FINISHED_STOPPED, "stop")
        failed = pick(out.order, fail_i)
        run(out, frozenset([failed]) if failed else frozenset())
        for req in admitted:
            assert req.num_computed_tokens <= req.num_tokens + req.num_pending_tokens
    steps = 0
    while sched.has_unfinished_requests():  # everything admitted must finish
        out = sched.schedule()
        check_plan(sched, out, cfg, pipelined)
        run(out)
        steps += 1
        assert steps < 2000, "a request never finishes"
    if in_flight is not None:
        sched.update(*in_flight)
    check_all_finished(sched, admitted)
    return sched


def check_all_finished(sched: Scheduler, admitted: list) -> None:
    cfg, bm = sched.config, sched.block_manager
    assert all(r.is_finished for r in admitted)
    assert bm.num_free_blocks == cfg.num_blocks and bm.num_assigned_blocks == 0
    assert all(bm.ref_count(b) == 0 for b in range(cfg.num_blocks))
    assert sched._num_reserved == 0 and sched.num_running == sched.num_waiting == 0
    for req in admitted:
        if req.status is RequestStatus.FINISHED_LENGTH:
            assert req.num_output_tokens == req.max_tokens or req.num_tokens == cfg.max_model_len
        assert req.num_output_tokens <= req.max_tokens


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, script=events, seed=st.integers(0, 2**16))
def test_random_workloads_keep_every_invariant(cfg, script, seed):
    drive(cfg, script, seed, vocab=10)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, script=events, seed=st.integers(0, 2**16))
def test_pipelined_random_workloads_keep_every_invariant(cfg, script, seed):
    drive(cfg, script, seed, vocab=10, pipelined=True)


# Memory pressure: max_utilization, a small cache, long outputs, everyone arriving early.
pressure_configs = st.builds(
    SchedulerConfig,
    num_blocks=st.integers(4, 10),
    max_model_len=st.just(16),
    max_num_tokens=st.integers(4, 16),
    max_batch_size=st.integers(2, 5),
    block_size=st.sampled_from([2, 4]),
    capacity_policy=st.just("max_utilization"),
    enable_prefix_caching=st.booleans(),
)
pressure_requests = st.tuples(
    st.lists(st.integers(0, 2), min_size=1, max_size=8), st.integers(4, 8), st.integers(0, 2), st.just(0)
)
pressure_events = st.lists(
    st.tuples(st.lists(pressure_requests, max_size=3), st.none(), st.none(), st.none()), min_size=1, max_size=4
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=pressure_configs, script=pressure_events, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("pipelined", [False, True])
def test_preemption_under_memory_pressure_keeps_every_invariant(cfg, script, seed, pipelined):
    sched = drive(cfg, script, seed, vocab=1000, pipelined=pipelined)  # EOS almost never: outputs run long
    target(float(sched.num_preemptions))  # steer the search towards more preemption
