"""CUDA graphs of decode-only steps: the transformer body replayed with one launch.

A decode step at batch 256 launches ~300 small kernels (9 per layer); launching them from
Python costs more than some of them take on the GPU. So at start the runner captures, for a
set of batch sizes, the forward from token ids to final-normed hidden states, and a
decode-only step (every scheduled request runs one token and is sampled) is padded up to the
next captured size and replayed. The lm_head GEMM and sampling stay eager on the real rows
only: they are a handful of launches, and keeping logits out of the graphs keeps the graphs'
memory small (a [256, vocab] fp32 output per captured size would cost gigabytes).

Graph safety: the graphs read the InputBatch's persistent device buffers (``static
inputs``), and the attention kernels size their grids from ``max_seq_len``, which is captured
as ``max_model_len`` (an upper bound: programs past a sequence's end exit at once). Mixed and
prefill steps run eagerly. Verify steps of speculative decoding (every row 1 + K tokens,
verify_inputs.py) get graphs of their own, in the same pool: their multi-token rows take the
attention's prefill kernel, whose grid depends only on the captured batch and max_query_len.

Memory: all graphs share one pool, captured from the largest size down, so the pool holds
about one largest-size activation set plus each graph's small output. It cannot be measured
before the KV cache exists (the graphs read the cache), so ``graph_memory_estimate`` is
added to the profiled peak when the KV cache is sized, and the measured pool is logged after
capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kiln.runtime.input_batch import ModelInputs

logger = logging.getLogger(__name__)

# Driver-side memory of one instantiated graph (not seen by torch's allocator); a generous
# allowance for ~300 kernel nodes.
_PER_GRAPH_DRIVER_BYTES = 4 << 20


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_batch_size (and max_batch_size itself):
    padding wastes at most 7 rows, and the 67 of the default 512 capture in a few seconds."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def graph_memory_estimate(activation_peak_bytes: int, sizes: list[int], hidden_size: int, itemsize: int) -> int:
    """Bytes to keep free for the graphs: the largest size's activations (the shared pool),
    every graph's [size, hidden] output, and a driver allowance per graph."""
    outputs = sum(sizes) * hidden_size * itemsize
    return activation_peak_bytes + outputs + len(sizes) * _PER_GRAPH_DRIVER_BYTES


class DecodeGraphs:
    """One captured ``forward(static_inputs(size))`` per batch size.

    Invariants: after ``capture``, ``replay(size)`` recomputes from whatever the static
    buffers hold and returns that size's output tensor (valid until the next replay of any
    size, since the graphs share a pool); the static buffers and the KV cache the graphs
    were captured on must stay alive and in place. With ``use_graphs=False`` (CPU tests) the
    same padded static inputs are run eagerly, so the padding logic is testable without CUDA.
    """

    def __init__(
        self,
        forward: Callable[[ModelInputs], torch.Tensor],
        static_inputs: Callable[[int], ModelInputs],
        sizes: list[int],
        use_graphs: bool = True,
        pool: object | None = None,
    ) -> None:
        self.forward = forward
        self.static_inputs = static_inputs
        self.sizes = sorted(sizes)
        self.use_graphs = use_graphs
        self.pool = pool  # the memory pool the graphs share (another set's, to share it too)
        self.inputs: dict[int, ModelInputs] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size (largest first, so smaller graphs reuse the pool's blocks)."""
        start = time.perf_counter()
        for size in reversed(self.sizes):
            self.inputs[size] = self.static_inputs(size)
        if not self.use_graphs:
            return
        device = self.inputs[self.sizes[0]].input_ids.device
        torch.cuda.synchronize(device)
        free_before = torch.cuda.mem_get_info(device)[0]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        pool = self.pool
        for size in reversed(self.sizes):
            inputs = self.inputs[size]
            self.forward(inputs)  # warm-up: Triton compiles and cuBLAS picks kernels outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.forward(inputs)
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-ups' blocks, not the pool
        used = free_before - torch.cuda.mem_get_info(device)[0]
        query_len = self.inputs[self.sizes[0]].graph_query_len
        logger.info("captured %d CUDA graphs of %d-token rows (batch sizes %d..%d) in %.1f s, using %.3f GiB",
                    len(self.graphs), query_len, self.sizes[0], self.sizes[-1], time.perf_counter() - start,
                    used / 2**30)

    def release(self) -> None:
        """Drop the graphs, their outputs and static views (the shared pool is freed once
        nothing else holds them); the object is unusable afterwards."""
        self.graphs.clear()
        self.outputs.clear()
        self.inputs.clear()

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of ``size`` on the current contents of the static buffers."""
        if not self.use_graphs:
            return self.forward(self.inputs[size])
        self.graphs[size].replay()
        return self.outputs[size]
