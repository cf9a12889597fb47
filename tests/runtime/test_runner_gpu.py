"""ModelRunner on CUDA: profiled KV sizing, both op backends, against transformers (skipped without a GPU)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from test_model_helpers import tiny_engine
from test_runner import BLOCK_SIZE, HandScheduler, Seq, hf_greedy

from kiln.runtime.config import EngineConfig
from kiln.runtime.model_runner import ModelRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _release_earlier_gpu_memory() -> None:
    """KV sizing by fraction counts everything this process holds: drop runners of earlier tests."""
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_runner_greedy(backend: str, dtype: str, tmp_path: Path) -> None:
    hf, engine = tiny_engine(tmp_path, "qwen3", seed=3, dtype=dtype)
    config = EngineConfig(engine_dir="unused", device="cuda", block_size=BLOCK_SIZE, max_model_len=128,
                          max_batch_size=16, max_num_tokens=512, kv_cache_fraction=0.05, attention_backend=backend)
    runner = ModelRunner(config, engine)
    try:
        _check_greedy(runner, hf, dtype)
    finally:
        runner.shutdown()  # graphs make the runner immortal (gc.freeze): free its memory now


def _check_greedy(runner: ModelRunner, hf: torch.nn.Module, dtype: str) -> None:
    assert runner.model.dtype == getattr(torch, dtype)
    assert runner.num_blocks * BLOCK_SIZE >= 128  # sized by profiling, at least one sequence
    sched = HandScheduler(min(runner.num_blocks, 4096))
    a = Seq("a", [5, 17, 2, 88, 41, 3, 9, 60, 12, 7, 33])
    b = Seq("b", [70, 1, 44, 8, 19, 23])
    sched.run(runner, [(a, 6)])
    sched.run(runner, [(a, 5), (b, 6)])
    for _ in range(5):
        sched.run(runner, [(b, 1), (a, 1)])
    if dtype == "float32":
        assert a.outputs == hf_greedy(hf, a.prompt, 6)
        assert b.outputs == hf_greedy(hf, b.prompt, 6)
    else:  # bf16 may flip a near-tie; the first token of a clear prompt must agree
        assert len(a.outputs) == 6 and a.outputs[0] == hf_greedy(hf, a.prompt, 1)[0]
