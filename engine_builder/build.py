"""Build orchestration: source -> plan -> streamed rank files -> engine directory.

Atomicity: everything is written into a hidden temporary folder beside the output and
renamed into place only when complete; any exception (Ctrl-C included) removes the
temporary folder. With ``force`` an existing output is replaced only after the new build
succeeded.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import queue
import resource
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.engine_builder.architectures import get_architecture, resolve_dtype
from kiln.engine_builder.errors import BuildOptionError, OutputError, SourceError
from kiln.engine_builder.format import (
    CONFIG_FILE, DTYPES, MANIFEST_FILE, ModelConfig, OutputTensor, Piece, make_manifest, plan_rank, rank_file,
    source_tensors,
)
from kiln.engine_builder.options import DtypeError, canonical_dtype
from kiln.engine_builder.quality import format_quality, quality_report
from kiln.engine_builder.int4_quantize import Int4Options
from kiln.engine_builder.quantize import Fp8Options, prepare, quantization_options, quantized_model_config
from kiln.engine_builder.random_weights import RandomSource, load_preset
from kiln.engine_builder.source import TOKENIZER_FILES, HFCheckpoint, TensorSource, resolve_source
from kiln.engine_builder.writer import StreamingSafetensorsWriter, TensorSpec, file_size

logger = logging.getLogger(__name__)
DISK_MARGIN_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class BuildSummary:
    """What a finished build produced."""

    output: Path
    architecture: str
    dtype: str
    tp_size: int
    num_parameters: int
    rank_bytes: tuple[int, ...]
    seconds: float
    peak_rss_bytes: int
    quant_algo: str | None = None
    quality: dict[str, Any] | None = None

    def format(self) -> str:
        quant = f"   quantization: {self.quant_algo}" if self.quant_algo else ""
        lines = [
            f"built {self.architecture} engine in {self.output}",
            f"  parameters: {self.num_parameters / 1e6:,.1f} M   dtype: {self.dtype}   tp: {self.tp_size}{quant}",
        ]
        lines += [f"  {rank_file(r)}: {n / 1e6:,.1f} MB" for r, n in enumerate(self.rank_bytes)]
        lines.append(f"  time: {self.seconds:.1f} s   peak RSS: {self.peak_rss_bytes / 2**20:,.0f} MiB")
        if self.quality:
            lines.append(format_quality(self.quality))
        return "\n".join(lines)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def kiln_version() -> str:
    try:
        from importlib.metadata import version

        return version("kiln-llm")
    except Exception:  # not installed as a distribution
        return "unknown"


def build_engine(
    source: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    tp: int = 1,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    random_weights: str | None = None,
    seed: int = 0,
    fp8: Fp8Options | bool | None = None,
    int4_awq: bool = False,
    int4: Int4Options | bool | None = None,
    group_size: int | None = None,
    int4_symmetric: bool = False,
    kv_cache_dtype: str | None = None,
    calib_data: str | None = None,
    calib_samples: int | None = None,
    calib_seq_len: int | None = None,
    quality_samples: int | None = None,
) -> BuildSummary:
    """Convert ``source`` (HF directory or alias) or a random-weight preset into an engine dir.
    ``fp8`` (calibrated FP8), ``int4_awq`` (INT4 with AWQ) or ``int4`` (INT4, round-to-nearest)
    quantize it (engine_builder/quantize.py): True with the other keywords (the build options'
    flags, options.py) filling in the options, or an Fp8Options / Int4Options."""
    start = time.time()
    quant = quantization_options(fp8, int4, int4_awq, group_size, int4_symmetric, kv_cache_dtype, calib_data=calib_data,
                                 calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                                 quality_samples=quality_samples)
    if dtype is not None:
        try:
            dtype = canonical_dtype(dtype)  # also accepts fp16, bf16, fp32, half, float
        except DtypeError as e:
            raise BuildOptionError(str(e)) from None
    if not isinstance(tp, int) or tp < 1:
        raise BuildOptionError(f"tp must be a positive integer (got {tp!r})")
    src, src_dir = _open_source(source, random_weights, seed, dtype)
    arch = get_architecture(src.config)
    mc = arch.model_config(src.config, tp, dtype)
    _check_source(src, source_tensors(mc, arch.names), mc)
    num_params = sum(math.prod(t.shape) for t in source_tensors(mc, arch.names).values())
    out = Path(output)
    built_mc = quantized_model_config(mc, quant) if quant is not None else mc
    _check_output(out, force, _expected_bytes(built_mc, arch.names))
    quantized = prepare(src, src_dir, built_mc, arch.names, quant, progress) if quant is not None else None
    target = (quantized.source, built_mc) if quantized else (src, mc)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an engine dir is an ordinary folder
        record = quantized.record if quantized else None
        ranks = write_engine_dir(*target, arch.names, src_dir, tmp, num_params, progress, record)
        if quantized is not None and quantized.calibration is not None and quant.quality_samples > 0:
            record["quality"] = quality_report(tmp, src, src_dir, mc, arch.names, quantized, quant, progress)
            _write_manifest(tmp, target[1], target[0], ranks, num_params, record)
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = BuildSummary(
        out, mc.architecture, mc.dtype, tp, num_params, tuple(r["size"] for r in ranks), time.time() - start,
        peak_rss_bytes(), target[1].quant_algo, (record or {}).get("quality"),
    )
    logger.info("%s", summary.format())
    return summary


def write_engine_dir(src: TensorSource, mc: ModelConfig, names: dict[str, str], src_dir: Path | None, out: Path,
                     num_params: int, progress: bool, quantization: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write every file of an engine of ``mc`` from ``src`` into the existing folder ``out``."""
    plans = [plan_rank(mc, names, r) for r in range(mc.tp_size)]
    specs = [[TensorSpec(t.name, t.dtype or mc.torch_dtype, t.shape) for t in plan] for plan in plans]
    ranks = _write_ranks(src, plans, specs, out, progress)
    _write_metadata(out, mc, src, src_dir)
    _write_manifest(out, mc, src, ranks, num_params, quantization)
    return ranks


