"""Session fixtures shared by every test folder: the embedded default model.

``smollm2_hf_dir``: the SmolLM2-135M-Instruct HF checkpoint (converted once from the bundled
GGUF into Kiln's cache). ``smollm2_engine_dir``: that model built once per session into a
temporary folder, tp 1, float32 (for CPU correctness tests against transformers);
``smollm2_tp3_dir``: the same at tp 3 (9 heads and 3 KV heads over 3 ranks);
``smollm2_fp8_engine_dir``: the same model built with ``--fp8 --kv-cache-dtype fp8`` on a small
calibration set, with its quality report (8 held-out windows of 128 tokens).
Heavy imports happen inside the fixtures so collecting tests stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    from kiln.engine_builder import resolve_source

    return resolve_source("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_engine_dir(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.engine_builder import build_engine

    out = tmp_path_factory.mktemp("smollm2") / "engine"
    build_engine(smollm2_hf_dir, out, tp=1, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_tp3_dir(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.engine_builder import build_engine

    out = tmp_path_factory.mktemp("smollm2-tp3") / "engine"
    build_engine(smollm2_hf_dir, out, tp=3, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_fp8_engine_dir(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.engine_builder import build_engine
    from kiln.engine_builder.quantize import Fp8Options

    out = tmp_path_factory.mktemp("smollm2-fp8") / "engine"
    options = Fp8Options(kv_cache_fp8=True, calib_samples=16, calib_seq_len=128, quality_samples=8)
    build_engine(smollm2_hf_dir, out, tp=1, dtype="float32", fp8=options, progress=False)
    return out
