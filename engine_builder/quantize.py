"""Build-time quantization: ``build-llm --fp8`` and ``--int4-awq`` / ``--int4`` options, calibration
and the quantized source the writer streams from.

A checkpoint build tokenizes the calibration text with the source's tokenizer, runs the source
layer by layer (calibration.py) and turns the statistics into a recipe (fp8.py; int4_quantize.py
for INT4); a random-weight build gets plausible scales without calibration. Either way the writer
then streams the quantizing source's tensors exactly as it streams a plain source, so the
streaming, atomic and progress rules of build.py hold unchanged.

FP8 memory: calibration holds the residual stream of the calibration tokens (samples * seq_len *
hidden * 4 bytes), one layer in float32 and its Gram matrices (on the GPU when there is one),
and keeps the GPTQ-rounded fp8 weights in host memory until they are written: one byte per
linear weight, half the size of the bf16 model. Peak RSS therefore stays under the bf16 model's
size (Llama-3.1-8B: ~7 GB of fp8 weights against 16 GB of bf16).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.engine_builder.calibration import CalibrationOptions, CalibrationSet, calibration_device, run_layerwise
from kiln.engine_builder.errors import BuildOptionError
from kiln.engine_builder.format import ModelConfig, fp8_quantization
from kiln.engine_builder.fp8 import Fp8Calibrator, Fp8Source, RecipeOptions, random_recipe
from kiln.engine_builder.options import KV_CACHE_DTYPES
from kiln.engine_builder.random_weights import WEIGHT_STD, RandomSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fp8Options(CalibrationOptions):
    """What ``--fp8`` builds. ``kv_cache_fp8`` adds per-layer KV-cache scales (kv_cache_quant_algo
    FP8); the calibration fields are CalibrationOptions'."""

    kv_cache_fp8: bool = False
    sample_rows: int = 512  # uniformly sampled rows per linear (with the largest rows) that score candidates


def quantization_options(fp8: Fp8Options | bool | None = None, int4: Any = None, int4_awq: bool = False,
                         group_size: int | None = None, int4_symmetric: bool = False,
                         kv_cache_dtype: str | None = None, **calibration: Any) -> CalibrationOptions | None:
    """The build's options from ``build_engine``'s keywords (the build-option flags, options.py):
    Fp8Options / Int4Options as given, or made from the flags; None for an unquantized build.
    One line for flags that do not go together or need a quantization."""
    from kiln.engine_builder.int4_quantize import Int4Options

    given = {k: v for k, v in calibration.items() if v is not None}
    if kv_cache_dtype not in (None, *KV_CACHE_DTYPES):
        raise BuildOptionError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {kv_cache_dtype!r})")
    if sum(bool(q) for q in (fp8, int4, int4_awq)) > 1:
        raise BuildOptionError("choose one of --fp8, --int4-awq and --int4")
    int4_flags = {k: v for k, v in (("group_size", group_size), ("zero_point", False if int4_symmetric else None))
                  if v is not None}
    if int4_flags and not (int4 or int4_awq):
        raise BuildOptionError("--group-size and --int4-symmetric need --int4-awq or --int4")
    kv = {"kv_cache_fp8": True} if kv_cache_dtype == "fp8" else {}
    if fp8:
        base = fp8 if isinstance(fp8, Fp8Options) else Fp8Options()
        return dataclasses.replace(base, **given, **kv)
    if int4 or int4_awq:
        base = int4 if isinstance(int4, Int4Options) else Int4Options(awq=bool(int4_awq))
        return dataclasses.replace(base, **given, **int4_flags, **kv)
    if kv or given:
        raise BuildOptionError("--kv-cache-dtype fp8 and the calibration options (--calib-data, --calib-samples, "
                               "--calib-seq-len, --quality-samples) need --fp8, --int4-awq or --int4")
    return None


@dataclass
class QuantizedBuild:
    """The source to stream, the engine's config, the manifest record, and the calibration
    windows (None for random weights). The quality report scores the source, each of
    ``compare`` ((label, source, config) of other quantizations of the same model) and the
    engine under ``label``."""

    source: Any
    model_config: ModelConfig
    record: dict[str, Any]
    calibration: CalibrationSet | None
    label: str = "fp8"
    compare: list[tuple[str, Any, ModelConfig]] = field(default_factory=list)


def quantized_model_config(mc: ModelConfig, options: CalibrationOptions) -> ModelConfig:
    """``mc`` as the engine ``options`` build (config.json's quantization block)."""
    from kiln.engine_builder.int4_quantize import Int4Options, int4_model_config

    return int4_model_config(mc, options) if isinstance(options, Int4Options) else fp8_model_config(mc, options)


def prepare(src: Any, src_dir: Path | None, mc: ModelConfig, names: dict[str, str], options: CalibrationOptions,
            progress: bool) -> QuantizedBuild:
    """Calibrate (checkpoint) or pick plausible scales (random weights); the quantized source."""
    from kiln.engine_builder.int4_quantize import Int4Options, prepare_int4

    if isinstance(options, Int4Options):
        return prepare_int4(src, src_dir, mc, names, options, progress)
    return prepare_fp8(src, src_dir, mc, names, options, progress)


def fp8_model_config(mc: ModelConfig, options: Fp8Options) -> ModelConfig:
    """``mc`` as an FP8 engine (config.json's quantization block)."""
    return dataclasses.replace(mc, quant_algo="FP8", quantization=fp8_quantization(options.kv_cache_fp8))


def prepare_fp8(src: Any, src_dir: Path | None, mc: ModelConfig, names: dict[str, str], options: Fp8Options,
                progress: bool) -> QuantizedBuild:
    """Calibrate (checkpoint) or pick plausible scales (random weights); the quantized source."""
    if isinstance(src, RandomSource):
        recipe = random_recipe(mc, src.weight_amax(), WEIGHT_STD, options.kv_cache_fp8)
        record = {"recipe": {**recipe.describe(), "method": "random weights: scales from the init's statistics"},
                  "calibration": None}
        return QuantizedBuild(Fp8Source(src, mc, names, recipe), mc, record, None)
    calib = options.calibration_set(tokenizer(src_dir))
    device = calibration_device()
    logger.info("calibrating on %d x %d tokens of %r (%s)", *calib.calibration.shape, calib.name, device)
    calibrator = Fp8Calibrator(RecipeOptions(kv_cache=options.kv_cache_fp8))
    run_layerwise(src, mc, names, calib.calibration, calibrator, sample_rows=options.sample_rows,
                  gram=calibrator.recipe.options.gptq, device=device, progress=progress)
    record = {"recipe": calibrator.recipe.describe(), "calibration": calib.describe()}
    return QuantizedBuild(Fp8Source(src, mc, names, calibrator.recipe), mc, record, calib)


def tokenizer(src_dir: Path | None) -> Any:
    """The source's tokenizer, for the calibration text."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src_dir))
    except Exception as exc:  # no tokenizer files, or files transformers cannot read
        raise BuildOptionError(f"quantizing calibrates on text and needs the source's tokenizer ({src_dir}: {exc})"
                               ) from None
