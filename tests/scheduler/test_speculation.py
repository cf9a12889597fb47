"""Draft tokens in the scheduler, with hand-made runner outputs: budget, rollback of rejected
drafts and their blocks, stops inside accepted drafts, and when speculation switches off."""

from __future__ import annotations

import subprocess
import sys

from _sched_helpers import make_request, make_scheduler

from kiln.scheduler import RequestStatus, RunnerOutput
from kiln.scheduler.speculation import SpeculationPolicy

BS = 4


def prefill(sched, req, first_token: int = 7):
    sched.add_request(req)
    out = sched.schedule()
    assert out.synchronous == (sched.config.num_speculative_tokens > 0)
    sched.update(out, RunnerOutput(sampled_token_ids={req.request_id: [first_token]}))
    return out


def test_importing_speculation_does_not_import_torch():
    code = "import sys, kiln.scheduler.speculation; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rejected_drafts_roll_back_computed_tokens_and_free_their_blocks():
    sched = make_scheduler(num_speculative_tokens=4, max_num_tokens=64)
    req = make_request(6, max_tokens=20)  # 6 prompt tokens, then 1 output: 7 tokens, 6 computed
    prefill(sched, req)
    assert sched.draft_requests() == {req.request_id: 4}
    sched.set_draft_tokens({req.request_id: [11, 12, 13, 14]})
    out = sched.schedule()
    assert out.num_scheduled_tokens == {req.request_id: 5} and out.spec_token_ids == {req.request_id: [11, 12, 13, 14]}
    assert out.synchronous and req.num_computed_tokens == 11 and req.num_drafts_in_flight == 4
    assert len(sched.block_manager.get_block_ids(req.request_id)) == 3  # room for 11 tokens
    assert sched.draft_requests() == {}  # nothing to propose while its verify step is in flight
    assert sched.schedule().num_scheduled_tokens == {}  # nor is it planned again
    # One draft accepted, then the target's own token: 2 outputs, 3 drafts rejected.
    changed = sched.update(out, RunnerOutput(sampled_token_ids={req.request_id: [11, 99]}))
    assert changed == [req] and req.output_token_ids == [7, 11, 99]
    assert req.num_computed_tokens == 8 and req.num_drafts_in_flight == 0 and req.num_pending_tokens == 0
    assert len(sched.block_manager.get_block_ids(req.request_id)) == 2  # the third held only rejected drafts
    sched.block_manager.check_invariants()
    stats = sched.stats.spec_decode
    assert (stats.num_draft_tokens, stats.num_accepted_tokens, stats.acceptance_counts) == (4, 1, (0, 1, 0, 0, 0))
    assert stats.mean_acceptance_length == 2.0
    out = sched.schedule()  # no drafts proposed: a plain decode step, still synchronous
    assert out.num_scheduled_tokens == {req.request_id: 1} and out.cached_requests[0].num_computed_tokens == 8
    assert out.synchronous and not out.spec_token_ids


def test_tokens_after_a_stop_inside_accepted_drafts_are_dropped():
    sched = make_scheduler(num_speculative_tokens=3)
    req = make_request(5, max_tokens=20, eos=2)
    prefill(sched, req)
    sched.set_draft_tokens({req.request_id: [4, 2, 5]})
    out = sched.schedule()
    sched.update(out, RunnerOutput(sampled_token_ids={req.request_id: [4, 2, 5, 6]}))  # all accepted, EOS second
    assert req.output_token_ids == [7, 4, 2] and req.status is RequestStatus.FINISHED_STOPPED
    assert sched.block_manager.num_assigned_blocks == 0


def test_drafts_stop_short_of_max_tokens_and_count_in_the_budget():
    sched = make_scheduler(num_speculative_tokens=4, max_num_tokens=64)
    req = make_request(5, max_tokens=3)
    prefill(sched, req)
    assert sched.draft_requests() == {req.request_id: 1}  # 1 output + 1 draft + 1 own token = max_tokens
    sched.set_draft_tokens({req.request_id: [1, 2, 3]})
    out = sched.schedule()
    assert out.spec_token_ids == {req.request_id: [1]}
    sched.update(out, RunnerOutput(sampled_token_ids={req.request_id: [1, 8]}))
    assert req.output_token_ids == [7, 1, 8] and req.status is RequestStatus.FINISHED_LENGTH

    sched = make_scheduler(num_speculative_tokens=4, max_num_tokens=3)
    req = make_request(2, max_tokens=20)
    prefill(sched, req)
    sched.set_draft_tokens({req.request_id: [1, 2, 3, 4]})
    out = sched.schedule()
    assert out.num_scheduled_tokens == {req.request_id: 3} and out.spec_token_ids == {req.request_id: [1, 2]}


def test_speculation_switches_off_above_the_batch_size_and_on_poor_acceptance():
    sched = make_scheduler(num_speculative_tokens=2, speculative_max_batch_size=1, max_num_tokens=64)
    a, b = make_request(4, max_tokens=50), make_request(4, max_tokens=50)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert not out.synchronous  # two running, limit one: both run one step ahead
    sched.update(out, RunnerOutput(sampled_token_ids={a.request_id: [1], b.request_id: [1]}))
    assert sched.draft_requests() == {}
    sched.abort_request(b.request_id)
    assert sched.draft_requests() == {a.request_id: 2}

    # Nothing accepted, step after step: the moving average drops below the threshold.
    steps = 0
    while sched.draft_requests():
        sched.set_draft_tokens({a.request_id: [5, 5]})
        out = sched.schedule()
        sched.update(out, RunnerOutput(sampled_token_ids={a.request_id: [9]}))
        steps += 1
    assert 1 < steps < 10 and a.num_output_tokens < a.spec_resume_at <= a.num_output_tokens + SpeculationPolicy.PAUSE_TOKENS
    out = sched.schedule()
    assert not out.synchronous  # paused: back to running one step ahead