def _expected_bytes(mc: ModelConfig, names: dict[str, str]) -> int:
    return sum(file_size([TensorSpec(t.name, t.dtype or mc.torch_dtype, t.shape) for t in plan_rank(mc, names, r)])
               for r in range(mc.tp_size))


def _open_source(
    source: str | os.PathLike[str] | None, random_weights: str | None, seed: int, dtype: str | None
) -> tuple[TensorSource, Path | None]:
    if random_weights is not None:
        if source is not None:
            raise BuildOptionError("give either a SOURCE or --random-weights PRESET, not both")
        config = load_preset(random_weights)
        torch_dtype = DTYPES[resolve_dtype(dtype, config)]
        return RandomSource(config, seed, torch_dtype, random_weights), None
    if source is None:
        raise BuildOptionError("no SOURCE given (a Hugging Face model directory, 'smollm2-135m', or --random-weights PRESET)")
    path = resolve_source(source)
    return HFCheckpoint(path), path


def _check_source(src: TensorSource, expected: dict[str, Any], mc: ModelConfig) -> None:
    """Every tensor the plan reads exists with the right shape and a floating dtype."""
    where = getattr(src, "path", "source")
    for name, spec in expected.items():
        shape = src.shape(name)
        if shape is None:
            hint = " (and tie_word_embeddings is false)" if name.startswith("lm_head") else ""
            raise SourceError(f"{where}: tensor {name!r} is missing{hint}")
        if tuple(shape) != spec.shape:
            raise SourceError(f"{where}: tensor {name!r} has shape {tuple(shape)}, config.json implies {spec.shape}")
        if not src.dtype(name).is_floating_point:
            raise SourceError(f"{where}: tensor {name!r} has dtype {src.dtype(name)}; only float weights are supported")


