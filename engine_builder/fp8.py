"""FP8 quantization at build time: the recipe (weights, scales and smoothing from calibration)
and the source that serves the quantized tensors to the writer.

Layout (TensorRT-LLM's, engine_builder/format.py): per linear an fp8 weight, a weight scale and
a static activation scale (one each per tensor); fused qkv shares both, and so do mlp.fc and
mlp.gate (one GEMM at run time reading one activation). Everything below keeps that layout and
costs nothing at run time. Per linear group, in this order:

1. SmoothQuant-style migration: for an input x and weight W, x / s and W * s give the same
   product; s is folded into what produces x: the preceding RMSNorm's weight for qkv and
   gate/up, the up projection's rows (mlp.gate) for the down projection (silu(gate) * up is
   linear in up). s_c = amax(x_c)^alpha / amax(W[:, c])^(1 - alpha), alpha in a grid or none,
   picked by output error with round-to-nearest weights at the absmax input scale.
2. GPTQ weights (engine_builder/gptq.py) on the smoothed problem, at the weight scale
   amax(W * s) / 448: each column's rounding error is moved onto the columns not yet rounded.
   Measured on SmolLM2 this is the largest gain: per-tensor E4M3 rounding of the weights alone
   costs +2.2% perplexity, +0.6% with GPTQ.
3. Searched activation scale: amax(x / s) * r / 448 with r from a grid, minimising the output
   error for the final weights (clipping rare outliers against pushing the bulk of the values
   into fp8's subnormals).

Output errors are || q(x / s, s_x) W_q^T - x W^T ||^2 with q the runtime's own quantization
(kiln.runtime.quant.fp8), summed over the calibration rows of largest |x| (attention-sink
tokens) plus a uniform sample of the rest weighted to stand for all of them: a uniform sample
alone misses the sink rows and picks scales that clip them (measured: worse than absmax).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.engine_builder.calibration import SiteStats
from kiln.engine_builder.format import INPUT_SCALE, KV_CACHE_SCALE, LAYER, WEIGHT_SCALE, ModelConfig
from kiln.engine_builder.gptq import gptq
from kiln.runtime.quant.fp8 import FP8_DTYPE, FP8_MAX, quantize_fp8

logger = logging.getLogger(__name__)

# group: (its source weight keys, its engine modules, the calibration site of its input)
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "qkv": (("q", "k", "v"), ("attention.qkv",), "qkv"),
    "dense": (("o",), ("attention.dense",), "dense"),
    "gate_up": (("gate", "up"), ("mlp.fc", "mlp.gate"), "gate_up"),
    "down": (("down",), ("mlp.proj",), "down"),
}
GROUP_OF_KEY = {key: group for group, (keys, _, _) in GROUPS.items() for key in keys}
GROUP_OF_MODULE = {module: group for group, (_, modules, _) in GROUPS.items() for module in modules}
# Where each group's smoothing is folded: (source key, along which dim it divides).
SMOOTH_FOLD = {"qkv": ("input_norm", 0), "gate_up": ("post_norm", 0), "down": ("up", 0)}


@dataclass(frozen=True)
class RecipeOptions:
    """How scales and weights are chosen. ``alphas`` empty = no smoothing; ``ratios`` = (1.0,)
    = absmax activation scales; ``gptq`` False = weights rounded to nearest."""

    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    ratios: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    gptq: bool = True
    kv_cache: bool = False

    @property
    def method(self) -> str:
        parts = ["GPTQ weights" if self.gptq else "round-to-nearest weights",
                 "SmoothQuant migration (alpha searched per linear)" if self.alphas else None,
                 "searched activation scales" if len(self.ratios) > 1 else "absmax activation scales"]
        return ", ".join(p for p in parts if p)


@dataclass
class LayerRecipe:
    """One layer's quantization: scales per group, smoothing divisors (CPU float32) and, when
    calibrated with GPTQ, the fp8 weights per source key (whole tensors, CPU)."""

    weight_scale: dict[str, float] = field(default_factory=dict)
    input_scale: dict[str, float] = field(default_factory=dict)
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: dict[str, float | None] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)
    kv_scale: float | None = None


@dataclass
class Fp8Recipe:
    """Every layer's recipe plus how it was made; ``describe`` is the manifest's record."""

    options: RecipeOptions
    layers: list[LayerRecipe] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        groups = {}
        for group in GROUPS:
            alphas = [lr.alpha.get(group) for lr in self.layers]
            errors = [lr.rel_error[group] for lr in self.layers if group in lr.rel_error]
            groups[group] = {
                "smoothed_layers": sum(a is not None for a in alphas),
                "mean_ratio": round(sum(lr.ratio.get(group, 1.0) for lr in self.layers) / max(len(self.layers), 1), 4),
                "max_rel_output_error": round(max(errors), 5) if errors else None,
            }
        return {"method": self.options.method, "alphas": list(self.options.alphas), "ratios": list(self.options.ratios),
                "groups": groups, "unquantized_layers": []}


# ----------------------------------------------------------------------------- the search


def fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x rounded through fp8 with dequantization scale ``scale`` (the runtime's arithmetic)."""
    return _Fp8Grid(scale, x.device)(x)


