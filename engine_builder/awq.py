"""Activation-aware weight quantization (AWQ, Lin et al., arXiv 2306.00978), Kiln's own search.

For each linear (or linears sharing one input: q/k/v, gate/up) and calibration activations X:

  * scale search: per-input-channel scales s = mean|x|^alpha (normalized by sqrt(max * min)),
    alpha on a grid in [0, 1); the linear is quantized as Q(W diag(s)) and run on X diag(1/s),
    and the alpha with the smallest output error ||X W^T - X diag(1/s) Q(W diag(s))^T||^2 wins.
    alpha = 0 is s = 1, plain round-to-nearest, so the search never does worse than RTN on X.
    The builder folds 1/s into the op that makes X (an RMSNorm weight, up's rows, v's rows), so
    the engine computes exactly X diag(1/s) without a runtime multiply.
  * clipping search (optional): per output row and group, the range is shrunk by a ratio from
    a grid in [1 - max_shrink, 1] to minimise that group's share of the output error.

Everything runs in float32 on the device the tensors are on; the error is measured on a fixed
sample of calibration rows, the channel means on all calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.engine_builder.int4 import fake_quantize

_CHUNK = 1 << 26  # elements of one [groups, rows, samples] error block in the clipping search


@dataclass(frozen=True)
class AwqOptions:
    """The search grid and the quantization it searches for."""

    group_size: int = 128
    zero_point: bool = True
    dtype: torch.dtype = torch.bfloat16  # the model dtype the scales and zero points are stored in
    grid: int = 20  # alpha in {0, 1/grid, ..., (grid - 1)/grid}
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_samples: int = 512  # calibration rows the clipping search scores (a subset of the sample)

    def clip_ratios(self) -> torch.Tensor:
        """The clipping grid, index 0 = no clipping (ratio 1)."""
        return 1 - self.clip_max_shrink * torch.arange(self.clip_grid) / self.clip_grid


@dataclass
class ScaleSearch:
    """The chosen scales [K] and the errors of the choice and of plain RTN (alpha = 0)."""

    scales: torch.Tensor
    alpha: float
    error: float
    rtn_error: float


def awq_scale_candidates(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, kept away from 0 and normalized so that max(s) * min(s) = 1."""
    s = mean_abs.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    """Mean squared difference of x @ w^T and x @ w_q^T."""
    return float((x @ (w - w_q).t()).pow(2).mean())


def search_scales(x: torch.Tensor, mean_abs: torch.Tensor, w: torch.Tensor, options: AwqOptions,
                  tie: torch.Tensor | None = None) -> ScaleSearch:
    """AWQ's scale search for ``w`` [N, K] on input rows ``x`` [R, K] with per-channel mean |x|
    ``mean_abs`` [K]. ``tie`` (an int tensor [K], optional) forces channels with equal ids to
    share one scale (their mean is averaged first): v's rows serve several query heads under GQA,
    so attention.dense's scales must repeat per KV group to fold into v."""
    x, w = x.float(), w.float()
    if tie is not None:
        mean_abs = _tied_mean(mean_abs.float(), tie)
    best: ScaleSearch | None = None
    for step in range(options.grid):
        alpha = step / options.grid
        s = awq_scale_candidates(mean_abs, alpha)
        w_q = fake_quantize(w * s, options.group_size, options.zero_point, options.dtype) / s
        err = output_error(x, w, w_q)
        if best is None:
            best = ScaleSearch(s, alpha, err, err)  # alpha = 0: plain RTN
        elif err < best.error:
            best = ScaleSearch(s, alpha, err, best.rtn_error)
    assert best is not None
    return best


def _tied_mean(values: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    ids = tie.to(values.device).long()
    sums = torch.zeros(int(ids.max()) + 1, dtype=values.dtype, device=values.device).index_add_(0, ids, values)
    counts = torch.bincount(ids).to(values.dtype)
    return (sums / counts)[ids]


def search_clip(x: torch.Tensor, w: torch.Tensor, options: AwqOptions) -> torch.Tensor:
    """uint8 [N, K/g]: per output row and group, the index into ``options.clip_ratios()`` whose
    clipped quantization gives the smallest squared output error of that group's part of the
    product (x [R, K] the inputs the quantized w [N, K] will see, i.e. already divided by s)."""
    n, k = w.shape
    g = options.group_size
    x = x.float()[: options.clip_samples]
    ratios = options.clip_ratios()
    xg = x.reshape(x.shape[0], k // g, g).transpose(0, 1)  # [G, R, g]
    best_err = torch.full((n, k // g), float("inf"), device=w.device)
    best = torch.zeros((n, k // g), dtype=torch.uint8, device=w.device)
    rows = max(1, _CHUNK // max(1, (k // g) * x.shape[0]))
    for index, ratio in enumerate(ratios.tolist()):
        clip = torch.full((n, k // g), ratio, device=w.device)
        delta = (w.float() - fake_quantize(w, g, options.zero_point, options.dtype, clip)).reshape(n, k // g, g)
        err = torch.cat([_group_errors(xg, delta[a:a + rows]) for a in range(0, n, rows)])
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = index
    return best


def _group_errors(xg: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """[n, G] sum over rows r of (x_g[r] . delta[n, g])^2 for xg [G, R, g], delta [n, G, g]."""
    return torch.bmm(xg, delta.permute(1, 2, 0)).pow(2).sum(1).t()


def clip_for(index: torch.Tensor | None, options: AwqOptions) -> torch.Tensor | None:
    """The clipping ratios [N, K/g] of ``search_clip``'s indices (None stays None)."""
    if index is None:
        return None
    return options.clip_ratios().to(index.device)[index.long()]
