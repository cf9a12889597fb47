"""Engines this runtime cannot execute correctly are refused with one line, never run wrong.

A tensor-parallel engine keeps a shard of every layer in each rank file: running rank 0's
shard as the whole model answered garbage ("What is the capital of France?" -> "He"...).
"""

from __future__ import annotations

import pytest
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder import build_engine
from kiln.runtime import LLM, LLMEngine


@pytest.fixture(scope="module")
def tp2_engine_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tp2")
    hf_dir = make_tiny_hf_checkpoint(root / "hf", "llama")
    build_engine(hf_dir, root / "engine", tp=2, dtype="float32", progress=False)
    return root / "engine"


def test_engine_refuses_a_tp2_engine_naming_its_tp(tp2_engine_dir) -> None:
    with pytest.raises(ValueError, match=r"--tp 2 .*rebuild it with --tp 1") as info:
        LLMEngine.from_engine_dir(tp2_engine_dir, device="cpu")
    assert "\n" not in str(info.value)


def test_llm_refuses_a_tp2_engine(tp2_engine_dir) -> None:
    with pytest.raises(ValueError, match="--tp 2"):
        LLM(tp2_engine_dir, device="cpu")


def test_serve_llm_refuses_a_tp2_engine_in_one_line(tp2_engine_dir, capsys) -> None:
    from kiln.server.cli import main

    assert main([str(tp2_engine_dir), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("serve-llm: error: engine ") and "--tp 2" in err and "\n" not in err