class _Fp8Grid:
    """Rounds values through fp8 at one scale; the scale tensors made once (GPTQ calls it per column)."""

    def __init__(self, scale: float, device: torch.device) -> None:
        self.scale = torch.tensor([scale], dtype=torch.float32, device=device)
        self.inv = 1.0 / self.scale

    def __call__(self, x: torch.Tensor, column: int | None = None) -> torch.Tensor:
        return quantize_fp8(x, self.inv).float() * self.scale


@dataclass
class _Fit:
    smooth: torch.Tensor | None
    alpha: float | None
    weight_scale: float
    weight: torch.Tensor  # dequantized (smoothed) weight
    input_scale: float = 0.0
    ratio: float = 1.0
    error: float = float("inf")


class _Scorer:
    """Output error of candidate quantizations of y = x @ w^T over the calibration rows: the
    largest rows exactly, the uniform sample weighted to stand for all the others."""

    def __init__(self, stats: SiteStats, w: torch.Tensor) -> None:
        self.parts = [(rows, weight, rows @ w.T) for rows, weight in
                      ((stats.top_rows, 1.0), (stats.samples, stats.sample_weight)) if len(rows)]
        self.norm = sum(weight * float(ref.pow(2).sum()) for _, weight, ref in self.parts) or 1.0

    def __call__(self, smooth: torch.Tensor | None, x_scale: float, w_q: torch.Tensor) -> float:
        err = 0.0
        for rows, weight, ref in self.parts:
            x = rows if smooth is None else rows / smooth
            err += weight * float((fake_quant(x, x_scale) @ w_q.T - ref).pow(2).sum())
        return err / self.norm


def fit_linear(stats: SiteStats, w: torch.Tensor, options: RecipeOptions, smoothable: bool) -> _Fit:
    """The smoothing (an alpha, or none), weights and activation scale for y = x @ w^T, chosen in
    that order: alpha scored with round-to-nearest weights at the absmax input scale, then the
    weights (GPTQ on the smoothed problem), then the input scale ratio for those weights."""
    score = _Scorer(stats, w)
    amax_x, amax_w = stats.absmax.clamp_min(1e-6), w.abs().amax(0).clamp_min(1e-6)
    candidates: list[tuple[float | None, torch.Tensor | None]] = [(None, None)]
    if smoothable:
        candidates += [(a, (amax_x.pow(a) / amax_w.pow(1 - a)).clamp_min(1e-5)) for a in options.alphas]
    best: _Fit | None = None
    for alpha, s in candidates:
        ws = w if s is None else w * s
        w_scale = float(ws.abs().max()) / FP8_MAX
        fit = _Fit(s, alpha, w_scale, fake_quant(ws, w_scale))
        fit.input_scale = float((amax_x if s is None else amax_x / s).max()) / FP8_MAX
        fit.error = score(s, fit.input_scale, fit.weight)
        if best is None or fit.error < best.error:
            best = fit
    assert best is not None
    if options.gptq and stats.gram is not None:
        s = best.smooth
        gram = stats.gram if s is None else stats.gram / (s.unsqueeze(1) * s.unsqueeze(0))
        best.weight = gptq(w if s is None else w * s, gram, _Fp8Grid(best.weight_scale, w.device))
        best.error = score(s, best.input_scale, best.weight)
    base = best.input_scale
    for ratio in options.ratios[1:]:
        err = score(best.smooth, base * ratio, best.weight)
        if err < best.error:
            best.input_scale, best.ratio, best.error = base * ratio, ratio, err
    return best


class Fp8Calibrator:
    """The ``run_layerwise`` visitor that builds an ``Fp8Recipe`` layer by layer.

    The down projection is fitted first: its smoothing divides the up projection's rows, which
    the gate/up group then quantizes."""

    def __init__(self, options: RecipeOptions) -> None:
        self.recipe = Fp8Recipe(options)

    def __call__(self, layer: int, w: dict[str, torch.Tensor], stats: dict[str, SiteStats]) -> None:
        opts, lr = self.recipe.options, LayerRecipe()
        up = w["up"]
        fit = self._record(lr, "down", fit_linear(stats["down"], w["down"], opts, smoothable=True), w)
        if fit.smooth is not None:
            up = up / fit.smooth[:, None]
        self._record(lr, "gate_up", fit_linear(stats["gate_up"], torch.cat([w["gate"], up]), opts, smoothable=True), w)
        self._record(lr, "qkv", fit_linear(stats["qkv"], torch.cat([w["q"], w["k"], w["v"]]), opts, smoothable=True), w)
        self._record(lr, "dense", fit_linear(stats["dense"], w["o"], opts, smoothable=False), w)
        if opts.kv_cache:  # one scale for K (after rotary) and V, as TensorRT-LLM stores it
            lr.kv_scale = max(stats["k"].amax, stats["v"].amax) / FP8_MAX
        assert len(self.recipe.layers) == layer, "layers are visited in order"
        self.recipe.layers.append(lr)

    def _record(self, lr: LayerRecipe, group: str, fit: _Fit, w: dict[str, torch.Tensor]) -> _Fit:
        lr.weight_scale[group], lr.input_scale[group] = fit.weight_scale, fit.input_scale
        lr.alpha[group], lr.ratio[group], lr.rel_error[group] = fit.alpha, fit.ratio, fit.error
        if fit.smooth is not None:
            lr.smooth[group] = fit.smooth.float().cpu()
        if self.recipe.options.gptq:  # GPTQ moved values: keep them (fp8, 1 byte per weight)
            inv = torch.tensor([1.0 / fit.weight_scale], dtype=torch.float32, device=fit.weight.device)
            keys = GROUPS[group][0]
            for key, part in zip(keys, fit.weight.split([w[k].shape[0] for k in keys])):
                lr.weights[key] = quantize_fp8(part, inv).cpu()
        return fit


