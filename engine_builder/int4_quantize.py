"""``build-llm --int4-awq`` / ``--int4``: the INT4 recipe (AWQ scales and clipping, from calibration)
and the source that serves an INT4 engine's tensors to the writer.

AWQ folds each searched scale s into the op that makes the linear's input, so the engine computes
X diag(1/s) for free: the RMSNorm weight for q/k/v and gate/up; up's rows for down (silu(gate) * up
is linear in up); v's rows for attention.dense (attention output is linear in v: exact when the
scales repeat per KV group, which the search enforces under GQA). With ``dense="prequant"`` the
dense scales are searched freely instead and stored as TensorRT-LLM's ``prequant_scaling_factor``
(1/s, multiplied into the input at run time); the engine then carries one per linear (ones where
folded, which the runtime skips), as TensorRT-LLM expects when ``pre_quant_scale`` is set.

The writer asks for each INT4 tensor by its engine name and rank (``int4.int4_piece``); the source
quantizes each source linear once (scaled, clipped, rounded; the last layer's kept) and assembles
the rank's tensor from the unquantized plan's pieces of that linear: rows and columns of the
packed weight, the matching columns and group rows of the scales and zero points.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kiln.engine_builder.awq import AwqOptions, clip_for, search_clip, search_scales
from kiln.engine_builder.calibration import CalibrationOptions, calibration_device, run_layerwise
from kiln.engine_builder.errors import BuildOptionError
from kiln.engine_builder.format import KV_CACHE_SCALE, LAYER, ModelConfig, plan_rank
from kiln.engine_builder.int4 import (GROUP_SIZES, PREQUANT, SCALE, WEIGHT, ZERO, check_group_size, int4_quantization,
                                      parse_int4_piece, quantize_gptq, quantize_rtn)
from kiln.runtime.quant.fp8 import FP8_MAX

logger = logging.getLogger(__name__)

# group: (its source weight keys, the calibration site of its input)
GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "qkv": (("q", "k", "v"), "qkv"), "dense": (("o",), "dense"), "gate_up": (("gate", "up"), "gate_up"),
    "down": (("down",), "down"),
}
GROUP_OF_KEY = {key: group for group, (keys, _) in GROUPS.items() for key in keys}
# Where a group's 1/s is folded (source key -> the group whose s it is), per the module docstring:
# tensors the writer reads as they are, and linears whose rows the fold divides before quantization.
TENSOR_FOLDS = {"input_norm": "qkv", "post_norm": "gate_up", "v_bias": "dense"}
ROW_FOLDS = {"up": "down", "v": "dense"}
CLIPPED = ("v", "o", "gate", "up", "down")  # AWQ leaves q and k unclipped (softmax is sensitive to them)


@dataclass(frozen=True)
class Int4Options(CalibrationOptions):
    """What ``--int4-awq`` (``awq``) or ``--int4`` (plain round-to-nearest) builds: groups of
    ``group_size`` inputs, with zero points unless symmetric, AWQ's clipping search (``clip``),
    attention.dense's scales folded into v (``dense="fold"``) or stored as pre-quantization scales
    (``"prequant"``), GPTQ rounding on the AWQ-scaled weights with the searched group scales kept
    (``gptq``; AWQ only), and FP8 KV-cache scales (``kv_cache_fp8``). Calibration fields as
    CalibrationOptions'."""

    awq: bool = True
    group_size: int = 128
    zero_point: bool = True
    clip: bool = True
    gptq: bool = True
    dense: str = "fold"
    kv_cache_fp8: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size not in GROUP_SIZES:
            raise BuildOptionError(f"--group-size {self.group_size} is not supported "
                                   f"(choose from {', '.join(map(str, GROUP_SIZES))})")
        if self.dense not in ("fold", "prequant"):
            raise BuildOptionError(f"dense must be 'fold' or 'prequant' (got {self.dense!r})")

    @property
    def algo(self) -> str:
        return "W4A16_AWQ" if self.awq else "W4A16"

    def quantization(self) -> dict[str, Any]:
        """config.json's quantization block of the engine these options build."""
        pre = self.awq and self.dense == "prequant"
        q = int4_quantization(self.algo, self.group_size, self.zero_point, pre)
        return {**q, "kv_cache_quant_algo": "FP8" if self.kv_cache_fp8 else None}


