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

    def format(self) -> str:
        lines = [
            f"built {self.architecture} engine in {self.output}",
            f"  parameters: {self.num_parameters / 1e6:,.1f} M   dtype: {self.dtype}   tp: {self.tp_size}",
        ]
        lines += [f"  {rank_file(r)}: {n / 1e6:,.1f} MB" for r, n in enumerate(self.rank_bytes)]
        lines.append(f"  time: {self.seconds:.1f} s   peak RSS: {self.peak_rss_bytes / 2**20:,.0f} MiB")
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
) -> BuildSummary:
    """Convert ``source`` (HF directory or alias) or a random-weight preset into an engine dir."""
    start = time.time()
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
    plans = [plan_rank(mc, arch.names, r) for r in range(tp)]
    specs = [[TensorSpec(t.name, mc.torch_dtype, t.shape) for t in plan] for plan in plans]
    out = Path(output)
    _check_output(out, force, sum(file_size(s) for s in specs))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an engine dir is an ordinary folder
        ranks = _write_ranks(src, plans, specs, tmp, mc.torch_dtype, progress)
        num_params = sum(math.prod(t.shape) for t in source_tensors(mc, arch.names).values())
        _write_metadata(tmp, mc, src, src_dir, ranks, num_params)
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = BuildSummary(
        out, mc.architecture, mc.dtype, tp, num_params, tuple(r["size"] for r in ranks), time.time() - start, peak_rss_bytes()
    )
    logger.info("%s", summary.format())
    return summary


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

    def __init__(self, src: TensorSource, dtype: torch.dtype):
        self.src, self.dtype = src, dtype
        self._cached: tuple[str, torch.Tensor] | None = None

    def __call__(self, piece: Piece, shape: tuple[int, ...]) -> list[torch.Tensor]:
        """The piece as dim-0 blocks in the build dtype."""
        if piece.source is None:
            return [torch.zeros((piece.num_rows, *shape[1:]), dtype=self.dtype)]
        if piece.rows is not None:
            return [p.to(self.dtype) for p in self.src.read_parts(piece.source, piece.rows)]
        if self._cached is None or self._cached[0] != piece.source:
            self._cached = None  # drop the old tensor before reading the next
            self._cached = (piece.source, self.src.read(piece.source).to(self.dtype))
        full = self._cached[1]
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
    src: TensorSource, plans: list[list[OutputTensor]], specs: list[list[TensorSpec]], out: Path,
    dtype: torch.dtype, progress: bool,
) -> list[dict[str, Any]]:
    """Stream every rank file at once, one output tensor (all ranks) at a time."""
    from tqdm import tqdm

    writers = [StreamingSafetensorsWriter(out / rank_file(r), s, {"format": "pt"}) for r, s in enumerate(specs)]
    read = _PieceReader(src, dtype)
    background = _BackgroundWriter()
    try:
        for index in tqdm(range(len(plans[0])), desc="build-llm", unit="tensor", disable=not progress):
            for writer, plan in zip(writers, plans):
                tensor = plan[index]
                parts = [block for piece in tensor.pieces for block in read(piece, tensor.shape)]
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


def _write_metadata(
    out: Path, mc: ModelConfig, src: TensorSource, src_dir: Path | None, ranks: list[dict[str, Any]], num_params: int
) -> None:
    """config.json, tokenizer files, generation_config.json and kiln.json."""
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
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest = make_manifest(mc, src.describe(), ranks, num_params, kiln_version(), created)
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
