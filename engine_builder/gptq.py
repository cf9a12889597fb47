"""GPTQ (Frantar et al., arXiv 2210.17323): quantize a weight column by column, moving each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's inputs, so that x @ Q^T stays close to x @ W^T on the calibration inputs.

Any element-wise quantizer with its scales fixed beforehand fits (per-tensor FP8 here; a
group-wise INT4 quantizer passes its group's scales through the column index): the result
keeps the engine's layout and costs nothing at run time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ColumnQuantizer = Callable[[torch.Tensor, int], torch.Tensor]
"""(values of column j of W [N], j) -> those values rounded to the quantization grid (dequantized)."""


def gptq(weight: torch.Tensor, gram: torch.Tensor, quantize: ColumnQuantizer, *, block: int = 128,
         damp: float = 0.01) -> torch.Tensor:
    """The GPTQ-rounded weight [N, C] (dequantized values, float32) for y = x @ weight^T.

    ``gram`` = sum of x^T x over the calibration rows [C, C]. Columns go in order of decreasing
    input energy (the paper's act-order); ``damp`` * mean(diag) is added to the diagonal for a
    stable Cholesky factorisation; inputs that were always zero keep their (rounded) weights.
    """
    w = weight.detach().float().clone()
    h = gram.detach().float().clone()
    columns = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(columns, device=h.device)
    # Upper Cholesky factor of H^-1: its rows give each column's error propagation.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    original_column = order.tolist()
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        w_block, errors, hinv_block = w[:, start:stop].clone(), torch.empty_like(w[:, start:stop]), hinv[start:stop, start:stop]
        for i in range(stop - start):
            q = quantize(w_block[:, i], original_column[start + i])
            out[:, start + i] = q
            err = (w_block[:, i] - q) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return out[:, torch.argsort(order)]
