"""Request defaults from the engine's generation_config.json (as `vllm serve` applies them):
fields a request leaves out take the file's values, fields it sends win. Checked on the
SamplingParams the engine receives through the real HTTP path (FakeEngine records them)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from kiln.runtime.config import EngineConfig
from kiln.server.app import create_app
from kiln.server.config import ServerConfig
from kiln.server.sampling_defaults import load_sampling_defaults, sampling_defaults

from .fake_engine import FakeEngine
from .helpers import ThreadServer

GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                     "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 7}


class RecordingEngine(FakeEngine):
    """FakeEngine that keeps the SamplingParams of every request it is given."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.params = []

    def add_request(self, request_id, prompt, sampling_params, arrival_time=None, priority=0) -> None:
        self.params.append(sampling_params)
        super().add_request(request_id, prompt, sampling_params, arrival_time, priority)


def _engine_dir(tmp_path, config: dict | str) -> str:
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "generation_config.json").write_text(text)
    return str(tmp_path)


def test_the_keys_vllm_reads_are_read(tmp_path):
    defaults = load_sampling_defaults(_engine_dir(tmp_path, GENERATION_CONFIG))
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 7}
    assert load_sampling_defaults(tmp_path / "missing") == {}


@pytest.mark.parametrize("text", ["{not json", json.dumps({"temperature": 7.0}), json.dumps({"top_k": "many"})])
def test_a_bad_file_is_reported_and_ignored(tmp_path, caplog, text):
    with caplog.at_level(logging.WARNING):
        assert sampling_defaults(_engine_dir(tmp_path, text)) == {}
    assert "generation_config.json" in caplog.text


def test_unsent_fields_take_the_defaults_and_sent_fields_win(tmp_path):
    engine = RecordingEngine(max_model_len=64)
    config = ServerConfig(engine=EngineConfig(engine_dir=_engine_dir(tmp_path, GENERATION_CONFIG)),
                          served_model_name="m")
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with ThreadServer(create_app(engine, config)) as server:
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "hi"})):
            assert httpx.post(server.base_url + path, json=body, timeout=30).status_code == 200
            assert httpx.post(server.base_url + path, json={**body, "temperature": 0, "top_k": None,
                                                            "max_tokens": 3}, timeout=30).status_code == 200
        assert httpx.get(server.base_url + "/playground/defaults.json").json()["temperature"] == 0.6
    got = [(p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) for p in engine.params]
    defaults, overridden = (0.6, 0.9, 20, 1.05, 7), (0.0, 0.9, 20, 1.05, 3)  # null means "not sent"
    assert got == [defaults, overridden, defaults, overridden]


def test_without_defaults_requests_keep_openais(tmp_path):
    engine = RecordingEngine(max_model_len=64)
    config = ServerConfig(engine=EngineConfig(engine_dir=_engine_dir(tmp_path, {"eos_token_id": 2})),
                          served_model_name="m")
    with ThreadServer(create_app(engine, config)) as server:
        httpx.post(server.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    (params,) = engine.params
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (1.0, 1.0, 0, 1.0)
