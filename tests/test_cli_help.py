"""`--help` of build-llm, serve-llm and bench-llm imports nothing heavy (torch, transformers,
fastapi), so it appears at once. Checked by what the help run imported, not by timing it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "fastapi", "safetensors", "triton")
# Runs one console script's entry point (as pip installed it) with the given arguments and
# prints the heavy modules it imported.
RUNNER = """
import json, sys
from importlib.metadata import entry_points
(ep,) = [e for e in entry_points(group="console_scripts") if e.name == sys.argv[1]]
try:
    ep.load()(sys.argv[2:])
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.mark.parametrize("command", [
    ["build-llm", "--help"], ["serve-llm", "--help"], ["bench-llm", "--help"],
    ["bench-llm", "throughput", "--help"], ["bench-llm", "serve", "--help"],
])
def test_help_imports_nothing_heavy(command):
    r = subprocess.run([sys.executable, "-c", RUNNER, *command], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    help_text, _, last = r.stdout.rstrip().rpartition("\n")
    result = json.loads(last)
    assert result["code"] == 0 and "usage:" in help_text
    assert result["heavy"] == [], f"{' '.join(command)} imported {result['heavy']}"


def test_help_lists_the_registered_architectures():
    from kiln.engine_builder.architectures import supported_architectures
    from kiln.engine_builder.options import SUPPORTED_ARCHITECTURES_HELP

    assert SUPPORTED_ARCHITECTURES_HELP == ", ".join(supported_architectures())


def test_serve_llm_shows_build_llms_build_options():
    """The build options are defined once: every one build-llm has, serve-llm has too."""
    from kiln.engine_builder.cli import make_parser
    from kiln.server.cli import build_parser

    _, build_dests = make_parser()
    serve_options = {o for a in build_parser()._actions for o in a.option_strings}
    build_options = {o for a in make_parser()[0]._actions if a.dest in build_dests for o in a.option_strings}
    assert {"--tp", "--dtype"} <= build_options <= serve_options


def test_serve_llm_kv_cache_dtype_is_the_engines_and_reaches_a_quantized_build():
    """serve-llm's --kv-cache-dtype is the engine option (auto/model/fp8); with a quantization
    flag, fp8 also asks the build of SOURCE for calibrated KV-cache scales."""
    from kiln.server.cli import parse_config

    quantized = parse_config(["some-model", "--fp8", "--kv-cache-dtype", "fp8"])
    assert quantized.build_options == {"fp8": True, "kv_cache_dtype": "fp8"}
    assert quantized.engine.kv_cache_dtype == "fp8"
    plain = parse_config(["some-model", "--kv-cache-dtype", "model"])
    assert not plain.build_options and plain.engine.kv_cache_dtype == "model"
