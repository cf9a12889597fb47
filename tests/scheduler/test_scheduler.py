"""Scheduler tests with hand-made runner outputs and no model."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from _sched_helpers import FakeRunner, make_request, make_scheduler, run_to_completion, step

from kiln.scheduler import (
    RequestRejected,
    RequestStatus,
    RunnerOutput,
    SchedulerConfig,
    SchedulerConfigError,
)

BS = 4


def test_importing_the_scheduler_does_not_import_torch():
    code = (
        "import sys, kiln.scheduler, kiln.scheduler.scheduler, kiln.scheduler.block_manager, "
        "kiln.scheduler.config, kiln.scheduler.request_queue, kiln.scheduler.stopping; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_rejects_bad_settings_with_one_line():
    with pytest.raises(SchedulerConfigError, match="capacity_policy"):
        SchedulerConfig(num_blocks=8, max_model_len=32, capacity_policy="fastest")
    with pytest.raises(SchedulerConfigError, match="block_size"):
        SchedulerConfig(num_blocks=8, max_model_len=32, block_size=0)


def test_chunked_prefill_respects_the_token_budget():
    sched = make_scheduler(max_num_tokens=16)
    runner = FakeRunner(BS)
    req = make_request(40, max_tokens=2)
    sched.add_request(req)
    out, changed = step(sched, runner)
    assert [n.request_id for n in out.new_requests] == [req.request_id]
    assert out.num_scheduled_tokens == {req.request_id: 16} and changed == []
    out, changed = step(sched, runner)
    assert out.num_scheduled_tokens == {req.request_id: 16} and not out.new_requests
    assert out.cached_requests[0].num_computed_tokens == 16 and changed == []
    out, changed = step(sched, runner)
    assert out.num_scheduled_tokens == {req.request_id: 8} and changed == [req]  # sampled now
    assert req.num_output_tokens == 1 and req.num_computed_tokens == 40
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {req.request_id: 1}
    assert req.status is RequestStatus.FINISHED_LENGTH and req.num_output_tokens == 2


def test_long_prefill_threshold_caps_one_request_chunk():
    sched = make_scheduler(max_num_tokens=64, long_prefill_token_threshold=10)
    a, b = make_request(30), make_request(5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {a.request_id: 10, b.request_id: 5}


def test_running_requests_come_first_and_share_the_budget():
    sched = make_scheduler(max_num_tokens=12)
    runner = FakeRunner(BS)
    a = make_request(6)
    sched.add_request(a)
    step(sched, runner)  # a prefilled and sampled: now decoding
    b, c = make_request(8), make_request(8)
    sched.add_request(b)
    sched.add_request(c)
    out, _ = step(sched, runner)
    assert out.order == [a.request_id, b.request_id, c.request_id]
    assert out.num_scheduled_tokens == {a.request_id: 1, b.request_id: 8, c.request_id: 3}
    assert out.total_num_scheduled_tokens <= 12


def test_max_batch_size_limits_running_requests():
    sched = make_scheduler(max_batch_size=2)
    reqs = [make_request(3) for _ in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert out.order == [reqs[0].request_id, reqs[1].request_id]
    assert sched.num_running == 2 and sched.num_waiting == 1


def test_priority_then_arrival_order():
    sched = make_scheduler(max_batch_size=1, max_num_tokens=8)
    late_urgent = make_request(3, priority=-1, arrival_time=10.0)
    early = make_request(3, arrival_time=1.0)
    earlier_low = make_request(3, priority=5, arrival_time=0.0)
    later = make_request(3, arrival_time=2.0)
    for r in (early, earlier_low, later, late_urgent):
        sched.add_request(r)
    runner = FakeRunner(BS)
    seen = []
    while sched.has_unfinished_requests():
        out, _ = step(sched, runner)
        seen += [n.request_id for n in out.new_requests]
    assert seen == [r.request_id for r in (late_urgent, early, later, earlier_low)]


def test_guaranteed_no_evict_reserves_prompt_plus_max_tokens():
    # 6 blocks of 4: each request needs cdiv(8 + 8, 4) = 4 blocks over its life.
    sched = make_scheduler(num_blocks=6, max_model_len=64)
    runner = FakeRunner(BS)
    a, b = make_request(8, max_tokens=8), make_request(8, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched, runner)
    assert out.order == [a.request_id]  # b would fit now, but not for its whole life
    while a.status is RequestStatus.RUNNING:
        out, _ = step(sched, runner)
        assert not out.preempted_request_ids and b.status is RequestStatus.WAITING
    out, _ = step(sched, runner)
    assert out.order == [b.request_id]
    run_to_completion(sched, runner)
    assert sched.num_preemptions == 0 and a.num_output_tokens == b.num_output_tokens == 8


def test_max_utilization_preempts_the_newest_and_recomputes():
    sched = make_scheduler(num_blocks=5, max_model_len=64, capacity_policy="max_utilization")
    runner = FakeRunner(BS)
    old, new = make_request(8, max_tokens=8), make_request(8, max_tokens=8)
    sched.add_request(old)
    sched.add_request(new)
    out, _ = step(sched, runner)
    assert out.order == [old.request_id, new.request_id]  # admitted greedily: 4 of 5 blocks
    preempted_at = None
    for i in range(20):
        out, _ = step(sched, runner)
        if out.preempted_request_ids:
            preempted_at = i
            break
    assert preempted_at is not None and out.preempted_request_ids == {new.request_id}
    assert new.status is RequestStatus.PREEMPTED and new.num_preemptions == 1
    assert new.num_computed_tokens == 0 and sched.get_request(new.request_id) is new
    outputs_before = list(new.output_token_ids)
    assert outputs_before  # it had generated tokens: they must be recomputed, not lost
    while new.status is not RequestStatus.RUNNING:
        out, _ = step(sched, runner)
    resumed = [n for n in out.new_requests if n.request_id == new.request_id][0]
    assert resumed.token_ids[: 8 + len(outputs_before)] == new.prompt_token_ids + outputs_before
    assert resumed.num_prompt_tokens == 8
    run_to_completion(sched, runner)
    assert new.num_output_tokens == 8 and old.num_output_tokens == 8
    assert sched.stats.num_preemptions >= 1


def test_max_utilization_victim_is_lowest_priority_first():
    sched = make_scheduler(num_blocks=5, max_model_len=64, capacity_policy="max_utilization")
    runner = FakeRunner(BS)
    low_old = make_request(8, max_tokens=8, priority=3)
    high_new = make_request(8, max_tokens=8, priority=0)
    sched.add_request(low_old)
    sched.add_request(high_new)
    preempted = set()
    while sched.has_unfinished_requests():
        out, _ = step(sched, runner)
        preempted |= out.preempted_request_ids
    assert preempted == {low_old.request_id}


def test_abort_frees_blocks_at_once_and_is_reported_next_step():
    sched = make_scheduler()
    runner = FakeRunner(BS)
    a, waiting = make_request(10), make_request(10)
    sched.add_request(a)
    out, _ = step(sched, runner)
    sched.add_request(waiting)
    assert sched.kv_cache_usage > 0
    assert sched.abort_request(a.request_id) and sched.abort_request(waiting.request_id)
    assert sched.kv_cache_usage == 0.0 and not sched.has_unfinished_requests()
    assert a.status is RequestStatus.FINISHED_ABORTED and a.finish_reason == "abort"
    assert sched.schedule().finished_request_ids == {a.request_id, waiting.request_id}
    assert sched.schedule().finished_request_ids == set()
    assert not sched.abort_request("no-such-request")


def test_update_ignores_requests_that_left_during_the_step():
    sched = make_scheduler()
    a, b = make_request(5), make_request(5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.abort_request(a.request_id)
    sched.finish_request(b.request_id, RequestStatus.FINISHED_STOPPED, "stop!")
    result = RunnerOutput(sampled_token_ids={a.request_id: [1], b.request_id: [2]})
    assert sched.update(out, result) == []
    assert a.output_token_ids == [] and b.stop_reason == "stop!" and b.finish_reason == "stop"


def test_failed_requests_finish_with_error_and_the_rest_goes_on():
    sched = make_scheduler()
    runner = FakeRunner(BS)
    a, b = make_request(5), make_request(5)
    sched.add_request(a)
    sched.add_request(b)
    out, changed = step(sched, runner, failed=frozenset([a.request_id]))
    assert a.status is RequestStatus.FINISHED_ERROR and a in changed
    assert b.status is RequestStatus.RUNNING and b.num_output_tokens == 1
    assert a.request_id in sched.schedule().finished_request_ids


@pytest.mark.parametrize(
    "prompt, max_tokens, match",
    [
        (250, 10, r"max_tokens \(10\) = 260 exceeds max_model_len \(256\)"),
        (256, None, "leaves no room"),
        ([], 4, "prompt is empty"),
        (60, 100, "KV cache capacity"),  # 160 tokens > 32 blocks * 4
    ],
)
def test_impossible_requests_are_rejected(prompt, max_tokens, match):
    sched = make_scheduler(num_blocks=32)
    with pytest.raises(RequestRejected, match=match):
        sched.add_request(make_request(prompt, max_tokens=max_tokens))
    assert not sched.has_unfinished_requests()


def test_duplicate_ids_are_rejected_and_max_tokens_none_is_resolved():
    sched = make_scheduler(max_model_len=100)
    req = make_request(30, max_tokens=None, request_id="x")
    sched.add_request(req)
    assert req.max_tokens == 70
    with pytest.raises(RequestRejected, match="already in use"):
        sched.add_request(make_request(3, request_id="x"))


def run_one(request, tokens, **sched_options) -> None:
    """Feed the request the given sampled tokens, one per step, until it finishes."""
    sched = make_scheduler(**sched_options)
    sched.add_request(request)
    feed = iter(tokens)
    run_to_completion(sched, FakeRunner(BS), sample=lambda rid: [next(feed)])


def test_eos_stops_unless_ignored():
    req = make_request(3, max_tokens=10, eos=2)
    run_one(req, [5, 6, 2, 7, 8])
    assert req.output_token_ids == [5, 6, 2] and req.status is RequestStatus.FINISHED_STOPPED
    assert req.stop_reason is None
    req = make_request(3, max_tokens=4, eos=2, ignore_eos=True)
    run_one(req, [2, 2, 2, 2, 2])
    assert req.output_token_ids == [2, 2, 2, 2] and req.status is RequestStatus.FINISHED_LENGTH


def test_min_tokens_delays_stops_and_stop_ids_report_the_id():
    req = make_request(3, max_tokens=10, eos=2, min_tokens=2, stop_token_ids=[9])
    run_one(req, [2, 9, 2, 7])
    assert req.output_token_ids == [2, 9, 2] and req.stop_reason is None
    req = make_request(3, max_tokens=10, stop_token_ids=[9, 4])
    run_one(req, [1, 4, 5])
    assert req.output_token_ids == [1, 4] and req.stop_reason == 4 and req.finish_reason == "stop"


def test_max_tokens_and_max_model_len_end_with_length():
    req = make_request(3, max_tokens=3)
    run_one(req, [1, 1, 1, 1])
    assert req.num_output_tokens == 3 and req.finish_reason == "length"
    req = make_request(10, max_tokens=None)
    run_one(req, [1] * 20, max_model_len=16)
    assert req.num_tokens == 16 and req.status is RequestStatus.FINISHED_LENGTH


def test_tokens_after_a_stop_are_dropped():
    sched = make_scheduler()
    req = make_request(3, max_tokens=10, eos=2)
    sched.add_request(req)
    step(sched, FakeRunner(BS), sample=lambda rid: [5, 2, 7])  # e.g. accepted speculative tokens
    assert req.output_token_ids == [5, 2] and req.is_finished


def test_prefix_hit_leaves_the_last_token_to_compute():
    sched = make_scheduler(max_num_tokens=256)
    runner = FakeRunner(BS)
    prompt = list(range(16))
    first = make_request(prompt, max_tokens=1)
    sched.add_request(first)
    run_to_completion(sched, runner)
    same, longer = make_request(prompt), make_request(prompt + [77])
    sched.add_request(same)
    sched.add_request(longer)
    out, _ = step(sched, runner)
    new = {n.request_id: n for n in out.new_requests}
    assert new[same.request_id].num_computed_tokens == 12  # full hit minus the last block
    assert out.num_scheduled_tokens[same.request_id] == 4
    assert new[longer.request_id].num_computed_tokens == 16
    assert out.num_scheduled_tokens[longer.request_id] == 1
    assert same.num_cached_tokens == 12 and same.num_output_tokens == 1
    stats = sched.stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (16 + 16 + 17, 28)


def test_schedule_and_update_of_256_decodes_is_fast():
    """A loose guard against O(n^2) or per-token work (target: well under 1 ms)."""
    sched = make_scheduler(num_blocks=256 * 40, max_model_len=160, block_size=32, max_batch_size=256,
                           max_num_tokens=8192)
    for _ in range(256):
        sched.add_request(make_request(20, max_tokens=120, ignore_eos=True))
    tokens = {}
    best = float("inf")
    for i in range(30):
        start = time.perf_counter()
        out = sched.schedule()
        for rid in out.num_scheduled_tokens:
            tokens[rid] = [i]
        sched.update(out, RunnerOutput(sampled_token_ids=tokens))
        if i > 0:
            assert len(out.num_scheduled_tokens) == 256
            best = min(best, time.perf_counter() - start)
    assert best < 3e-3, f"schedule + update of 256 decodes took {best * 1e3:.2f} ms"


# ---------------------------------------------------------------- one step ahead (the engine's loop)


def test_pipelined_decode_schedules_the_pending_token_and_updates_in_order():
    sched = make_scheduler()
    runner = FakeRunner(BS, pipelined=True)
    req = make_request(6, max_tokens=4)
    sched.add_request(req)
    first = sched.schedule()
    assert req.num_pending_tokens == 1  # first samples it
    r1 = runner.execute(first, sample=lambda rid: [11])
    second = sched.schedule()  # before update(first): the pending token is fed by the runner
    assert second.num_scheduled_tokens == {req.request_id: 1} and req.num_computed_tokens == 7
    assert req.num_pending_tokens == 2 and req.num_output_tokens == 0
    r2 = runner.execute(second, sample=lambda rid: [12])
    assert sched.update(first, r1) == [req] and req.output_token_ids == [11]
    assert sched.update(second, r2) == [req] and req.output_token_ids == [11, 12]
    assert req.num_pending_tokens == 0 and req.num_computed_tokens == 7 and req.num_tokens == 8


def test_pipelined_request_is_not_scheduled_past_max_tokens():
    sched = make_scheduler()
    runner = FakeRunner(BS, pipelined=True)
    req = make_request(6, max_tokens=1)
    sched.add_request(req)
    first = sched.schedule()
    r1 = runner.execute(first)
    second = sched.schedule()  # its pending token is its last: nothing to run
    assert second.num_scheduled_tokens == {}
    sched.update(first, r1)
    assert req.status is RequestStatus.FINISHED_LENGTH and req.num_output_tokens == 1


def test_pipelined_eos_drops_the_token_of_the_step_already_running():
    sched = make_scheduler()
    runner = FakeRunner(BS, pipelined=True)
    req = make_request(6, max_tokens=8, eos=0)
    sched.add_request(req)
    first = sched.schedule()
    r1 = runner.execute(first, sample=lambda rid: [0])  # EOS
    second = sched.schedule()
    r2 = runner.execute(second, sample=lambda rid: [5])
    sched.update(first, r1)
    assert req.status is RequestStatus.FINISHED_STOPPED
    assert sched.update(second, r2) == [] and req.output_token_ids == [0]
    assert sched.block_manager.num_assigned_blocks == 0
    assert req.request_id in sched.schedule().finished_request_ids


def test_pipelined_results_never_reach_a_new_request_reusing_an_aborted_id():
    sched = make_scheduler()
    runner = FakeRunner(BS, pipelined=True)
    old = make_request(6, max_tokens=8, request_id="same")
    sched.add_request(old)
    first = sched.schedule()
    r1 = runner.execute(first, sample=lambda rid: [7])
    sched.abort_request("same")
    new = make_request(3, max_tokens=8, request_id="same")
    sched.add_request(new)
    second = sched.schedule()  # admits the newcomer; its sampled token is pending
    assert second.new_requests[0].request_id == "same" and new.num_pending_tokens == 1
    assert sched.update(first, r1) == []  # the old request's token
    assert new.output_token_ids == [] and new.num_pending_tokens == 1
    r2 = runner.execute(second, sample=lambda rid: [9])
    assert sched.update(second, r2) == [new] and new.output_token_ids == [9]


def test_pipelined_preemption_keeps_the_token_sampled_meanwhile():
    # Two requests, room for one decode block more: the newer one is preempted while its
    # last step runs; its token arrives in the waiting queue and is recomputed on resume.
    sched = make_scheduler(num_blocks=4, max_num_tokens=64, capacity_policy="max_utilization")
    runner = FakeRunner(BS, pipelined=True)
    a, b = make_request(8, max_tokens=8), make_request(8, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()  # both prefilled: 4 blocks, all taken
    r1 = runner.execute(first, sample=lambda rid: [3])
    second = sched.schedule()  # a's pending token needs a 3rd block: b is preempted
    assert second.preempted_request_ids == {b.request_id} and b.status is RequestStatus.PREEMPTED
    r2 = runner.execute(second, sample=lambda rid: [4])
    sched.update(first, r1)
    assert b.output_token_ids == [3] and b.num_pending_tokens == 0 and b.num_computed_tokens == 0
    sched.update(second, r2)
    assert a.output_token_ids == [3, 4]