class PackedWeight(NamedTuple):
    """A quantized source linear as the engine stores it: packed int4 [N, K/2], scales and zero
    points [K/g, N] (zeros None when symmetric)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


@dataclass
class LayerAwq:
    """One layer's AWQ result (CPU): input scales per group, clipping indices per source key
    (uint8 [N, K/g] into AwqOptions.clip_ratios()), and the search's errors for the record."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    clip: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: dict[str, float] = field(default_factory=dict)
    error_ratio: dict[str, float] = field(default_factory=dict)  # AWQ / RTN output error on the sample
    packed: dict[str, PackedWeight] = field(default_factory=dict)  # GPTQ-rounded linears (source key)


@dataclass
class Int4Recipe:
    """How every linear is quantized: ``layers`` empty means round-to-nearest with no scales;
    ``kv_scales`` the per-layer FP8 KV-cache scales (empty without an FP8 KV cache)."""

    options: Int4Options
    awq: AwqOptions
    layers: list[LayerAwq] = field(default_factory=list)
    kv_scales: list[float] = field(default_factory=list)

    @classmethod
    def for_options(cls, options: Int4Options, dtype: torch.dtype) -> Int4Recipe:
        return cls(options, AwqOptions(group_size=options.group_size, zero_point=options.zero_point, dtype=dtype,
                                       clip=options.clip))

    @property
    def dense(self) -> str:
        return self.options.dense

    def describe(self) -> dict[str, Any]:
        o, a = self.options, self.awq
        record: dict[str, Any] = {"algo": o.algo, "group_size": o.group_size, "has_zero_point": o.zero_point,
                                  "method": "awq" if self.layers else "round-to-nearest",
                                  "kv_cache": "fp8" if o.kv_cache_fp8 else None}
        if self.layers:
            record.update(alpha_grid=a.grid, clip=a.clip, clip_grid=a.clip_grid if a.clip else None,
                          clip_max_shrink=a.clip_max_shrink if a.clip else None, dense=o.dense,
                          rounding="gptq" if o.gptq else "round-to-nearest")
            record["groups"] = {g: {"mean_alpha": round(sum(lr.alpha[g] for lr in self.layers) / len(self.layers), 4),
                                    "mean_error_vs_rtn": round(sum(lr.error_ratio[g] for lr in self.layers)
                                                               / len(self.layers), 4)} for g in GROUPS}
        return record


