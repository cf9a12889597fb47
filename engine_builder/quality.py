"""The quality report of a quantized build: perplexity of the source and of the quantized engine on
held-out calibration text, computed through Kiln's own runtime (``SamplingParams(prompt_logprobs)``).

The source is scored as an unquantized engine written to a scratch folder next to the output
(removed afterwards), and so is every variant the build compares with (an INT4 AWQ build: the
same model rounded to nearest, ``QuantizedBuild.compare``). With an FP8 KV cache the engine is scored twice: FP8 linears alone (a view
of the engine whose config.json drops kv_cache_quant_algo) and FP8 + FP8 KV, the latter only when
the runtime really holds its KV cache in fp8; otherwise the report says it was not measured.
Tensor-parallel builds are scored on a tp=1 build of the same recipe (same numerics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from kiln.engine_builder.format import CONFIG_FILE, ModelConfig

logger = logging.getLogger(__name__)

FP8_KV_NOT_MEASURED = "not measured (runtime lacks FP8 KV)"


def perplexity(engine_dir: Path, windows: torch.Tensor, device: str, progress: bool = False) -> tuple[float, str]:
    """(exp of the mean negative log-likelihood of every token after the first of each window,
    the dtype of the KV cache the runtime used)."""
    from kiln.runtime.llm import LLM
    from kiln.scheduler.sampling_params import SamplingParams

    seq_len = int(windows.shape[1])
    options = dict(device=device, max_model_len=seq_len + 1, max_num_tokens=seq_len, max_batch_size=4,
                   num_kv_cache_tokens=4 * (seq_len + 1), enable_prefix_caching=False, enforce_eager=True)
    with LLM(engine_dir, **options) as llm:
        kv_dtype = _kv_cache_dtype(llm)
        outputs = llm.generate([{"prompt_token_ids": w.tolist()} for w in windows],
                               SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=progress)
    logprobs = [entry.logprob for out in outputs for entry in out.prompt_logprobs[1:]]
    return math.exp(-sum(logprobs) / len(logprobs)), kv_dtype


def _kv_cache_dtype(llm: Any) -> str:
    kv = getattr(getattr(llm.engine.runner, "kv_cache", None), "kv", None)
    return str(kv[0].dtype).removeprefix("torch.") if kv else "unknown"


def quality_report(engine_dir: Path, src: Any, src_dir: Path | None, mc: ModelConfig, names: dict[str, str],
                   quantized: Any, options: Any, progress: bool) -> dict[str, Any]:
    """Perplexities of the source, of each variant ``quantized.compare`` names (INT4 AWQ builds:
    round-to-nearest), of the engine and (when built with it) the engine with its FP8 KV cache."""
    from kiln.engine_builder.build import write_engine_dir

    windows = quantized.calibration.held_out[: options.quality_samples]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {"text": quantized.calibration.name, "held_out_samples": int(windows.shape[0]),
                              "seq_len": int(windows.shape[1]), "device": device}
    with tempfile.TemporaryDirectory(prefix=f".{engine_dir.name}.quality-", dir=engine_dir.parent) as scratch:
        scratch_dir = Path(scratch)

        def scratch_engine(name: str, source: Any, config: ModelConfig) -> Path:
            (scratch_dir / name).mkdir()
            write_engine_dir(source, dataclasses.replace(config, tp_size=1), names, src_dir, scratch_dir / name, 0, progress)
            return scratch_dir / name

        logger.info("quality report: scoring %d held-out windows of %d tokens on %s", *windows.shape, device)
        report["source_ppl"], _ = perplexity(scratch_engine("source", src, mc), windows, device, progress)
        qmc, label = quantized.model_config, quantized.label
        kv_fp8 = qmc.kv_cache_quant_algo == "FP8"
        scored = [(name, scratch_engine(name, source, config)) for name, source, config in quantized.compare]
        engine = engine_dir if qmc.tp_size == 1 else scratch_engine(label, quantized.source, qmc)
        for name, path in scored + [(label, engine)]:  # weights alone: without the KV cache's quantization
            view = _without_kv_quant(path, scratch_dir / f"{name}-view") if kv_fp8 else path
            report[f"{name}_ppl"], _ = perplexity(view, windows, device, progress)
            report[f"{name}_delta_pct"] = 100 * (report[f"{name}_ppl"] / report["source_ppl"] - 1)
        report["scored"] = [name for name, _ in scored] + [label]
        if kv_fp8:
            report.update(_score_fp8_kv(engine, windows, device, progress, report["source_ppl"], label))
    return report


def _score_fp8_kv(engine: Path, windows: torch.Tensor, device: str, progress: bool, source_ppl: float,
                  label: str) -> dict[str, Any]:
    key = f"{label}_kv"  # fp8_kv for an FP8 build
    try:
        ppl, kv_dtype = perplexity(engine, windows, device, progress)
    except Exception as exc:  # a runtime that refuses kv_cache_quant_algo FP8
        logger.warning("FP8 KV not measured: the runtime refused the engine (%s)", exc)
        return {key: FP8_KV_NOT_MEASURED, f"{key}_error": str(exc)}
    if "float8" not in kv_dtype:
        return {key: FP8_KV_NOT_MEASURED, f"{key}_error": f"the runtime kept its KV cache in {kv_dtype}"}
    return {key: "measured", f"{key}_ppl": ppl, f"{key}_delta_pct": 100 * (ppl / source_ppl - 1)}


def _without_kv_quant(engine: Path, view: Path) -> Path:
    """A view of ``engine`` (links to its files) whose config.json has no KV-cache quantization."""
    view.mkdir()
    for item in engine.iterdir():
        if item.name != CONFIG_FILE:
            (view / item.name).symlink_to(item.resolve())
    config = json.loads((engine / CONFIG_FILE).read_text())
    config["quantization"] = {**config["quantization"], "kv_cache_quant_algo": None}
    (view / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return view


LABELS = {"fp8": "FP8", "awq": "INT4 AWQ", "rtn": "INT4 RTN"}


def format_quality(report: dict[str, Any]) -> str:
    """The build's closing lines about quality."""
    lines = [f"  quality: perplexity on {report['held_out_samples']} held-out windows of {report['seq_len']} tokens "
             f"of {report['text']!r} ({report['device']})",
             f"    source     {report['source_ppl']:.4f}"]
    for name in report.get("scored", ["fp8"]):
        lines.append(f"    {LABELS.get(name, name):10s} {report[f'{name}_ppl']:.4f}  ({report[f'{name}_delta_pct']:+.2f}%)")
    label = report.get("scored", ["fp8"])[-1]
    kv = report.get(f"{label}_kv")
    if kv == "measured":
        lines.append(f"    {LABELS.get(label, label)} + FP8 KV {report[f'{label}_kv_ppl']:.4f}  "
                     f"({report[f'{label}_kv_delta_pct']:+.2f}%)")
    elif kv is not None:
        lines.append(f"    FP8 KV: {kv}")
    return "\n".join(lines)

