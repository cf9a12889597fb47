"""ServerConfig from flags, YAML and environment; `serve-llm` errors are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kiln.server.cli import parse_config
from kiln.server.config import ServerConfigError, build_config

REPO = Path(__file__).resolve().parents[2]


def test_example_yaml_loads_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    cfg = parse_config(["--config", str(REPO / "configs/serve.example.yaml"), "--port", "9001",
                        "--no-prefix-caching", "--max-batch-size", "8"])
    assert cfg.port == 9001 and cfg.host == "127.0.0.1" and cfg.max_queue == 256
    assert cfg.engine.enable_prefix_caching is False and cfg.engine.max_batch_size == 8
    assert cfg.engine.max_num_tokens == 2048 and cfg.model_name == "smollm2-135m"
    assert cfg.api_key is None
    assert cfg.engine.kv_cache_dtype == "auto"
    assert parse_config(["--kv-cache-dtype", "fp8", "e"]).engine.kv_cache_dtype == "fp8"
    assert (cfg.max_n, cfg.max_prompts, cfg.max_request_bytes) == (16384, 1024, 8 * 2**20)
    cfg = parse_config(["e", "--max-n", "4", "--max-prompts", "2", "--max-request-bytes", "1000"])
    assert (cfg.max_n, cfg.max_prompts, cfg.max_request_bytes) == (4, 2, 1000)


def test_api_key_precedence_flag_yaml_env():
    env = {"KILN_API_KEY": "from-env"}
    assert build_config({"engine_dir": "e"}, {}, env).api_key == "from-env"
    assert build_config({"engine_dir": "e"}, {"api_key": "from-yaml"}, env).api_key == "from-yaml"
    assert build_config({"engine_dir": "e", "api_key": "flag"}, {"api_key": "y"}, env).api_key == "flag"
    assert build_config({"engine_dir": "e"}, {}, {}).api_key is None
    assert "flag" not in repr(build_config({"engine_dir": "e", "api_key": "flag"}, {}, {}))


@pytest.mark.parametrize("cli, yaml_values, needle", [
    ({}, {}, "no engine or model given"),
    ({"engine_dir": "e", "port": 70000}, {}, "port"),
    ({"engine_dir": "e", "max_queue": 0}, {}, "max_queue"),
    ({"engine_dir": "e", "max_n": 0}, {}, "max_n"),
    ({"engine_dir": "e"}, {"max_prompts": True}, "max_prompts"),
    ({"engine_dir": "e", "max_request_bytes": -1}, {}, "max_request_bytes"),
    ({"engine_dir": "e", "block_size": 0}, {}, "block_size"),
    ({"engine_dir": "e", "device": "tpu"}, {}, "device"),
    ({"engine_dir": "e"}, {"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
])
def test_bad_options_name_the_option(cli, yaml_values, needle):
    with pytest.raises(ServerConfigError, match=needle):
        build_config(cli, yaml_values, {})


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine_dir: e\nmax_queu: 3\n")
    with pytest.raises(ServerConfigError, match="max_queu"):
        parse_config(["--config", str(path)])


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    for args in (["--port", "-1", "e"], [str(tmp_path / "missing-engine")]):
        r = subprocess.run([sys.executable, "-m", "kiln.server", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert r.stderr.startswith("serve-llm: error:")


def test_speculative_options_from_flags_and_yaml(tmp_path):
    cfg = parse_config(["e", "--speculative", "ngram", "--num-speculative-tokens", "3", "--ngram-min", "1",
                        "--ngram-max", "5", "--speculative-max-batch-size", "4"])
    engine = cfg.engine
    assert (engine.speculative, engine.spec_tokens, engine.ngram_min, engine.ngram_max) == ("ngram", 3, 1, 5)
    assert engine.speculative_max_batch_size == 4 and engine.draft_engine is None
    path = tmp_path / "c.yaml"
    path.write_text("engine_dir: e\nspeculative: draft\ndraft_engine: engines/draft\nspeculative_min_acceptance: 0.5\n")
    engine = parse_config(["--config", str(path)]).engine
    assert (engine.speculative, engine.draft_engine, engine.speculative_min_acceptance) == ("draft", "engines/draft", 0.5)
    assert parse_config(["e"]).engine.spec_tokens == 0  # off by default
    with pytest.raises(ServerConfigError, match="draft_engine"):
        parse_config(["e", "--speculative", "draft"])
    with pytest.raises(ServerConfigError, match="ngram_min"):
        parse_config(["e", "--speculative", "ngram", "--ngram-min", "5", "--ngram-max", "2"])


def test_kernel_backend_and_its_old_name(tmp_path):
    assert parse_config(["e"]).engine.kernel_backend == "auto"
    assert parse_config(["e", "--kernel-backend", "torch"]).engine.kernel_backend == "torch"
    assert parse_config(["e", "--attention-backend", "triton"]).engine.kernel_backend == "triton"  # old flag
    path = tmp_path / "c.yaml"
    path.write_text("engine_dir: e\nattention_backend: torch\n")  # old YAML key
    engine = parse_config(["--config", str(path)]).engine
    assert (engine.kernel_backend, engine.attention_backend) == ("torch", None)
    path.write_text("engine_dir: e\nattention_backend: torch\nkernel_backend: triton\n")
    with pytest.raises(ServerConfigError, match="disagree"):
        parse_config(["--config", str(path)])
    with pytest.raises(ServerConfigError, match="kernel_backend must be one of"):
        build_config({"engine_dir": "e", "kernel_backend": "cuda"}, {})
