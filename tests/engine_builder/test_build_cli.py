"""build-llm's command line: one-line errors without tracebacks, --force, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder import build_engine, load_engine
from kiln.engine_builder import writer as writer_module
from kiln.engine_builder.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("cli") / "src", "llama", with_tokenizer=False)


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("build-llm: error: "), err
    assert needle in lines[0] and "Traceback" not in err


def _variant(src, tmp_path, edit_config=None, damage_weights=False):
    dst = tmp_path / "variant"
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if damage_weights:
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


BAD_INPUTS = {
    "missing-source": (lambda src, tmp: [tmp / "nope"], "does not exist"),
    "not-hf-dir": (lambda src, tmp: [tmp], "no config.json"),
    "unsupported-arch": (
        lambda src, tmp: [_variant(src, tmp, lambda c: c.update(architectures=["GPT2LMHeadModel"]))],
        "supported: LlamaForCausalLM",
    ),
    "tp-vs-heads": (lambda src, tmp: [src, "--tp", "3"], "does not divide the 4 attention heads"),
    "kv-heads": (lambda src, tmp: [_variant(src, tmp, lambda c: c.update(num_key_value_heads=3))], "KV heads"),
    "dtype": (lambda src, tmp: [src, "--dtype", "float8"], "unknown dtype 'float8'"),
    "corrupt-weights": (lambda src, tmp: [_variant(src, tmp, damage_weights=True)], "truncated"),
    "preset": (lambda src, tmp: ["--random-weights", "llama-9000"], "unknown preset 'llama-9000'"),
    "no-source": (lambda src, tmp: [], "no SOURCE given"),
    "missing-tensor": (
        lambda src, tmp: [_variant(src, tmp, lambda c: c.update(num_hidden_layers=3))], "is missing"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line(capsys, src, tmp_path, case):
    make_args, needle = BAD_INPUTS[case]
    args = make_args(src, tmp_path)
    rc, _, err = _run(capsys, *args, "--output", tmp_path / "out", "-q")
    _assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_force(capsys, src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    rc, _, err = _run(capsys, src, "--output", out)
    _assert_one_line_error(rc, err, "already exists (use --force")
    assert (out / "keep.txt").exists()
    rc, stdout, _ = _run(capsys, src, "--output", out, "--force", "--tp", "2")
    assert rc == 0 and "rank1.safetensors" in stdout and "peak RSS" in stdout
    assert not (out / "keep.txt").exists() and load_engine(out, rank=1).model_config.tp_size == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_failure_mid_build_leaves_nothing(monkeypatch, src, tmp_path, exc):
    old = tmp_path / "out"
    build_engine(src, old, progress=False)
    before = {p.name: p.stat().st_size for p in old.iterdir()}
    real_write, calls = writer_module.StreamingSafetensorsWriter.write, []

    def failing_write(self, name, *parts):
        calls.append(name)
        if len(calls) == 5:
            raise exc("injected")
        return real_write(self, name, *parts)

    monkeypatch.setattr(writer_module.StreamingSafetensorsWriter, "write", failing_write)
    with pytest.raises(exc):
        build_engine(src, tmp_path / "fresh", tp=2, progress=False)
    calls.clear()
    with pytest.raises(exc):
        build_engine(src, old, tp=2, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no fresh/, no temp dirs
    assert {p.name: p.stat().st_size for p in old.iterdir()} == before  # the old build is intact


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--output", "--tp", "--dtype", "--force", "--random-weights", "--seed", "--quiet", "examples:"):
        assert option in text


def test_console_script_error_in_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.engine_builder.cli", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_too_little_disk_space_is_refused(monkeypatch, capsys, src, tmp_path):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=1000))
    rc, _, err = _run(capsys, src, "--output", tmp_path / "out")
    _assert_one_line_error(rc, err, "not enough disk space")
    assert list(tmp_path.iterdir()) == []


def test_dtype_aliases(capsys, src, tmp_path):
    from kiln.engine_builder.options import canonical_dtype

    aliases = {"bf16": "bfloat16", "FP16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
               "bfloat16": "bfloat16"}
    assert {a: canonical_dtype(a) for a in aliases} == aliases
    rc, _, err = _run(capsys, src, "--output", tmp_path / "out", "--dtype", "bf16", "-q")
    assert rc == 0, err
    assert load_engine(tmp_path / "out").model_config.dtype == "bfloat16"
