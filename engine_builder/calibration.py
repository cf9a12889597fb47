"""Calibration: run the source model on text, one layer at a time, and hand each layer's
weights and input-activation statistics to a quantizer.

The API any post-training quantizer uses (FP8 here; a weight-only INT4 / AWQ one needs the
same inputs):

    text = load_calibration_text(path_or_None)        # .txt / .jsonl, or the default set
    data = make_calibration_set(text, tokenizer, num_samples, seq_len)   # token windows
    run_layerwise(source, mc, names, data.calibration, visit)             # visit(i, weights, stats)

``visit(layer, weights, stats)`` is called once per decoder layer while that layer's source
weights are loaded (``weights``: float32 tensors by the logical keys of
``format.SOURCE_KEYS``) with ``stats``: a ``SiteStats`` per input site (``SITES``): the input
of attention.qkv, attention.dense, the MLP's gate/up GEMM and mlp.proj, and the keys (after
rotary) and values written to the KV cache. Each holds per-channel absmax and mean |x|, the rows
with the largest |x| (attention-sink tokens carry activations ~1000x the rest: a uniform sample
would miss them), a uniform sample of the other rows, and on request the Gram matrix sum x^T x
(GPTQ's Hessian): enough to score candidate scales against the real activations.

Memory: the residual stream of every calibration token ([samples * seq_len, hidden] float32),
one layer's weights in float32 and one chunk of that layer's activations; never the whole
model. The layers run on the GPU when there is one. Calibration propagates the source's own
(unquantized) activations from layer to layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kiln.engine_builder.errors import BuildOptionError
from kiln.engine_builder.format import ModelConfig
from kiln.engine_builder.options import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN, DEFAULT_QUALITY_SAMPLES
from kiln.engine_builder.source import TensorSource
from kiln.scheduler.block_manager import cdiv

logger = logging.getLogger(__name__)

SITES = ("qkv", "dense", "gate_up", "down", "k", "v")
DEFAULT_SET_NAME = "pydoc-topics"
DEFAULT_NUM_SAMPLES = DEFAULT_CALIB_SAMPLES
DEFAULT_SEQ_LEN = DEFAULT_CALIB_SEQ_LEN
HELD_OUT_FRACTION = 0.1  # the tail of the token stream; never used for calibration
_CHUNK_ELEMENTS = 1 << 25  # activations of one chunk: tokens * widest layer output


# ----------------------------------------------------------------------------- text


@dataclass(frozen=True)
class CalibrationText:
    """Documents of calibration text, in a fixed order, with a digest of exactly that text."""

    name: str
    documents: tuple[str, ...]
    sha256: str


def _digest(documents: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        h.update(doc.encode())
        h.update(b"\0")
    return h.hexdigest()


def default_calibration_text() -> CalibrationText:
    """The default set, needing no network: the Python Language Reference topics that CPython
    ships for ``help()`` (``pydoc_data.topics``, ~460 KB of English prose and code), sorted by
    topic name. It changes with the Python version: the sha256 in the manifest says which."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise BuildOptionError("the default calibration text (pydoc_data, part of CPython) is missing in this "
                               "Python; give --calib-data FILE (.txt or .jsonl)") from None
    docs = tuple(topics[key] for key in sorted(topics))
    return CalibrationText(DEFAULT_SET_NAME, docs, _digest(docs))