class AwqCalibrator:
    """The ``calibration.run_layerwise`` visitor that searches each layer's scales (and clipping)."""

    def __init__(self, recipe: Int4Recipe, mc: ModelConfig) -> None:
        self.recipe, self.mc = recipe, mc
        d, group = mc.head_size, mc.num_attention_heads // mc.num_key_value_heads
        # attention.dense's input channel (head h, i) reads v's row (kv head h // group, i).
        heads = torch.arange(mc.num_attention_heads * d) // d
        self.dense_tie = (heads // group) * d + torch.arange(mc.num_attention_heads * d) % d
        self.dense_tie = self.dense_tie.to(calibration_device())

    def __call__(self, layer: int, w: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
        recipe = self.recipe
        if recipe.options.kv_cache_fp8:  # one scale for K (after rotary) and V, as the FP8 build stores it
            recipe.kv_scales.append(max(stats["k"].amax, stats["v"].amax) / FP8_MAX)
        if not recipe.options.awq:
            return
        o, lr = recipe.awq, LayerAwq()
        for group, (keys, site) in GROUPS.items():
            weight = torch.cat([w[k] for k in keys])
            tie = self.dense_tie if group == "dense" and recipe.dense == "fold" else None
            found = search_scales(stats[site].samples, stats[site].abs_mean, weight, o, tie)
            lr.scales[group] = found.scales.float().cpu()
            lr.alpha[group] = found.alpha
            lr.error_ratio[group] = found.error / found.rtn_error if found.rtn_error > 0 else 1.0
            if o.clip:
                x = stats[site].samples / found.scales
                for key in (k for k in keys if k in CLIPPED):
                    lr.clip[key] = search_clip(x, w[key] * found.scales, o).cpu()
        assert len(recipe.layers) == layer, "layers are visited in order"
        recipe.layers.append(lr)
        if recipe.options.gptq:
            self._gptq(layer, w, stats, lr)

    def _gptq(self, layer: int, w: dict[str, torch.Tensor], stats: dict[str, Any], lr: LayerAwq) -> None:
        """GPTQ-round each linear of ``layer`` on its AWQ-scaled inputs, keeping the group scales
        and zero points the (clipped) round-to-nearest chose: the layout stays the same."""
        o, dtype = self.recipe.awq, self.recipe.awq.dtype
        for group, (keys, site) in GROUPS.items():
            s = layer_scale(self.recipe, layer, group, False, self.mc).to(w[keys[0]].device)
            gram = stats[site].gram / (s.unsqueeze(1) * s.unsqueeze(0))
            for key in keys:
                weight = awq_weight(self.recipe, layer, key, w[key], self.mc)
                grid = quantize_rtn(weight, o.group_size, o.zero_point, dtype, clip_for(lr.clip.get(key), o))
                q = quantize_gptq(weight, gram, grid)
                lr.packed[key] = PackedWeight(q.packed().cpu(), q.scales.cpu(), None if q.zeros is None else q.zeros.cpu())


def layer_scale(recipe: Int4Recipe, layer: int, group: str, fold: bool, mc: ModelConfig) -> torch.Tensor | None:
    """The AWQ scale s of ``group`` in ``layer`` (None: RTN, or a layer not searched yet), as the
    fold divides by it (v rows: per KV head channel) when ``fold``, else over the group's input
    channels."""
    if len(recipe.layers) <= layer:
        return None
    s = recipe.layers[layer].scales[group]
    if group != "dense":
        return s
    if recipe.dense == "prequant":
        return None if fold else s
    if not fold:
        return s
    d, per = mc.head_size, mc.num_attention_heads // mc.num_key_value_heads  # s repeats per KV group:
    return s.view(mc.num_key_value_heads, per, d)[:, 0].reshape(-1)  # v's row (kv, i) divides by head 0's


def awq_weight(recipe: Int4Recipe, layer: int, key: str, w: torch.Tensor, mc: ModelConfig) -> torch.Tensor:
    """Source linear ``key`` of ``layer`` (float32 [N, K]) as it is quantized: its inputs scaled by
    its group's s, its rows (v, up) divided by the next group's."""
    s = layer_scale(recipe, layer, GROUP_OF_KEY[key], False, mc)
    if s is not None:
        w = w * s.to(w.device)
    if key in ROW_FOLDS:  # v and up: the next group's scale divides their rows
        rows = layer_scale(recipe, layer, ROW_FOLDS[key], True, mc)
        w = w if rows is None else w / rows.to(w.device)[:, None]
    return w


class Int4Source:
    """A TensorSource serving an INT4 engine: the rank tensors of every quantized linear under
    ``int4_piece`` names, norms (and v's bias) with the AWQ scales folded in, the rest as is.

    Invariant: every transform of a source tensor is per row or per column (scales, folds) or
    per (row, group) (quantization, clipping), and groups never straddle a rank's columns, so a
    rank's slice of a quantized linear equals the quantization of its slice of the linear.
    """

    def __init__(self, source: Any, mc: ModelConfig, names: dict[str, str], recipe: Int4Recipe,
                 device: torch.device | None = None) -> None:
        self.source, self.config, self.recipe, self.mc = source, source.config, recipe, mc
        self.device, self.names = device or torch.device("cpu"), names
        self._pieces: dict[tuple[str, int, int], tuple] = {}  # (weight name, rank, tp) -> unquantized plan pieces
        self._roles = {names[key].format(l=layer): (layer, key) for layer in range(mc.num_hidden_layers)
                       for key in (*GROUP_OF_KEY, *TENSOR_FOLDS)}
        self._cache: dict[str, PackedWeight] = {}
        self._cached_layer = -1

    def describe(self) -> dict[str, Any]:
        return self.source.describe()

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(name)

    def read_parts(self, name: str, rows: tuple[int, int] | None = None) -> list[torch.Tensor]:
        return [self.read(name, rows)]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        virtual = parse_int4_piece(name)
        if virtual is not None:
            return self._rank_tensor(*virtual)
        if name.endswith(KV_CACHE_SCALE):  # transformer.layers.{l}.attention.kv_cache_scaling_factor
            layer = int(name.removeprefix(LAYER.split("{l}")[0]).split(".")[0])
            return torch.tensor([self.recipe.kv_scales[layer]], dtype=torch.float32)
        role = self._roles.get(name)
        t = self.source.read(name, rows)
        if role is None or role[1] not in TENSOR_FOLDS:
            return t
        s = self._scale(role[0], TENSOR_FOLDS[role[1]], fold=True)
        if s is None:
            return t
        s = s if rows is None else s[rows[0]:rows[1]]
        return t.float() / (s if t.dim() == 1 else s[:, None])

    def _scale(self, layer: int, group: str, fold: bool) -> torch.Tensor | None:
        return layer_scale(self.recipe, layer, group, fold, self.mc)

    def _quantized(self, name: str) -> PackedWeight:
        """The INT4 form of source linear ``name`` (full, unsharded), cached for its layer."""
        layer, key = self._roles[name]
        if layer != self._cached_layer:
            self._cache, self._cached_layer = {}, layer
        if self.recipe.layers and key in self.recipe.layers[layer].packed:  # GPTQ's, from calibration
            return self.recipe.layers[layer].packed[key]
        if name not in self._cache:
            w = awq_weight(self.recipe, layer, key, self.source.read(name).to(self.device, torch.float32), self.mc)
            o = self.recipe.awq
            clip = self.recipe.layers[layer].clip.get(key) if self.recipe.layers else None
            q = quantize_rtn(w, o.group_size, o.zero_point, self.mc.torch_dtype, clip_for(clip, o))
            self._cache[name] = PackedWeight(q.packed().cpu(), q.scales.cpu(), None if q.zeros is None else q.zeros.cpu())
        return self._cache[name]

    def _plan_pieces(self, weight: str, rank: int, tp: int) -> tuple:
        """The unquantized plan's pieces of linear ``weight`` on rank ``rank`` of ``tp``."""
        if (weight, rank, tp) not in self._pieces:
            base = dataclasses.replace(self.mc, tp_size=tp, quant_algo=None, quantization=None)
            self._pieces.update({(t.name, rank, tp): t.pieces for t in plan_rank(base, self.names, rank)})
        return self._pieces[(weight, rank, tp)]

    def _rank_tensor(self, name: str, rank: int, tp: int) -> torch.Tensor:
        """One rank's INT4 tensor ``{prefix}.{weight|weights_scaling_factor|zero|prequant_scaling_factor}``."""
        prefix, _, kind = name.rpartition(".")
        pieces = self._plan_pieces(f"{prefix}.{WEIGHT}", rank, tp)
        g = self.recipe.options.group_size
        parts = []
        for p in pieces:
            qw = self._quantized(p.source)
            rows = slice(*p.rows) if p.rows else slice(None)
            cols = slice(*p.cols) if p.cols else slice(None)
            gcols = slice(p.cols[0] // g, p.cols[1] // g) if p.cols else slice(None)
            if kind == WEIGHT:
                parts.append(qw.packed[rows, slice(cols.start // 2, cols.stop // 2) if p.cols else cols])
            elif kind in (SCALE, ZERO):
                parts.append((qw.scales if kind == SCALE else qw.zeros)[gcols, rows])
            else:  # PREQUANT: the same input for every piece; 1/s where dense was not folded, else ones
                layer, key = self._roles[p.source]
                s = self._scale(layer, GROUP_OF_KEY[key], fold=False) if key == "o" else None
                k = self.source.shape(p.source)[1]
                pre = torch.ones(k) if s is None else 1.0 / s
                return pre[cols].reshape(1, -1).to(self.mc.torch_dtype)
        return torch.cat(parts, dim=0 if kind == WEIGHT else 1).contiguous()


def check_int4_shapes(mc: ModelConfig, group_size: int) -> None:
    """One line when a linear's input (this rank's) does not split into whole groups."""
    q_out = mc.num_attention_heads * mc.head_size
    inputs = {"attention.qkv": (mc.hidden_size, 1), "mlp.fc/mlp.gate": (mc.hidden_size, 1),
              "attention.dense": (q_out, mc.tp_size), "mlp.proj": (mc.intermediate_size, mc.tp_size)}
    for module, (width, split) in inputs.items():
        try:
            check_group_size(group_size, width // split, module if split == 1 else f"{module} at tp {split}")
        except ValueError as exc:
            raise BuildOptionError(str(exc)) from None


def int4_model_config(mc: ModelConfig, options: Int4Options) -> ModelConfig:
    """``mc`` as the INT4 engine ``options`` build (config.json's quantization block)."""
    check_int4_shapes(mc, options.group_size)
    return dataclasses.replace(mc, quant_algo=options.algo, quantization=options.quantization())


def prepare_int4(src: Any, src_dir: Path | None, mc: ModelConfig, names: dict[str, str], options: Int4Options,
                 progress: bool) -> Any:
    """The INT4 build of ``src``: AWQ (or, for ``--int4``, nothing) searched on calibration text,
    FP8 KV-cache scales when asked; random weights get neither (scales 1, the FP8 build's
    plausible KV scales). The quality report compares AWQ with round-to-nearest."""
    from kiln.engine_builder.fp8 import random_recipe
    from kiln.engine_builder.quantize import QuantizedBuild, tokenizer
    from kiln.engine_builder.random_weights import WEIGHT_STD, RandomSource

    device = calibration_device()
    recipe = Int4Recipe.for_options(options, mc.torch_dtype)
    label = "awq" if options.awq else "rtn"
    if isinstance(src, RandomSource):
        if options.kv_cache_fp8:
            recipe.kv_scales = [lr.kv_scale for lr in random_recipe(mc, src.weight_amax(), WEIGHT_STD, True).layers]
        record = {"recipe": {**recipe.describe(), "method": "random weights: round-to-nearest, no calibration"},
                  "calibration": None}
        return QuantizedBuild(Int4Source(src, mc, names, recipe, device), mc, record, None, label)
    calib = options.calibration_set(tokenizer(src_dir))
    if options.awq or options.kv_cache_fp8:
        logger.info("calibrating on %d x %d tokens of %r (%s)", *calib.calibration.shape, calib.name, device)
        run_layerwise(src, mc, names, calib.calibration, AwqCalibrator(recipe, mc), sample_rows=options.sample_rows,
                      gram=options.awq and options.gptq, device=device, progress=progress)
    compare = []
    if options.awq:  # the same engine without AWQ, for the quality report
        rtn_options = dataclasses.replace(options, awq=False)
        rtn = dataclasses.replace(Int4Recipe.for_options(rtn_options, mc.torch_dtype), kv_scales=recipe.kv_scales)
        compare.append(("rtn", Int4Source(src, mc, names, rtn, device), int4_model_config(mc, rtn_options)))
    record = {"recipe": recipe.describe(), "calibration": calib.describe()}
    return QuantizedBuild(Int4Source(src, mc, names, recipe, device), mc, record, calib, label, compare)


__all__ = ["AwqCalibrator", "Int4Options", "Int4Recipe", "Int4Source", "LayerAwq", "check_int4_shapes",
           "int4_model_config", "prepare_int4"]
