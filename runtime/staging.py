"""Pinned host staging of a step's input tensors: one host-to-device copy per step."""

from __future__ import annotations

import numpy as np
import torch

from kiln.scheduler.block_manager import cdiv


class Staging:
    """One pinned host byte buffer and one persistent device byte buffer, carved into a
    typed region per input tensor at fixed offsets, so a step is ONE host-to-device copy.

    Invariants: ``dev[name]`` never moves (CUDA graphs captured on its views stay valid);
    staged values reach the device only at ``flush``, which copies the byte prefix up to
    the highest staged end (the small regions come first, block tables last). Block tables
    are staged compactly ([B, max_blocks]) and, for graphs, scattered into the full-width
    ``block_tables`` by one device copy.
    """

    def __init__(self, max_tokens: int, max_reqs: int, max_blocks_per_seq: int, device: torch.device,
                 max_logits: int | None = None, max_verify: int = 0) -> None:
        # max_logits: logits rows of a step (one per request, 1 + K per verifying request);
        # max_verify: the verify step's packed drafts (runtime/verify.py VerifyBatch.pack).
        regions = [("seq_lens", torch.int32, max_reqs), ("query_start_loc", torch.int32, max_reqs + 1),
                   ("prefill_rows", torch.int32, max_reqs),
                   ("verify", torch.int64, max_verify),
                   ("logits_indices", torch.int64, max_logits or max_reqs), ("sample_rows", torch.int64, max_reqs),
                   ("fill_index", torch.int64, max_reqs), ("fill_rows", torch.int64, max_reqs),
                   ("input_ids", torch.int64, max_tokens),
                   ("positions", torch.int64, max_tokens), ("slot_mapping", torch.int64, max_tokens),
                   ("block_tables", torch.int32, max_reqs * max_blocks_per_seq)]
        self.offset: dict[str, int] = {}
        total = 0
        for name, dtype, count in regions:
            self.offset[name] = total
            total += cdiv(count * dtype.itemsize, 256) * 256  # 256-byte aligned regions
        self.host_bytes = torch.zeros(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.dev_bytes = torch.zeros(total, dtype=torch.uint8, device=device)
        self.on_cpu = device.type == "cpu"
        self.host_np_bytes = self.host_bytes.numpy()
        self.dev_np = self.dev_bytes.numpy() if self.on_cpu else None
        self.host_np: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        self.itemsize: dict[str, int] = {}
        for name, dtype, count in regions:
            lo, hi = self.offset[name], self.offset[name] + count * dtype.itemsize
            self.host_np[name] = self.host_bytes[lo:hi].view(dtype).numpy()
            self.dev[name] = self.dev_bytes[lo:hi].view(dtype)
            self.itemsize[name] = dtype.itemsize
        self.end = 0
        # Recorded after each host-to-device copy; the host waits on it before restaging.
        self.copy_done = torch.cuda.Event() if device.type == "cuda" else None
        self.copy_pending = False
        self.block_tables = torch.zeros((max_reqs, max_blocks_per_seq), dtype=torch.int32, device=device)
        # Decode steps (one token per request) always have query_start_loc = arange.
        self.decode_qsl = torch.arange(max_reqs + 1, dtype=torch.int32, device=device)

    def stage(self, name: str, values: np.ndarray) -> torch.Tensor:
        """Write values into the host region; returns the device view they land in at flush."""
        if self.copy_pending:
            # A step that sampled nothing never synced: its copy may still read the host bytes.
            self.copy_done.synchronize()
            self.copy_pending = False
        n = values.size
        self.host_np[name][:n] = values.reshape(-1)
        self.end = max(self.end, self.offset[name] + n * self.itemsize[name])
        return self.dev[name][:n]

    def flush(self) -> None:
        if not self.end:
            return
        if self.on_cpu:  # numpy: torch's CPU byte copy is orders of magnitude slower
            self.dev_np[: self.end] = self.host_np_bytes[: self.end]
        else:
            self.dev_bytes[: self.end].copy_(self.host_bytes[: self.end], non_blocking=True)
            self.copy_done.record()
            self.copy_pending = True
        self.end = 0

    def stage_block_table(self, table: np.ndarray) -> torch.Tensor:
        return self.stage("block_tables", table).view(table.shape)

    def scatter_block_table(self, compact: torch.Tensor) -> torch.Tensor:
        """After flush: the compact table copied into the full-width one (graph layout)."""
        rows, cols = compact.shape
        self.block_tables[:rows, :cols].copy_(compact)
        return self.block_tables[:rows]
