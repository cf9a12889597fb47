"""Tensor-parallel engines on the CPU (gloo): a tp N engine gives the tokens of tp 1.

Each case builds a tiny random checkpoint at tp 1 and at tp N with the real builder and runs
the same batch through both engines (greedy, with chunked prefill and prefix-cache hits);
transformers' greedy continuation is the reference for both. The cases cover what tensor
parallelism changes: KV heads duplicated over ranks (llama tp 4, qwen2 tp 2), a vocabulary no
tp divides (1001), the Qwen2 qkv bias, the Qwen3 q/k norm, tied embeddings. Then: seeded
sampling equal to tp 1, the fused small-batch product (the residual joins rank 0's partial
product), a dead worker failing the engine fast, and no process left behind.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch
from test_e2e_helpers import TinyEngine, drain, greedy, make_tiny_engine, random_prompts

from kiln.engine_builder import build_engine
from kiln.engine_builder.errors import EngineFormatError
from kiln.runtime import LLMEngine, SamplingParams, layers
from kiln.runtime.attention import KernelSet
from kiln.runtime.executor import FatalEngineError
from kiln.runtime.linear import Linear, LinearContext, UnquantizedLinear
from kiln.runtime.parallel import Collectives
from kiln.runtime.tp_workers import FailedMessage, ReadyMessage, ShutdownMessage, StepMessage, WorkerSpec
from kiln.scheduler.interface import CachedRequestData, NewRequestData, SchedulerOutput

pytestmark = pytest.mark.slow

NEW_TOKENS = 6
CASES = [("llama", 2), ("llama", 4), ("qwen2", 2), ("qwen3", 4), ("mistral", 2), ("llama3_scaled_tied", 2)]


def build_tp(tiny: TinyEngine, tp: int, root: Path) -> Path:
    """The tiny model's checkpoint (next to its tp 1 engine) built again at ``tp``."""
    out = root / f"{tiny.kind}-tp{tp}"
    if not out.exists():
        build_engine(tiny.engine_dir.parent / f"{tiny.kind}-hf", out, tp=tp, dtype="float32", progress=False)
    return out


def engine_options(**extra) -> dict:
    return {"device": "cpu", "block_size": 4, "max_model_len": 128, **extra}


