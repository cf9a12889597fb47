"""The real SmolLM2 engine (builder -> load_engine) against transformers (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.engine_builder.format import load_engine
from kiln.runtime.attention import AttentionMetadata
from kiln.runtime.model import LlamaFamilyModel

BLOCK_SIZE = 16


def prompt_logits(model: LlamaFamilyModel, mc, prompt: list[int]) -> torch.Tensor:
    """Logits of every prompt position, one sequence in contiguous blocks."""
    n = len(prompt)
    attn = AttentionMetadata.prompts([n], BLOCK_SIZE)
    num_blocks = attn.block_tables.shape[1]
    kv = [torch.zeros(2, num_blocks, BLOCK_SIZE, mc.num_kv_heads_per_rank, mc.head_size, dtype=model.dtype)
          for _ in range(mc.num_hidden_layers)]
    return model(torch.tensor(prompt), torch.arange(n), kv, attn, torch.arange(n))


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.slow
def test_smollm2_first_step_logits_match_transformers(smollm2_hf_dir, smollm2_engine_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = load_engine(smollm2_engine_dir)
    mc = engine.model_config
    model = LlamaFamilyModel(mc, engine.tensors, torch.device("cpu"), torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    prompt = tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    actual = prompt_logits(model, mc, prompt)
    assert_logits_close(actual, expected, rel=2e-4)
    assert actual[-1].argmax() == expected[-1].argmax()
