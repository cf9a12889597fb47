"""Kiln's model against transformers on the same tiny random weights (CPU, float32)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_model_helpers import ARCHS, tiny_engine

import torch.nn.functional as F

from kiln.runtime.attention import AttentionMetadata, KernelSet
from kiln.runtime.layers import UnsupportedRopeScalingError, build_cos_sin_cache, fused_add_rms_norm, fused_linear
from kiln.runtime.model import LlamaFamilyModel, UnsupportedModelError

BLOCK_SIZE = 4
NUM_BLOCKS = 32


def make_batch(token_rows: list[list[int]], spans: list[tuple[int, int]], tables: list[list[int]]):
    """Flattened inputs for sequences running tokens [start, end) of their rows."""
    ids, pos, slots = [], [], []
    for row, (start, end), table in zip(token_rows, spans, tables):
        for p in range(start, end):
            ids.append(row[p])
            pos.append(p)
            slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
    counts = torch.tensor([e - s for s, e in spans])
    width = max(len(t) for t in tables)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor([e for _, e in spans], dtype=torch.int32),
        query_start_loc=torch.cat((torch.zeros(1), counts.cumsum(0))).int(),
        max_query_len=int(counts.max()),
        max_seq_len=max(e for _, e in spans),
    )
    return torch.tensor(ids), torch.tensor(pos), attn


def hf_logits(model: torch.nn.Module, row: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([row])).logits[0].float()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_mixed_chunked_batch_matches_transformers(kind: str, tmp_path: Path) -> None:
    """Step 1: A's first chunk + B's whole prompt + C's one-token prompt; step 2: A's second
    chunk (on cached context) + B and C decode. Every position's logits match HF."""
    hf, engine = tiny_engine(tmp_path, kind)
    model = LlamaFamilyModel(engine.model_config, engine.tensors, torch.device("cpu"), torch.float32)
    mc = engine.model_config
    kv = [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, mc.num_kv_heads_per_rank, mc.head_size)
          for _ in range(mc.num_hidden_layers)]
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, mc.vocab_size, (n,), generator=gen).tolist() for n in (13, 8, 2)]
    tables = [[9, 2, 17, 5], [30, 0], [11]]  # shuffled, non-contiguous blocks

    steps = [[(0, 5), (0, 7), (0, 1)], [(5, 13), (7, 8), (1, 2)]]
    for spans in steps:
        ids, pos, attn = make_batch(rows, spans, tables)
        logits = model(ids, pos, kv, attn, torch.arange(len(ids)))
        assert logits.shape == (len(ids), mc.vocab_size) and logits.dtype == torch.float32
        expected = torch.cat([hf_logits(hf, row)[s:e] for row, (s, e) in zip(rows, spans)])
        assert_logits_close(logits, expected)


def test_logits_indices_select_rows(tmp_path: Path) -> None:
    hf, engine = tiny_engine(tmp_path, "llama")
    mc = engine.model_config
    model = LlamaFamilyModel(mc, engine.tensors, torch.device("cpu"), torch.float32)
    kv = [torch.zeros(2, 8, BLOCK_SIZE, mc.num_kv_heads_per_rank, mc.head_size) for _ in range(2)]
    rows = [[3, 1, 4, 1, 5], [9, 2, 6]]
    ids, pos, attn = make_batch(rows, [(0, 5), (0, 3)], [[0, 1], [2]])
    logits = model(ids, pos, kv, attn, torch.tensor([4, 7]))
    expected = torch.stack([hf_logits(hf, rows[0])[-1], hf_logits(hf, rows[1])[-1]])
    assert_logits_close(logits, expected)


def test_padded_lm_head_rows_are_cut(tmp_path: Path) -> None:
    """lm_head padded for tp has extra zero rows; logits keep the real vocabulary only."""
    hf, engine = tiny_engine(tmp_path, "qwen2")
    mc = engine.model_config
    engine.tensors["lm_head.weight"] = torch.cat((engine.tensors["lm_head.weight"], torch.zeros(3, mc.hidden_size)))
    model = LlamaFamilyModel(mc, engine.tensors, torch.device("cpu"), torch.float32)
    kv = [torch.zeros(2, 4, BLOCK_SIZE, mc.num_kv_heads_per_rank, mc.head_size) for _ in range(2)]
    ids, pos, attn = make_batch([[5, 6, 7]], [(0, 3)], [[1]])
    logits = model(ids, pos, kv, attn, torch.tensor([2]))
    assert logits.shape == (1, mc.vocab_size)
    assert_logits_close(logits[0], hf_logits(hf, [5, 6, 7])[-1])


def test_unsupported_architecture_and_scaling_are_named(tmp_path: Path) -> None:
    _, engine = tiny_engine(tmp_path, "llama")
    bad = dataclasses.replace(engine.model_config, architecture="GPT2LMHeadModel")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        LlamaFamilyModel(bad, engine.tensors, torch.device("cpu"), torch.float32)
    with pytest.raises(UnsupportedRopeScalingError, match="yarn"):
        build_cos_sin_cache(8, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_small_batch_fused_layers_match_transformers(kind: str, tmp_path: Path) -> None:
    """Steps of at most small_batch_rows tokens take the fused path (norm, SiLU and residual
    add inside the linears, lm_head through the same op; the torch reference of the Triton
    gemv here): a 12-token prefill runs unfused, then two decode steps of 3 rows run fused,
    against HF logits."""
    hf, engine = tiny_engine(tmp_path, kind)
    mc = engine.model_config
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return fused_linear(*args, **kwargs)

    ops = KernelSet(small_linear=spy, small_batch_rows=3, small_linear_max_rows=3)
    model = LlamaFamilyModel(mc, engine.tensors, torch.device("cpu"), torch.float32, ops)
    kv = [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, mc.num_kv_heads_per_rank, mc.head_size)
          for _ in range(mc.num_hidden_layers)]
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, mc.vocab_size, (n,), generator=gen).tolist() for n in (6, 8, 4)]
    tables = [[3, 7], [12, 1], [20]]
    for spans, fused in (([(0, 4), (0, 6), (0, 2)], False), ([(4, 5), (6, 7), (2, 3)], True),
                         ([(5, 6), (7, 8), (3, 4)], True)):
        calls.clear()
        ids, pos, attn = make_batch(rows, spans, tables)
        logits = model(ids, pos, kv, attn, torch.arange(len(ids)))
        assert len(calls) == (4 * mc.num_hidden_layers + 1 if fused else 0)  # + lm_head
        expected = torch.cat([hf_logits(hf, row)[s:e] for row, (s, e) in zip(rows, spans)])
        assert_logits_close(logits, expected)


def test_fused_linear_reference_rounds_like_the_unfused_chain() -> None:
    gen = torch.Generator().manual_seed(3)
    x, h = torch.randn(3, 64, generator=gen).bfloat16(), torch.randn(3, 32, generator=gen).bfloat16()
    w, g = torch.randn(32, 64, generator=gen).bfloat16(), torch.rand(64, generator=gen).bfloat16()
    normed, _ = fused_add_rms_norm(x, None, g, 1e-5)
    torch.testing.assert_close(fused_linear(x, w, norm_weight=g, eps=1e-5), F.linear(normed, w), rtol=0.02, atol=0.05)
    gu = torch.randn(3, 128, generator=gen).bfloat16()
    gate, up = gu.float().chunk(2, dim=-1)  # the Triton silu_and_mul works in fp32
    unfused = (F.linear((F.silu(gate) * up).bfloat16(), w).float() + h.float()).bfloat16()
    assert torch.equal(fused_linear(gu, w, silu_mul=True, residual=h), unfused)
