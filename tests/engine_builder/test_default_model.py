"""The embedded default model (SmolLM2-135M-Instruct from the bundled GGUF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kiln.engine_builder import load_engine


@pytest.mark.slow
def test_cli_builds_the_default_model(tmp_path, smollm2_hf_dir):
    out = tmp_path / "smollm2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.engine_builder.cli", "smollm2-135m", "--output", str(out), "--dtype", "bfloat16"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "built LlamaForCausalLM engine" in proc.stdout and "peak RSS" in proc.stdout
    engine = load_engine(out)
    mc = engine.model_config
    assert (mc.architecture, mc.dtype, mc.vocab_size, mc.num_hidden_layers) == ("LlamaForCausalLM", "bfloat16", 49152, 30)
    assert (mc.num_attention_heads, mc.num_key_value_heads, mc.head_size, mc.tie_word_embeddings) == (9, 3, 64, True)
    source = load_file(str(smollm2_hf_dir / "model.safetensors"))
    assert torch.equal(engine.tensors["lm_head.weight"], source["model.embed_tokens.weight"].to(torch.bfloat16))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in prompt


def test_session_engine_fixture_is_float32_tp1(smollm2_engine_dir, smollm2_hf_dir):
    engine = load_engine(smollm2_engine_dir)
    assert engine.model_config.dtype == "float32" and engine.model_config.tp_size == 1
    source = load_file(str(smollm2_hf_dir / "model.safetensors"))
    assert torch.equal(
        engine.tensors["transformer.layers.29.mlp.fc.weight"], source["model.layers.29.mlp.gate_proj.weight"]
    )
    assert (smollm2_engine_dir / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (smollm2_engine_dir / "tokenizer_config.json").read_text()
    )