def random_recipe(mc: ModelConfig, weight_amax: float, weight_std: float, kv_cache: bool) -> Fp8Recipe:
    """Plausible scales for a random-weight engine (no calibration): every weight is drawn from one
    pool of amax ``weight_amax``; activations follow from N(0, weight_std^2) weights and unit norm
    weights: normed inputs ~N(0, 1), projections ~N(0, sigma^2) with sigma = weight_std * sqrt(hidden)."""
    sigma = weight_std * mc.hidden_size ** 0.5
    amax = {"qkv": 6.0, "gate_up": 6.0, "dense": 6.0 * sigma, "down": 20.0 * sigma * sigma}
    recipe = Fp8Recipe(RecipeOptions(alphas=(), ratios=(1.0,), kv_cache=kv_cache))
    for _ in range(mc.num_hidden_layers):
        recipe.layers.append(LayerRecipe(
            weight_scale={g: weight_amax / FP8_MAX for g in GROUPS},
            input_scale={g: a / FP8_MAX for g, a in amax.items()},
            kv_scale=6.0 * sigma / FP8_MAX if kv_cache else None))
    return recipe


# ----------------------------------------------------------------------------- the quantized source


class Fp8Source:
    """A TensorSource serving the engine's FP8 tensors: linear weights smoothed and quantized to
    fp8 (source names), norms with the smoothing folded in, and every scale as a float32 (1,)
    tensor under its engine name (format.plan_rank's scale pieces). Other tensors pass through.

    Invariant: ``read(name, rows)`` equals ``read(name)[a:b]`` (every transform is per row or
    per column), so tensor-parallel slices of one tensor agree with the whole.
    """

    def __init__(self, source: Any, mc: ModelConfig, names: dict[str, str], recipe: Fp8Recipe) -> None:
        self.source, self.config, self.recipe = source, source.config, recipe
        self._roles = {names[key].format(l=layer): (layer, key) for layer in range(mc.num_hidden_layers)
                       for key in (*GROUP_OF_KEY, "input_norm", "post_norm")}

    def describe(self) -> dict[str, Any]:
        return self.source.describe()

    def shape(self, name: str) -> tuple[int, ...] | None:
        return (1,) if self._scale_of(name) is not None else self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if self._scale_of(name) is not None:
            return torch.float32
        role = self._roles.get(name)
        return FP8_DTYPE if role is not None and role[1] in GROUP_OF_KEY else self.source.dtype(name)

    def read_parts(self, name: str, rows: tuple[int, int] | None = None) -> list[torch.Tensor]:
        return [self.read(name, rows)]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        scale = self._scale_of(name)
        if scale is not None:
            return torch.tensor([scale], dtype=torch.float32)
        role = self._roles.get(name)
        if role is None:
            return self.source.read(name, rows)
        layer, key = role
        lr = self.recipe.layers[layer]
        if key in lr.weights:  # calibrated (GPTQ) fp8 weights
            return lr.weights[key][slice(*rows) if rows else slice(None)]
        t = self.source.read(name, rows).float()
        if key in ("input_norm", "post_norm"):
            smooth = lr.smooth.get("qkv" if key == "input_norm" else "gate_up")
            return t if smooth is None else t / smooth
        if key == "up" and "down" in lr.smooth:  # the down projection's smoothing, folded into up's rows
            t = t / lr.smooth["down"][slice(*rows) if rows else slice(None), None]
        group = GROUP_OF_KEY[key]
        if group in lr.smooth:
            t = t * lr.smooth[group]
        inv = 1.0 / torch.tensor([lr.weight_scale[group]], dtype=torch.float32)
        return quantize_fp8(t, inv)

    def _scale_of(self, name: str) -> float | None:
        """The value of a scale tensor named like the engine's, else None."""
        head = LAYER.split("{l}")[0]
        if not name.startswith(head) or not name.endswith("_scaling_factor"):
            return None
        layer_text, _, rest = name[len(head):].partition(".")
        lr = self.recipe.layers[int(layer_text)]
        if rest == KV_CACHE_SCALE:
            return lr.kv_scale
        module, _, kind = rest.rpartition(".")
        group = GROUP_OF_MODULE.get(module)
        if group is None or kind not in (WEIGHT_SCALE, INPUT_SCALE):
            return None
        return lr.weight_scale[group] if kind == WEIGHT_SCALE else lr.input_scale[group]
