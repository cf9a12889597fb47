"""Shared helpers for the scheduler tests: requests, schedulers and a fake model runner.

The fake runner keeps its own copy of every request's tokens and block table, built only
from the SchedulerOutputs it receives (the contract in kiln/scheduler/interface.py), and a
shadow "KV cache" where each slot holds a fingerprint of the token prefix ending at that
position. Before a step runs it checks that every context position the request attends to
holds the right fingerprint, so a wrong block table, a bad prefix-cache hit or a block
reused while still in use shows up as a mismatch.

Draft tokens (speculative decoding) are verified like the real runner does: the step runs
the request's tokens plus its drafts, a random number of leading drafts is accepted and one
token of the runner's own follows them; the runner then rolls its copy back (computed
tokens, and the blocks the scheduler freed) exactly as the contract says.
"""

from __future__ import annotations

import itertools
import random

from kiln.scheduler import (
    Request,
    RunnerOutput,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

_ids = itertools.count()
_clock = itertools.count()


def make_request(
    prompt: int | list[int],
    max_tokens: int | None = 8,
    request_id: str | None = None,
    eos: int | None = None,
    priority: int = 0,
    arrival_time: float | None = None,
    **params,
) -> Request:
    """A request whose prompt is ``prompt`` tokens (distinct per request) or the given ids."""
    rid = request_id if request_id is not None else f"req-{next(_ids)}"
    if isinstance(prompt, int):
        base = 1000 * (next(_ids) + 1)
        prompt = list(range(base, base + prompt))
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(max_tokens=max_tokens, **params),
        eos_token_ids=frozenset() if eos is None else frozenset([eos]),
        arrival_time=float(next(_clock)) if arrival_time is None else arrival_time,
        priority=priority,
    )


def make_scheduler(**overrides) -> Scheduler:
    options = dict(num_blocks=64, max_model_len=256, block_size=4, max_num_tokens=64, max_batch_size=16)
    options.update(overrides)
    return Scheduler(SchedulerConfig(**options))


class FakeRunner:
    """Executes SchedulerOutputs without a model, checking the scheduler <-> runner contract."""

    def __init__(self, block_size: int, seed: int = 0, vocab: int = 8, pipelined: bool = False) -> None:
        self.block_size = block_size
        # Run one step ahead of the scheduler's update (like the engine): a request that failed
        # may be scheduled once more before the scheduler hears of the failure.
        self.pipelined = pipelined
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.tokens: dict[str, list[int]] = {}
        self.num_prompt: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.kv: dict[int, int] = {}  # slot -> fingerprint of the token prefix ending there

    def _fingerprints(self, tokens: list[int], end: int) -> list[int]:
        out, h = [], 0
        for token in tokens[:end]:
            h = hash((h, token))
            out.append(h)
        return out

    def _slot(self, rid: str, position: int) -> int:
        return self.blocks[rid][position // self.block_size] * self.block_size + position % self.block_size

    def _apply_plan(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids | out.preempted_request_ids:
            self._drop(rid)
        for new in out.new_requests:
            assert new.request_id not in self.tokens, f"{new.request_id} sent as new twice"
            self.tokens[new.request_id] = list(new.token_ids)
            self.num_prompt[new.request_id] = new.num_prompt_tokens
            self.blocks[new.request_id] = list(new.block_ids)
            self.computed[new.request_id] = new.num_computed_tokens
        for cached in out.cached_requests:
            if cached.request_id not in self.tokens:
                continue  # it failed earlier; like the real runner, fail it again (execute)
            assert cached.num_computed_tokens == self.computed[cached.request_id]
            blocks = self.blocks[cached.request_id]
            keep = -(-cached.num_computed_tokens // self.block_size)
            assert len(blocks) >= keep, f"{cached.request_id}: lost blocks"
            del blocks[keep:]  # freed by the scheduler after rejected drafts
            blocks.extend(cached.new_block_ids)
        assert set(out.order) == set(out.num_scheduled_tokens)
        assert set(out.spec_token_ids) <= set(out.order)

    def _drop(self, rid: str) -> None:
        for state in (self.tokens, self.num_prompt, self.blocks, self.computed):
            state.pop(rid, None)

    def execute(
        self, out: SchedulerOutput, sample=None, failed: frozenset[str] = frozenset()
    ) -> RunnerOutput:
        """Run one step; ``sample(rid) -> list[int]`` picks tokens (default: random)."""
        self._apply_plan(out)
        sampled: dict[str, list[int]] = {}
        unknown = {rid for rid in out.order if rid not in self.tokens}
        assert self.pipelined or not unknown, f"scheduled requests the runner never got: {unknown}"
        failed = set(failed) | unknown
        for rid in out.order:
            if rid in failed:
                self._drop(rid)  # the real runner forgets a request it failed
                continue
            n = out.num_scheduled_tokens[rid]
            drafts = out.spec_token_ids.get(rid, [])
            start, tokens = self.computed[rid], self.tokens[rid]
            end = start + n
            known = tokens + drafts
            assert 0 < n and end <= len(known), f"{rid}: runs [{start}, {end}) of {len(known)} tokens"
            assert not drafts or end == len(known), f"{rid}: drafts must end the step"
            assert len(self.blocks[rid]) * self.block_size >= end, f"{rid}: too few blocks"
            prints = self._fingerprints(known, end)
            for pos in range(start):  # context that must already be in the cache
                assert self.kv.get(self._slot(rid, pos)) == prints[pos], f"{rid}: stale KV at {pos}"
            for pos in range(start, end):
                self.kv[self._slot(rid, pos)] = prints[pos]
            self.computed[rid] = end
            if end == len(known):
                accepted = self.rng.randint(0, len(drafts))
                new = drafts[:accepted] + (sample(rid) if sample else [self.rng.randrange(self.vocab)])
                sampled[rid] = new
                self.computed[rid] = end - (len(drafts) - accepted)  # rejected drafts: KV to redo
                # The runner appends what it sampled; if the scheduler stops the request
                # mid-list, it is finished and this copy is dropped anyway.
                tokens.extend(new)
        return RunnerOutput(sampled_token_ids=sampled, failed_request_ids=set(failed))


def step(sched: Scheduler, runner: FakeRunner, sample=None, failed=frozenset()):
    out = sched.schedule()
    result = runner.execute(out, sample, failed)
    changed = sched.update(out, result)
    return out, changed


def run_to_completion(sched: Scheduler, runner: FakeRunner, sample=None, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_unfinished_requests():
        step(sched, runner, sample)
        steps += 1
        assert steps < max_steps, "requests never finish"
    return steps
