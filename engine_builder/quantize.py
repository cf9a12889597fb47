"""``build-llm --fp8``: options, calibration and the quantized source the writer streams from.

A checkpoint build tokenizes the calibration text with the source's tokenizer, runs the source
layer by layer (calibration.py) and turns the statistics into an FP8 recipe (fp8.py); a
random-weight build gets plausible scales without calibration. Either way the writer then
streams ``Fp8Source`` tensors exactly as it streams a plain source, so the streaming, atomic
and progress rules of build.py hold unchanged.

Memory: calibration holds the residual stream of the calibration tokens (samples * seq_len *
hidden * 4 bytes), one layer in float32 and its Gram matrices (on the GPU when there is one),
and keeps the GPTQ-rounded fp8 weights in host memory until they are written: one byte per
linear weight, half the size of the bf16 model. Peak RSS therefore stays under the bf16 model's
size (Llama-3.1-8B: ~7 GB of fp8 weights against 16 GB of bf16).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine_builder.calibration import (DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, CalibrationSet, calibration_device,
                                             load_calibration_text, make_calibration_set, run_layerwise)
from kiln.engine_builder.errors import BuildOptionError
from kiln.engine_builder.format import ModelConfig, fp8_quantization
from kiln.engine_builder.fp8 import Fp8Calibrator, Fp8Source, RecipeOptions, random_recipe
from kiln.engine_builder.random_weights import WEIGHT_STD, RandomSource

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class Fp8Options:
    """What ``--fp8`` builds. ``kv_cache_fp8`` adds per-layer KV-cache scales (kv_cache_quant_algo
    FP8); ``quality_samples`` held-out windows are scored for the quality report (0 = none)."""

    kv_cache_fp8: bool = False
    calib_data: str | None = None
    calib_samples: int = DEFAULT_NUM_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    quality_samples: int = 16
    sample_rows: int = 512  # uniformly sampled calibration rows per linear that score candidate scales

    def __post_init__(self) -> None:
        for name in ("calib_samples", "calib_seq_len", "sample_rows"):
            if getattr(self, name) < 1:
                raise BuildOptionError(f"{name.replace('_', '-')} must be a positive integer (got {getattr(self, name)})")
        if self.quality_samples < 0:
            raise BuildOptionError(f"quality samples must be >= 0 (got {self.quality_samples})")


@dataclass
class QuantizedBuild:
    """The source to stream, the engine's config, the manifest record, and the calibration
    windows (None for random weights)."""

    source: Fp8Source
    model_config: ModelConfig
    record: dict[str, Any]
    calibration: CalibrationSet | None


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
    calib = make_calibration_set(load_calibration_text(options.calib_data), _tokenizer(src_dir),
                                 options.calib_samples, options.calib_seq_len)
    device = calibration_device()
    logger.info("calibrating on %d x %d tokens of %r (%s)", *calib.calibration.shape, calib.name, device)
    calibrator = Fp8Calibrator(RecipeOptions(kv_cache=options.kv_cache_fp8))
    run_layerwise(src, mc, names, calib.calibration, calibrator, sample_rows=options.sample_rows,
                  gram=calibrator.recipe.options.gptq, device=device, progress=progress)
    record = {"recipe": calibrator.recipe.describe(), "calibration": calib.describe()}
    return QuantizedBuild(Fp8Source(src, mc, names, calibrator.recipe), mc, record, calib)


def _tokenizer(src_dir: Path | None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src_dir))
    except Exception as exc:  # no tokenizer files, or files transformers cannot read
        raise BuildOptionError(f"--fp8 calibrates on text and needs the source's tokenizer ({src_dir}: {exc})") from None
