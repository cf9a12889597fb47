"""ModelRunner driven by hand-made SchedulerOutputs, checked against transformers' greedy generate."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from test_model_helpers import tiny_engine

from kiln.runtime.config import EngineConfig
from kiln.runtime.kv_cache import KVCacheTooSmallError
from kiln.runtime.model_runner import ModelRunner
from kiln.scheduler.interface import CachedRequestData, NewRequestData, SchedulerOutput
from kiln.scheduler.sampling_params import SamplingParams

BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@dataclass
class Seq:
    """What a scheduler would track for one request."""

    request_id: str
    prompt: list[int]
    params: SamplingParams = field(default_factory=lambda: GREEDY)
    outputs: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    known_to_runner: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs


class HandScheduler:
    """Builds SchedulerOutputs from explicit (seq, num_tokens) plans; hands out shuffled blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.free = list(torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist())

    def plan(self, work: list[tuple[Seq, int]], finished: set[str] = frozenset(), preempted: set[str] = frozenset()):
        so = SchedulerOutput(finished_request_ids=set(finished), preempted_request_ids=set(preempted))
        for seq, n in work:
            needed = -(-(seq.num_computed + n) // BLOCK_SIZE) - len(seq.blocks)
            new_blocks = [self.free.pop() for _ in range(max(0, needed))]
            seq.blocks += new_blocks
            if seq.known_to_runner:
                so.cached_requests.append(CachedRequestData(seq.request_id, new_blocks, seq.num_computed))
            else:
                so.new_requests.append(NewRequestData(seq.request_id, list(seq.tokens), len(seq.prompt),
                                                      seq.params, list(seq.blocks), seq.num_computed))
                seq.known_to_runner = True
            so.num_scheduled_tokens[seq.request_id] = n
            so.order.append(seq.request_id)
        return so

    def run(self, runner: ModelRunner, work: list[tuple[Seq, int]], **kw):
        out = runner.execute_model(self.plan(work, **kw))
        for seq, n in work:
            seq.num_computed += n
            seq.outputs += out.sampled_token_ids.get(seq.request_id, [])
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return tiny_engine(tmp_path_factory.mktemp("tiny"), "qwen2", seed=3)


def make_runner(engine, **options) -> ModelRunner:
    config = EngineConfig(engine_dir="unused", device="cpu", block_size=BLOCK_SIZE, max_model_len=64,
                          max_batch_size=8, max_num_tokens=64, num_kv_cache_tokens=256, **options)
    return ModelRunner(config, engine)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                          pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_chunked_prefill_then_decode_matches_hf_generate(tiny) -> None:
    hf, engine = tiny
    runner = make_runner(engine)
    assert runner.num_blocks == 256 // BLOCK_SIZE and runner.vocab_size == engine.model_config.vocab_size
    sched = HandScheduler(runner.num_blocks)
    a = Seq("a", [5, 17, 2, 88, 41, 3, 9, 60, 12, 7, 33])
    b = Seq("b", [70, 1, 44, 8, 19, 23])
    out = sched.run(runner, [(a, 6)])  # partial prefill chunk: nothing sampled
    assert out.sampled_token_ids == {} and not out.failed_request_ids
    sched.run(runner, [(a, 5), (b, 6)])  # a finishes its prompt, b arrives whole
    assert len(a.outputs) == 1 and len(b.outputs) == 1
    for _ in range(7):
        sched.run(runner, [(b, 1), (a, 1)])
    assert a.outputs == hf_greedy(hf, a.prompt, 8)
    assert b.outputs == hf_greedy(hf, b.prompt, 8)


def test_preempted_request_resumes_by_recompute(tiny) -> None:
    hf, engine = tiny
    runner = make_runner(engine)
    sched = HandScheduler(runner.num_blocks)
    a = Seq("a", [4, 8, 15, 16, 23, 42, 7])
    sched.run(runner, [(a, 7)])
    sched.run(runner, [(a, 1)])
    # Preempted: the runner drops it; it comes back as a new request with its outputs.
    sched.free += a.blocks
    a.blocks, a.num_computed, a.known_to_runner = [], 0, False
    sched.run(runner, [], preempted={"a"})
    assert "a" not in runner.input_batch.requests
    sched.run(runner, [(a, len(a.tokens))])
    for _ in range(3):
        sched.run(runner, [(a, 1)])
    assert a.outputs == hf_greedy(hf, a.prompt, 6)


def test_bad_request_fails_alone(tiny) -> None:
    hf, engine = tiny
    runner = make_runner(engine)
    sched = HandScheduler(runner.num_blocks)
    bad = Seq("bad", [1, 2, engine.model_config.vocab_size + 5])
    good = Seq("good", [10, 20, 30])
    out = sched.run(runner, [(bad, 3), (good, 3)])
    assert out.failed_request_ids == {"bad"} and "bad" not in out.sampled_token_ids
    sched.run(runner, [(good, 1)], finished={"bad"})
    assert good.outputs == hf_greedy(hf, good.prompt, 2)


def test_logprobs_match_hf(tiny) -> None:
    hf, engine = tiny
    runner = make_runner(engine)
    sched = HandScheduler(runner.num_blocks)
    seq = Seq("lp", [3, 1, 4, 1, 5, 9], params=SamplingParams(temperature=0.0, logprobs=3))
    out = sched.run(runner, [(seq, 6)])
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([seq.prompt])).logits[0, -1].float(), -1)
    [(chosen, top)] = out.logprobs["lp"]
    assert seq.outputs == [int(expected.argmax())]
    assert chosen == pytest.approx(float(expected.max()), abs=1e-4)
    top_lp, top_ids = expected.topk(3)
    assert [t for t, _ in top] == top_ids.tolist()
    assert [lp for _, lp in top] == pytest.approx(top_lp.tolist(), abs=1e-4)


def test_kv_cache_smaller_than_one_sequence_is_an_error(tiny) -> None:
    _, engine = tiny
    config = EngineConfig(engine_dir="unused", device="cpu", block_size=BLOCK_SIZE, max_model_len=64,
                          num_kv_cache_tokens=32)
    with pytest.raises(KVCacheTooSmallError, match="max_model_len"):
        ModelRunner(config, engine)


@pytest.mark.slow
def test_smollm2_runner_greedy_matches_hf(smollm2_hf_dir, smollm2_engine_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.engine_builder.format import load_engine

    engine = load_engine(smollm2_engine_dir)
    runner = ModelRunner(EngineConfig(engine_dir=smollm2_engine_dir, device="cpu", block_size=BLOCK_SIZE,
                                      max_model_len=256, max_batch_size=4, max_num_tokens=256,
                                      num_kv_cache_tokens=512), engine)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    prompt = AutoTokenizer.from_pretrained(smollm2_hf_dir).encode("Water boils at a temperature of")
    sched = HandScheduler(runner.num_blocks)
    seq = Seq("s", prompt)
    half = len(prompt) // 2
    sched.run(runner, [(seq, half)])
    sched.run(runner, [(seq, len(prompt) - half)])
    for _ in range(7):
        sched.run(runner, [(seq, 1)])
    assert seq.outputs == hf_greedy(hf, prompt, 8)