def run_batch(engine: LLMEngine, prompts: list[list[int]], params_of) -> dict[str, list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params_of(i))
    return {rid: out.outputs[0].token_ids for rid, out in drain(engine).items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tp")


@pytest.fixture(scope="module")
def tinies(root: Path) -> dict[str, TinyEngine]:
    return {kind: make_tiny_engine(kind, root) for kind in sorted({k for k, _ in CASES})}


@pytest.mark.parametrize(("kind", "tp"), CASES, ids=[f"{k}-tp{t}" for k, t in CASES])
def test_greedy_tokens_equal_tp1_and_transformers(tinies, root: Path, kind: str, tp: int) -> None:
    tiny = tinies[kind]
    (system,) = random_prompts(3, [12], tiny.vocab_size)  # 3 full blocks shared: prefix-cache hits
    prompts = random_prompts(5, [1, 4, 9, 17, 26], tiny.vocab_size, prefix=system)
    expected = {f"r{i}": tiny.hf_greedy(p, NEW_TOKENS) for i, p in enumerate(prompts)}
    # A 16-token budget chunks the longer prompts; the second round hits the prefix cache.
    with LLMEngine.from_engine_dir(build_tp(tiny, tp, root), **engine_options(max_num_tokens=16)) as engine:
        assert engine.model_config.tp_size == tp
        assert run_batch(engine, prompts, lambda i: greedy(NEW_TOKENS)) == expected
        assert run_batch(engine, prompts[::2], lambda i: greedy(NEW_TOKENS)) == {
            f"r{j}": expected[f"r{2 * j}"] for j in range(3)}
        assert engine.get_stats().prefix_cache_hits > 0


def test_seeded_sampling_and_logprobs_equal_tp1(tinies, root: Path) -> None:
    tiny = tinies["qwen2"]
    prompts = random_prompts(7, [5, 11, 3], tiny.vocab_size)

    def params(i: int) -> SamplingParams:
        return SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=100 + i, max_tokens=8, ignore_eos=True,
                              logprobs=2)

    def run(engine_dir: Path) -> dict:
        with LLMEngine.from_engine_dir(engine_dir, **engine_options()) as engine:
            for i, prompt in enumerate(prompts):
                engine.add_request(f"r{i}", prompt, params(i))
            return {rid: out.outputs[0] for rid, out in drain(engine).items()}

    single, tp2 = run(tiny.engine_dir), run(build_tp(tiny, 2, root))
    for rid, choice in single.items():
        assert tp2[rid].token_ids == choice.token_ids, rid
        for a, b in zip(tp2[rid].logprobs, choice.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_speculative_decoding_at_tp2_equals_transformers(tinies, root: Path) -> None:
    """Rank 0 verifies the drafts and broadcasts the accepted tokens: every rank appends the
    same ones and rolls back the same way (drafts accepted and rejected, sampling seeded)."""
    from kiln.runtime.bench import AcceptanceControlledProposer

    tiny = tinies["qwen2"]
    prompts = random_prompts(13, [4, 9, 6], tiny.vocab_size)
    expected = {f"r{i}": tiny.hf_greedy(p, NEW_TOKENS + 4) for i, p in enumerate(prompts)}
    sampled = SamplingParams(temperature=0.7, seed=11, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)

    def run(engine_dir: Path) -> tuple[dict, list]:
        proposer = AcceptanceControlledProposer(expected, 0.6, tiny.vocab_size, seed=3)
        with LLMEngine.from_engine_dir(engine_dir, proposer=proposer, **engine_options(
                speculative="external", num_speculative_tokens=3)) as engine:
            greedy_out = run_batch(engine, prompts, lambda i: greedy(NEW_TOKENS + 4))
            assert 0 < engine.get_stats().spec_decode.num_accepted_tokens < engine.get_stats().spec_decode.num_draft_tokens
            engine.add_request("r0", prompts[0], sampled)
            return greedy_out, drain(engine)["r0"].outputs[0].logprobs

    tp1_greedy, tp1_sampled = run(tiny.engine_dir)
    tp2_greedy, tp2_sampled = run(build_tp(tiny, 2, root))
    assert tp1_greedy == tp2_greedy == expected
    assert [lp.token_id for lp in tp2_sampled] == [lp.token_id for lp in tp1_sampled]
    for a, b in zip(tp2_sampled, tp1_sampled):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


class _OneRankOfTwo(Collectives):
    """Rank ``rank`` of a two-rank group whose all-reduce is done by the test (identity here)."""

    world_size = 2

    def __init__(self, rank: int) -> None:
        self.rank = rank


@pytest.mark.parametrize("prologue", [{"norm_weight": True}, {"silu_mul": True}])
def test_row_parallel_small_product_counts_the_residual_once(prologue: dict) -> None:
    """The fused small-batch GEMV of a row-parallel linear: each rank multiplies its input
    columns, rank 0 alone adds the residual, and the all-reduce (the sum of the two partial
    products) equals the one-rank product plus the residual."""
    gen = torch.Generator().manual_seed(0)
    ctx = LinearContext(torch.device("cpu"), torch.float32,
                        KernelSet(small_linear=layers.fused_linear, small_batch_rows=2, small_linear_max_rows=2))
    k, n = 32, 24
    weight = torch.randn(n, k, generator=gen, dtype=torch.float32)
    residual = torch.randn(2, n, generator=gen, dtype=torch.float32)
    if "silu_mul" in prologue:
        x = torch.randn(2, 2 * k, generator=gen, dtype=torch.float32)
        gate, up = x.chunk(2, dim=-1)
        shards = [torch.cat((gate[:, s], up[:, s]), dim=-1) for s in (slice(0, k // 2), slice(k // 2, k))]
        kwargs: dict = {"silu_mul": True}
    else:  # the norm prologue is for column-parallel inputs; here only the residual matters
        x = torch.randn(2, k, generator=gen, dtype=torch.float32)
        shards = [x[:, : k // 2], x[:, k // 2:]]
        kwargs = {}
    full = Linear(UnquantizedLinear(ctx, weight)).small(x, residual=residual, **kwargs)
    partials = [
        Linear(UnquantizedLinear(ctx, weight[:, r * k // 2:(r + 1) * k // 2].contiguous()), collectives=_OneRankOfTwo(r))
        .small(shards[r], residual=residual, **kwargs)
        for r in range(2)
    ]
    torch.testing.assert_close(partials[0] + partials[1], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partials[1], layers.fused_linear(shards[1], weight[:, k // 2:], **kwargs))


def test_a_dead_worker_fails_the_engine_fast_and_nothing_is_left_behind(tinies, root: Path) -> None:
    tiny = tinies["llama"]
    engine = LLMEngine.from_engine_dir(build_tp(tiny, 2, root), **engine_options())
    (worker,) = engine.executor._procs
    engine.add_request("a", random_prompts(1, [5], tiny.vocab_size)[0], greedy(50))
    engine.step()
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(FatalEngineError, match=r"worker rank 1 exited \(code -9\)"):
        for _ in range(1000):
            engine.step()
    assert time.monotonic() - start < 10
    with pytest.raises(FatalEngineError, match="rank 1"):
        engine.add_request("b", [5, 6], greedy(2))
    engine.shutdown()
    assert worker.poll() is not None


def test_shutdown_stops_the_workers(tinies, root: Path) -> None:
    engine = LLMEngine.from_engine_dir(build_tp(tinies["llama"], 4, root), **engine_options())
    procs = list(engine.executor._procs)
    assert len(procs) == 3 and all(p.poll() is None for p in procs)
    engine.shutdown()
    assert all(p.poll() == 0 for p in procs)  # they exited cleanly, not killed


def test_worker_that_cannot_start_is_named(tinies, root: Path) -> None:
    engine_dir = build_tp(tinies["mistral"], 2, root)
    broken = root / "broken-tp2"
    if not broken.exists():
        broken.mkdir()
        for f in engine_dir.iterdir():
            (broken / f.name).symlink_to(f)
        (broken / "rank1.safetensors").unlink()
        (broken / "rank1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FatalEngineError, match="rank 1 .*rank1.safetensors"):
        LLMEngine.from_engine_dir(broken, **engine_options())


def test_messages_round_trip() -> None:
    plan = SchedulerOutput(
        new_requests=[NewRequestData("a", [1, 2, 3], 3, SamplingParams(seed=3, stop=["x"]), [4, 5], 0,
                                     frozenset({2}))],
        cached_requests=[CachedRequestData("b", [7], 12)],
        num_scheduled_tokens={"a": 3, "b": 1}, order=["a", "b"], preempted_request_ids={"c"},
        finished_request_ids={"d"}, step_id=42, spec_token_ids={"b": [9, 8]}, synchronous=True,
    )
    from kiln.runtime.config import EngineConfig

    spec = WorkerSpec("/e", EngineConfig(engine_dir="/e", device="cpu", devices=(0, 1)), 1, 2, "tcp://127.0.0.1:1",
                      "gloo", "cpu")
    for message in (StepMessage(plan), ShutdownMessage(), ReadyMessage(1, 77), FailedMessage(1, "boom"), spec):
        assert pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)) == message


def test_pipeline_parallel_engines_are_refused(tinies, root: Path) -> None:
    import json

    engine_dir = root / "pp2"
    if not engine_dir.exists():
        build_engine(tinies["llama"].engine_dir.parent / "llama-hf", engine_dir, dtype="float32", progress=False)
        cfg = json.loads((engine_dir / "config.json").read_text())
        cfg["mapping"]["pp_size"] = 2
        (engine_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineFormatError, match=r"pipeline parallelism \(pp 2\) is not supported"):
        LLMEngine.from_engine_dir(engine_dir, **engine_options())


# ----------------------------------------------------------------------------- the real SmolLM2 at tp 3

SMOL_QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "2+2="]


def test_smollm2_tp3_chat_equals_transformers(smollm2_tp3_dir: Path, smollm2_hf_dir: Path) -> None:
    from test_e2e_helpers import hf_greedy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in SMOL_QUESTIONS]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    expected = [hf_greedy(model, p, 16, eos_token_id=tokenizer.eos_token_id) for p in ids]
    with LLMEngine.from_engine_dir(smollm2_tp3_dir, device="cpu", block_size=16, max_model_len=512) as engine:
        assert engine.model_config.tp_size == 3
        got = run_batch(engine, ids, lambda i: SamplingParams(temperature=0.0, max_tokens=16))
    assert [got[f"r{i}"] for i in range(len(ids))] == expected
    assert "Paris" in tokenizer.decode(expected[0])
