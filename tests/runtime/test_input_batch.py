"""The static views CUDA graphs are captured on (decode and verify), checked on CPU: their
shapes, that they alias the persistent staging buffers, and what they hold once a real step
is staged (the graphs replay on exactly those contents)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.runtime.input_batch import InputBatch, ModelInputs, ScheduledRows
from kiln.scheduler.sampling_params import SamplingParams

BS, MAX_LEN, K = 4, 32, 2  # block size, max_model_len, drafts per verify row
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
# request id -> (tokens, block ids): every token but the last is computed (a decoding row)
REQUESTS = {"a": ([5, 6, 7, 8, 9], [3, 9, 1]), "b": ([40, 41], [12, 2]), "c": ([1, 2, 3, 4, 5, 6, 7], [0, 7, 5])}


def static_inputs(batch: InputBatch, size: int, query_len: int) -> ModelInputs:
    return batch.static_inputs(size, query_len)


def make_batch() -> InputBatch:
    batch = InputBatch(max_batch_size=4, max_model_len=MAX_LEN, max_num_tokens=32, block_size=BS, num_blocks=16,
                       vocab_size=100, device=torch.device("cpu"), num_speculative_tokens=K)
    for rid, (tokens, blocks) in REQUESTS.items():
        batch.add(rid, tokens, len(tokens), GREEDY, blocks, len(tokens) - 1)
    return batch


def scheduled(batch: InputBatch, counts: list[int]) -> ScheduledRows:
    order = list(REQUESTS)
    rows = np.array([batch.requests[r].row for r in order], dtype=np.int64)
    return ScheduledRows(order, rows, np.array(counts, dtype=np.int64))


def aliases(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """``view`` starts where ``buffer`` does, in the same storage."""
    return view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() and \
        view.data_ptr() == buffer.data_ptr()


@pytest.mark.parametrize("query_len", [1, 1 + K])
def test_static_views_shapes_padding_and_aliasing(query_len: int) -> None:
    batch = make_batch()
    batch.prepare(scheduled(batch, [1, 1, 1]))  # real values in the buffers first: the views must reset them
    staging, size = batch.staging, 4
    num = size * query_len
    inputs = static_inputs(batch, size, query_len)
    attn = inputs.attn
    assert (inputs.num_reqs, inputs.graph_batch_size, inputs.graph_query_len) == (size, size, query_len)
    assert inputs.logits_indices is None and inputs.sample_rows is None
    assert (attn.max_query_len, attn.max_seq_len) == (query_len, MAX_LEN)  # grids sized for any length
    assert inputs.input_ids.tolist() == [0] * num
    assert inputs.positions.tolist() == list(range(query_len)) * size
    assert attn.slot_mapping.tolist() == [-1] * num  # padding writes no KV
    assert attn.seq_lens.tolist() == [query_len] * size
    assert attn.query_start_loc.tolist() == list(range(0, num + 1, query_len))
    assert attn.block_tables.shape == (size, batch.max_blocks_per_seq) and not attn.block_tables.any()
    for name, view in [("input_ids", inputs.input_ids), ("positions", inputs.positions),
                       ("slot_mapping", attn.slot_mapping), ("seq_lens", attn.seq_lens)]:
        assert aliases(view, staging.dev[name]), name
    assert aliases(attn.block_tables, staging.block_tables)
    qsl = staging.decode_qsl if query_len == 1 else batch.verify_qsl
    assert aliases(attn.query_start_loc, qsl)


def expected_rows(batch: InputBatch, query_len: int, drafts: dict[str, list[int]]) -> list[tuple]:
    """(ids, positions, slots, seq_len) of each real row, from the test's own request table."""
    rows = []
    for rid, (tokens, blocks) in REQUESTS.items():
        start = len(tokens) - 1
        real = [tokens[-1]] + drafts.get(rid, [])
        pos = [start + i for i in range(query_len)]
        ids = real + [0] * (query_len - len(real))
        slots = [blocks[p // BS] * BS + p % BS if i < len(real) else -1 for i, p in enumerate(pos)]
        rows.append((ids, pos, slots, start + query_len))
    return rows


def test_decode_step_lands_in_the_static_views() -> None:
    batch = make_batch()
    static = static_inputs(batch, 4, 1)
    inputs, _, _ = batch.prepare(scheduled(batch, [1, 1, 1]), graph_sizes=[1, 2, 4])
    assert inputs.graph_batch_size == 4 and inputs.num_reqs == 3
    assert aliases(inputs.input_ids, static.input_ids) and aliases(inputs.attn.block_tables, static.attn.block_tables)
    rows = expected_rows(batch, 1, {})
    assert static.input_ids.tolist() == [r[0][0] for r in rows] + [0]
    assert static.positions.tolist() == [r[1][0] for r in rows] + [0]
    assert static.attn.slot_mapping.tolist() == [r[2][0] for r in rows] + [-1]
    assert static.attn.seq_lens.tolist() == [r[3] for r in rows] + [1]
    width = 2  # cdiv(longest seq_len 7, 4): the columns the step staged
    assert static.attn.block_tables[:3, :width].tolist() == [b[:width] for _, b in REQUESTS.values()]
    assert static.attn.block_tables[3, :width].tolist() == [0, 0]


def test_verify_step_lands_in_the_static_views() -> None:
    batch = make_batch()
    static = static_inputs(batch, 4, 1 + K)
    drafts = {"a": [11, 12], "c": [13]}  # b carries none: its row is padded after its one token
    assert not batch._apply_drafts(drafts)
    counts = [1 + len(drafts.get(r, [])) for r in REQUESTS]
    inputs, sampling, _ = batch.prepare(scheduled(batch, counts), graph_sizes=[1, 2, 4], verify_sizes=[1, 2, 4])
    assert inputs.graph_batch_size == 4 and inputs.graph_query_len == 1 + K and sampling.verify is not None
    assert aliases(inputs.input_ids, static.input_ids) and aliases(inputs.attn.block_tables, static.attn.block_tables)
    q = 1 + K
    rows = expected_rows(batch, q, drafts)
    pad = ([0] * q, list(range(q)), [-1] * q, q)  # the fourth row: padding
    assert static.input_ids.tolist() == sum((r[0] for r in rows), []) + pad[0]
    assert static.positions.tolist() == sum((r[1] for r in rows), []) + pad[1]
    assert static.attn.slot_mapping.tolist() == sum((r[2] for r in rows), []) + pad[2]
    assert static.attn.seq_lens.tolist() == [r[3] for r in rows] + [pad[3]]
    width = 3  # cdiv(longest seq_len 6 + 3, 4): the columns the step staged
    assert static.attn.block_tables[:3, :width].tolist() == [(b + [0])[:width] for _, b in REQUESTS.values()]
    assert static.attn.block_tables[3, :width].tolist() == [0] * width


def test_mixed_step_lists_its_prefill_rows() -> None:
    """A step mixing prompt chunks with decode rows names the chunk rows (the prefill kernel
    launches over those only); a step of chunks alone, or of decode rows alone, names none."""
    batch = InputBatch(max_batch_size=4, max_model_len=MAX_LEN, max_num_tokens=32, block_size=BS, num_blocks=16,
                       vocab_size=100, device=torch.device("cpu"))
    batch.add("d1", [5, 6, 7], 3, GREEDY, [3], 2)          # decoding: one token left
    batch.add("p1", [1, 2, 3, 4, 5, 6], 6, GREEDY, [0, 7], 0)  # a prompt: six tokens to prefill
    batch.add("d2", [9, 8], 2, GREEDY, [12], 1)
    batch.add("p2", [4, 4, 4], 3, GREEDY, [5], 1)          # a chunk continuing a prompt

    def prefill_rows(order: list[str], counts: list[int]) -> list[int] | None:
        rows = np.array([batch.requests[r].row for r in order], dtype=np.int64)
        inputs, _, _ = batch.prepare(ScheduledRows(order, rows, np.array(counts, dtype=np.int64)))
        rows_t = inputs.attn.prefill_rows
        assert inputs.attn.max_query_len == max(counts)
        return None if rows_t is None else rows_t.tolist()

    assert prefill_rows(["d1", "p1", "d2", "p2"], [1, 6, 1, 2]) == [1, 3]  # indices into the step's rows
    assert prefill_rows(["p2", "d1", "p1"], [2, 1, 3]) == [0, 2]
    assert prefill_rows(["p1", "p2"], [6, 2]) is None  # every row is a chunk: the full launch is the same
    assert prefill_rows(["d1", "d2"], [1, 1]) is None  # decode only