def _check_output(out: Path, force: bool, expected_bytes: int) -> None:
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < expected_bytes + DISK_MARGIN_BYTES:
        raise OutputError(
            f"not enough disk space in {out.parent}: the engine needs {expected_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


class _PieceReader:
    """Reads plan pieces, keeping the last whole tensor so tp ranks slicing it share one read."""

    def __init__(self, src: TensorSource):
        self.src = src
        self._cached: tuple[str, torch.dtype, torch.Tensor] | None = None

    def __call__(self, piece: Piece, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        """The piece as dim-0 blocks in ``dtype`` (the output tensor's)."""
        if piece.source is None:
            return [torch.zeros((piece.num_rows, *shape[1:]), dtype=dtype)]
        if piece.rows is not None:
            return [p.to(dtype) for p in self.src.read_parts(piece.source, piece.rows)]
        if self._cached is None or self._cached[:2] != (piece.source, dtype):
            self._cached = None  # drop the old tensor before reading the next
            self._cached = (piece.source, dtype, self.src.read(piece.source).to(dtype))
        full = self._cached[2]
        return [full if piece.cols is None else full[:, piece.cols[0] : piece.cols[1]]]


class _BackgroundWriter:
    """Runs ``writer.write`` calls on one thread, so hashing and disk writes overlap reading
    the next tensor (all three release the GIL). At most ``depth`` tensors wait in the
    queue; the thread's first error is re-raised in the caller's thread."""

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="build-llm-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:  # after an error, only drain
                try:
                    job[0].write(job[1], *job[2])
                except BaseException as exc:  # re-raised in the building thread
                    self._error = exc

    def submit(self, writer: StreamingSafetensorsWriter, name: str, parts: list[torch.Tensor]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((writer, name, parts))

    def finish(self) -> None:
        """Wait for queued writes; re-raise the writer thread's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


def _write_ranks(
    src: TensorSource, plans: list[list[OutputTensor]], specs: list[list[TensorSpec]], out: Path, progress: bool,
) -> list[dict[str, Any]]:
    """Stream every rank file at once, one output tensor (all ranks) at a time."""
    from tqdm import tqdm

    writers = [StreamingSafetensorsWriter(out / rank_file(r), s, {"format": "pt"}) for r, s in enumerate(specs)]
    read = _PieceReader(src)
    background = _BackgroundWriter()
    try:
        for index in tqdm(range(len(plans[0])), desc="build-llm", unit="tensor", disable=not progress):
            for writer, plan, spec in zip(writers, plans, specs):
                tensor = plan[index]
                parts = [block for piece in tensor.pieces for block in read(piece, tensor.shape, spec[index].dtype)]
                background.submit(writer, tensor.name, parts)
        background.finish()
        for writer in writers:
            writer.close()
    finally:
        try:
            background.finish()
        except BaseException:  # already raised (or superseded) by the error unwinding here
            pass
        for writer in writers:
            writer.abort()
    return [{"file": w.path.name, "size": w.bytes_written, "sha256": w.sha256} for w in writers]


def _write_metadata(out: Path, mc: ModelConfig, src: TensorSource, src_dir: Path | None) -> None:
    """config.json, tokenizer files and generation_config.json."""
    import json

    (out / CONFIG_FILE).write_text(json.dumps(mc.to_trtllm_config(), indent=2) + "\n")
    if src_dir is not None:
        for name in TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, out / name)
    generation = src_dir / "generation_config.json" if src_dir is not None else None
    if generation is not None and generation.is_file():
        shutil.copy2(generation, out / "generation_config.json")
    else:
        ids = {k: src.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if src.config.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


def _write_manifest(out: Path, mc: ModelConfig, src: TensorSource, ranks: list[dict[str, Any]], num_params: int,
                    quantization: dict[str, Any] | None) -> None:
    """kiln.json (rewritten once the quality report of a quantized build is known)."""
    import json

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest = make_manifest(mc, src.describe(), ranks, num_params, kiln_version(), created, quantization)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished build into place; an old output (force) goes only after that."""
    old = None
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output {out} already exists (use --force to replace it)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:  # put the previous build back
            os.rename(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