def load_calibration_text(path: str | Path | None) -> CalibrationText:
    """A .txt file (one document), a .jsonl file (one {"text": ...} object per line), or None for
    the default set. BuildOptionError names what is wrong with the file."""
    if path is None:
        return default_calibration_text()
    path = Path(path)
    if not path.is_file():
        raise BuildOptionError(f"--calib-data {path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildOptionError(f"--calib-data {path}: unreadable ({exc})") from None
    if path.suffix == ".jsonl":
        docs = tuple(_jsonl_text(path, number, line) for number, line in enumerate(raw.splitlines(), 1) if line.strip())
    elif path.suffix == ".txt":
        docs = (raw,)
    else:
        raise BuildOptionError(f"--calib-data {path}: expected a .txt or .jsonl file")
    docs = tuple(d for d in docs if d.strip())
    if not docs:
        raise BuildOptionError(f"--calib-data {path}: no text")
    return CalibrationText(path.name, docs, _digest(docs))


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise BuildOptionError(f"--calib-data {path}:{number}: not a JSON object") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise BuildOptionError(f'--calib-data {path}:{number}: expected an object with a "text" string')
    return record["text"]


@dataclass(frozen=True)
class CalibrationOptions:
    """What a calibrated build reads and scores: the text (``calib_data``, None = the default set),
    ``calib_samples`` windows of ``calib_seq_len`` tokens, ``sample_rows`` rows per linear kept for
    scoring candidates, and ``quality_samples`` held-out windows for the quality report (0 = none)."""

    calib_data: str | None = None
    calib_samples: int = DEFAULT_NUM_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    quality_samples: int = DEFAULT_QUALITY_SAMPLES
    sample_rows: int = 1024

    def __post_init__(self) -> None:
        for name in ("calib_samples", "calib_seq_len", "sample_rows"):
            if getattr(self, name) < 1:
                raise BuildOptionError(f"{name.replace('_', '-')} must be a positive integer (got {getattr(self, name)})")
        if self.quality_samples < 0:
            raise BuildOptionError(f"quality samples must be >= 0 (got {self.quality_samples})")

    def calibration_set(self, tokenizer: Any) -> CalibrationSet:
        return make_calibration_set(load_calibration_text(self.calib_data), tokenizer, self.calib_samples,
                                    self.calib_seq_len)


# ----------------------------------------------------------------------------- token windows


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows of one text: ``calibration`` [num_samples, seq_len] for the statistics and
    ``held_out`` [n, seq_len] from the tail of the text (``HELD_OUT_FRACTION`` of its tokens),
    never used for calibration, for the quality report."""

    name: str
    sha256: str
    seq_len: int
    calibration: torch.Tensor
    held_out: torch.Tensor

    def describe(self) -> dict[str, Any]:
        """The manifest's ``calibration`` entry."""
        return {"name": self.name, "sha256": self.sha256, "samples": int(self.calibration.shape[0]),
                "seq_len": self.seq_len, "held_out_samples": int(self.held_out.shape[0]),
                "held_out": f"last {HELD_OUT_FRACTION:.0%} of the text's tokens"}


def make_calibration_set(text: CalibrationText, tokenizer: Any, num_samples: int, seq_len: int) -> CalibrationSet:
    """Tokenize the documents as one stream (joined by blank lines), keep its tail as held-out
    windows and spread ``num_samples`` non-overlapping windows evenly over the rest."""
    if num_samples < 1 or seq_len < 2:
        raise BuildOptionError(f"--calib-samples must be >= 1 and --calib-seq-len >= 2 (got {num_samples}, {seq_len})")
    ids = tokenizer("\n\n".join(text.documents), add_special_tokens=False)["input_ids"]
    split = int(len(ids) * (1 - HELD_OUT_FRACTION))
    stream = torch.tensor(ids[:split], dtype=torch.long)
    available = len(stream) // seq_len
    if available < 1 or len(ids) - split < seq_len:
        raise BuildOptionError(f"calibration text {text.name!r} has {len(ids)} tokens: too short for windows of "
                               f"{seq_len} (lower --calib-seq-len or give more text)")
    if available < num_samples:
        logger.warning("calibration text %r holds %d windows of %d tokens; using all of them instead of %d",
                       text.name, available, seq_len, num_samples)
        num_samples = available
    starts = [(i * available // num_samples) * seq_len for i in range(num_samples)]
    windows = torch.stack([stream[s:s + seq_len] for s in starts])
    tail = torch.tensor(ids[split:], dtype=torch.long)
    held_out = tail[: (len(tail) // seq_len) * seq_len].view(-1, seq_len)
    return CalibrationSet(text.name, text.sha256, seq_len, windows, held_out)


# ----------------------------------------------------------------------------- statistics


@dataclass
class SiteStats:
    """Statistics of one activation site over the calibration tokens (float32, on the device).

    ``absmax[c]`` = max |x[:, c]|, ``abs_mean[c]`` = mean |x[:, c]|; ``top_rows`` the rows of
    largest max |x| and ``samples`` a uniform sample of rows (the same rows for every site of a
    layer), which stands for ``sample_weight`` rows each, so sums over ``top_rows`` plus
    ``sample_weight`` times sums over ``samples`` estimate sums over all ``count`` rows;
    ``gram`` = sum x^T x over all rows, or None when not requested."""

    absmax: torch.Tensor
    abs_mean: torch.Tensor
    samples: torch.Tensor
    top_rows: torch.Tensor
    top_max: torch.Tensor
    gram: torch.Tensor | None = None
    count: int = 0

    @property
    def amax(self) -> float:
        return float(self.absmax.max())

    @property
    def sample_weight(self) -> float:
        return max(self.count - len(self.top_rows), 0) / max(len(self.samples), 1)


@dataclass
class LayerStats:
    """Accumulates ``SiteStats`` for one layer, chunk by chunk."""

    sample_rows: int
    top_rows: int = 64
    gram_sites: tuple[str, ...] = ()
    sites: dict[str, SiteStats] = field(default_factory=dict)
    _sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def observe(self, site: str, x: torch.Tensor, rows: torch.Tensor) -> None:
        """x [tokens, channels] of one chunk; ``rows`` indexes the chunk's sampled rows."""
        x = x.reshape(-1, x.shape[-1]).float()
        a = x.abs()
        stats = self.sites.get(site)
        if stats is None:
            gram = x.new_zeros(x.shape[1], x.shape[1]) if site in self.gram_sites else None
            stats = self.sites[site] = SiteStats(a.amax(0), a.new_zeros(x.shape[1]), x[:0], x[:0], a[:0, 0], gram)
            self._sums[site] = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        else:
            torch.maximum(stats.absmax, a.amax(0), out=stats.absmax)
        self._sums[site] += a.sum(0, dtype=torch.float64)
        stats.count += x.shape[0]
        stats.abs_mean = (self._sums[site] / stats.count).float()
        stats.samples = torch.cat([stats.samples, x[rows]])
        row_max = torch.cat([stats.top_max, a.amax(1)])
        keep = row_max.topk(min(self.top_rows, len(row_max))).indices
        stats.top_rows, stats.top_max = torch.cat([stats.top_rows, x])[keep], row_max[keep]
        if stats.gram is not None:
            stats.gram += x.T @ x


# ----------------------------------------------------------------------------- the layer-wise run

LayerVisitor = Callable[[int, dict[str, torch.Tensor], dict[str, SiteStats]], None]


def calibration_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_layerwise(source: TensorSource, mc: ModelConfig, names: dict[str, str], tokens: torch.Tensor,
                  visit: LayerVisitor, *, sample_rows: int = 1024, top_rows: int = 64, gram: bool = False,
                  device: torch.device | None = None, progress: bool = True) -> torch.Tensor:
    """Run the source model's decoder layers over ``tokens`` [samples, seq_len] in float32, one
    layer at a time, and call ``visit`` for each (see the module docstring); ``gram`` adds the
    linear inputs' Gram matrices. Returns the last layer's output (the residual stream before
    the final norm), [samples, seq_len, hidden]."""
    from tqdm import tqdm

    from kiln.runtime.layers import build_cos_sin_cache

    device = device or calibration_device()
    samples, seq_len = tokens.shape
    embed = source.read(names["embed"])
    hidden = embed[tokens.reshape(-1)].to(device=device, dtype=torch.float32).view(samples, seq_len, -1)
    del embed
    cos_sin = build_cos_sin_cache(mc.head_size, seq_len, mc.rotary_base, mc.rotary_scaling).to(device)
    widest = max(mc.intermediate_size * 2, (mc.num_attention_heads + 2 * mc.num_key_value_heads) * mc.head_size)
    chunk = max(1, min(samples, _CHUNK_ELEMENTS // (seq_len * widest)))
    per_chunk = cdiv(sample_rows, cdiv(samples, chunk))
    gen = torch.Generator().manual_seed(0)
    bar = tqdm(total=mc.num_hidden_layers * samples, desc="calibrate", unit="seq", disable=not progress)
    for layer in range(mc.num_hidden_layers):
        weights = _layer_weights(source, names, layer, device)
        stats = LayerStats(sample_rows, top_rows, ("qkv", "dense", "gate_up", "down") if gram else ())
        for start in range(0, samples, chunk):
            block = hidden[start:start + chunk]
            rows = torch.randperm(block.shape[0] * seq_len, generator=gen)[:per_chunk].to(device)
            hidden[start:start + chunk] = _layer_forward(block, weights, mc, cos_sin, stats, rows)
            bar.update(block.shape[0])
        visit(layer, weights, stats.sites)
        del weights, stats
    bar.close()
    return hidden


def _layer_weights(source: TensorSource, names: dict[str, str], layer: int, device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("input_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "o", "post_norm",
                "gate", "up", "down"):
        name = names[key].format(l=layer)
        if source.shape(name) is not None:
            out[key] = source.read(name).to(device=device, dtype=torch.float32)
    return out


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _layer_forward(h: torch.Tensor, w: dict[str, torch.Tensor], mc: ModelConfig, cos_sin: torch.Tensor,
                   stats: LayerStats, rows: torch.Tensor) -> torch.Tensor:
    """One decoder layer on h [B, L, H] (float32), observing every linear's input."""
    from kiln.runtime.layers import apply_rotary

    b, seq, _ = h.shape
    d, heads, kv_heads, eps = mc.head_size, mc.num_attention_heads, mc.num_key_value_heads, mc.norm_epsilon
    x = _rms(h, w["input_norm"], eps)
    stats.observe("qkv", x, rows)
    q, k, v = (F.linear(x, w[key], w.get(f"{key}_bias")) for key in ("q", "k", "v"))
    q, k, v = q.view(b * seq, heads, d), k.view(b * seq, kv_heads, d), v.view(b * seq, kv_heads, d)
    if mc.qk_norm:
        q, k = _rms(q, w["q_norm"], eps), _rms(k, w["k_norm"], eps)
    positions = torch.arange(seq, device=h.device).repeat(b)
    q, k = apply_rotary(q, k, positions, cos_sin)
    stats.observe("k", k.reshape(b * seq, -1), rows)
    stats.observe("v", v.reshape(b * seq, -1), rows)
    q, k, v = (t.view(b, seq, -1, d).transpose(1, 2) for t in (q, k, v))
    if heads != kv_heads:  # GQA: each KV head serves heads // kv_heads query heads
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    attn = attn.transpose(1, 2).reshape(b, seq, heads * d)
    stats.observe("dense", attn, rows)
    h = h + F.linear(attn, w["o"])
    x = _rms(h, w["post_norm"], eps)
    stats.observe("gate_up", x, rows)
    act = F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"])
    stats.observe("down", act, rows)
    return h + F.linear(act, w["down"])
