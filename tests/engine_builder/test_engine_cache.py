"""The engine cache behind `serve-llm SOURCE`: one build per (source, build options), reused
afterwards, rebuilt when the source changes; engine directories and hub ids handled in one line."""

from __future__ import annotations

import json
import os

import pytest
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder import load_engine
from kiln.engine_builder.engine_cache import cache_path, engine_cache_root, prepare_engine
from kiln.engine_builder.errors import BuildOptionError, SourceError
from kiln.engine_builder.source import resolve_source


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "engines"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("cache-src") / "tiny-llama-hf", "llama")


def test_builds_once_then_reuses(cache, src):
    first = prepare_engine(str(src), {}, progress=False)
    assert first.built and first.name == "tiny-llama-hf"
    assert first.path.parent == cache == engine_cache_root() and first.path.name.startswith("tiny-llama-hf-")
    assert load_engine(first.path).model_config.dtype == "float32"  # the source's dtype
    rank0 = first.path / "rank0.safetensors"
    stamp = rank0.stat().st_mtime_ns
    again = prepare_engine(str(src), {}, progress=False)
    assert (again.path, again.built) == (first.path, False) and rank0.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == [first.path.name]  # no temporary folders left


def test_build_options_key_the_cache_and_aliases_are_one_option(cache, src):
    base = prepare_engine(str(src), {}, progress=False).path
    half = prepare_engine(str(src), {"dtype": "fp16"}, progress=False)
    assert half.built and half.path != base and load_engine(half.path).model_config.dtype == "float16"
    same = prepare_engine(str(src), {"dtype": "float16"}, progress=False)
    assert same.path == half.path and not same.built
    tp2 = prepare_engine(str(src), {"tp": 2}, progress=False)
    assert tp2.path not in (base, half.path) and load_engine(tp2.path, rank=1).model_config.tp_size == 2


def test_a_changed_source_builds_a_new_entry(cache, src, tmp_path):
    copy = tmp_path / "copy" / src.name
    copy.mkdir(parents=True)
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    old = prepare_engine(str(copy), {}, progress=False).path
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    new = prepare_engine(str(copy), {}, progress=False)
    assert new.built and new.path != old and load_engine(new.path).model_config.norm_epsilon == 1e-6


def test_engine_dir_is_served_as_is_and_refuses_build_options(cache, src):
    built = prepare_engine(str(src), {}, progress=False).path
    same = prepare_engine(str(built))
    assert (same.path, same.built, same.name) == (built, False, built.name)
    with pytest.raises(BuildOptionError, match=r"already built; build options \(--dtype\)"):
        prepare_engine(str(built), {"dtype": "bf16"})


def test_hub_id_and_bad_dtype_are_one_line_errors(cache, src):
    with pytest.raises(SourceError, match="looks like a Hugging Face hub id.*hf download meta-llama/Llama-3.1-8B"):
        prepare_engine("meta-llama/Llama-3.1-8B")
    with pytest.raises(BuildOptionError, match="unknown dtype 'int3'"):
        prepare_engine(str(src), {"dtype": "int3"})
    assert not cache.exists() or not os.listdir(cache)


def test_the_alias_is_named_smollm2(tmp_path):
    hf_dir = resolve_source("smollm2-135m")
    path = cache_path("smollm2-135m", hf_dir, {}, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("smollm2-135m-")
    assert cache_path("smollm2-135m", hf_dir, {"dtype": "bfloat16"}, tmp_path) != path
