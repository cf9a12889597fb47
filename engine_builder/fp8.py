"""FP8 quantization at build time: the recipe (scales and smoothing from calibration) and the
source that serves the quantized tensors to the writer.

Layout (TensorRT-LLM's, engine_builder/format.py): per linear an fp8 weight, a weight scale and
a static activation scale (one each per tensor); fused qkv shares both, and so do mlp.fc and
mlp.gate (one GEMM at run time reading one activation). Everything below keeps that layout and
costs nothing at run time:

* SmoothQuant-style migration: for an input x and weight W, x / s and W * s give the same
  product; s is folded into what produces x: the preceding RMSNorm's weight for qkv and gate/up,
  the up projection's rows (mlp.gate) for the down projection (silu(gate) * up is linear in up).
  s_c = amax(x_c)^alpha / amax(W[:, c])^(1 - alpha), alpha searched per linear (or no migration).
* Searched activation scales: the static input scale is amax(x) * r / 448 with r picked from a
  grid to minimise the linear's output error on sampled calibration rows (clipping a rare
  outlier can cost less than pushing the bulk of the values into fp8's subnormals).
* Weight scales are amax / 448 of the (smoothed) weight; q, k, v (and gate, up) are quantized to
  the group's one scale.

The error of a candidate is || q(x / s, s_x) q(W * s, s_w)^T - x W^T ||^2 on the sample rows,
with q the runtime's own quantization (kiln.runtime.quant.fp8).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.engine_builder.calibration import SiteStats
from kiln.engine_builder.format import INPUT_SCALE, KV_CACHE_SCALE, LAYER, WEIGHT_SCALE, ModelConfig
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
    """How scales are chosen. ``alphas`` empty = no smoothing; ``ratios`` = (1.0,) = absmax."""

    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    ratios: tuple[float, ...] = (1.0, 0.85, 0.7, 0.55, 0.4, 0.3, 0.2, 0.1)
    kv_cache: bool = False

    @property
    def method(self) -> str:
        parts = ["smoothquant (alpha searched)" if self.alphas else None,
                 "searched activation scales" if len(self.ratios) > 1 else "absmax activation scales"]
        return ", ".join(p for p in parts if p)


@dataclass
class LayerRecipe:
    """One layer's quantization: scales per group and the smoothing divisors (CPU float32)."""

    weight_scale: dict[str, float] = field(default_factory=dict)
    input_scale: dict[str, float] = field(default_factory=dict)
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
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
    s = torch.tensor([scale], dtype=torch.float32, device=x.device)
    return quantize_fp8(x, 1.0 / s).float() * s


@dataclass
class _Fit:
    smooth: torch.Tensor | None
    alpha: float | None
    weight_scale: float
    input_scale: float
    ratio: float
    error: float


def _candidate_error(x: torch.Tensor, ref: torch.Tensor, x_scale: float, w_q: torch.Tensor) -> float:
    return float((fake_quant(x, x_scale) @ w_q.T - ref).pow(2).sum())


def fit_linear(stats: SiteStats, w: torch.Tensor, options: RecipeOptions, smoothable: bool) -> _Fit:
    """The best smoothing (alpha, or none) and activation scale for y = x @ w^T.

    Alpha is chosen at the absmax activation scale, then the scale ratio for that alpha: two
    short searches instead of their product (measured within noise of the full grid)."""
    x, amax_x = stats.samples, stats.absmax.clamp_min(1e-6)
    ref = x @ w.T
    norm = float(ref.pow(2).sum()) or 1.0
    amax_w = w.abs().amax(0).clamp_min(1e-6)
    candidates: list[tuple[float | None, torch.Tensor | None]] = [(None, None)]
    if smoothable:
        candidates += [(a, (amax_x.pow(a) / amax_w.pow(1 - a)).clamp_min(1e-5)) for a in options.alphas]
    best: _Fit | None = None
    for alpha, s in candidates:
        xs, ws = (x, w) if s is None else (x / s, w * s)
        w_scale = float(ws.abs().max()) / FP8_MAX
        w_q = fake_quant(ws, w_scale)
        x_amax = float((amax_x if s is None else amax_x / s).max())
        err = _candidate_error(xs, ref, x_amax / FP8_MAX, w_q)
        if best is None or err < best.error:
            best = _Fit(s, alpha, w_scale, x_amax / FP8_MAX, 1.0, err)
    assert best is not None
    xs = x if best.smooth is None else x / best.smooth
    w_q = fake_quant(w if best.smooth is None else w * best.smooth, best.weight_scale)
    base = best.input_scale
    for ratio in options.ratios[1:]:
        err = _candidate_error(xs, ref, base * ratio, w_q)
        if err < best.error:
            best.input_scale, best.ratio, best.error = base * ratio, ratio, err
    best.error /= norm
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
        fit = self._record(lr, "down", fit_linear(stats["down"], w["down"], opts, smoothable=True))
        if fit.smooth is not None:
            up = up / fit.smooth[:, None]
        self._record(lr, "gate_up", fit_linear(stats["gate_up"], torch.cat([w["gate"], up]), opts, smoothable=True))
        self._record(lr, "qkv", fit_linear(stats["qkv"], torch.cat([w["q"], w["k"], w["v"]]), opts, smoothable=True))
        self._record(lr, "dense", fit_linear(stats["dense"], w["o"], opts, smoothable=False))
        if opts.kv_cache:  # one scale for K (after rotary) and V, as TensorRT-LLM stores it
            lr.kv_scale = max(stats["k"].amax, stats["v"].amax) / FP8_MAX
        assert len(self.recipe.layers) == layer, "layers are visited in order"
        self.recipe.layers.append(lr)

    @staticmethod
    def _record(lr: LayerRecipe, group: str, fit: _Fit) -> _Fit:
        lr.weight_scale[group], lr.input_scale[group] = fit.weight_scale, fit.input_scale
        lr.alpha[group], lr.ratio[group], lr.rel_error[group] = fit.alpha, fit.ratio, fit.error
        if fit.smooth is not None:
            lr.smooth[group] = fit.smooth.float().cpu()
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
