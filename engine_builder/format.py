"""THE Kiln engine format: TensorRT-LLM checkpoint layout plus a manifest.

An engine directory holds ``config.json`` (TensorRT-LLM field names), one
``rank{N}.safetensors`` per tensor-parallel rank (TensorRT-LLM tensor names and splits),
tokenizer files, ``generation_config.json`` and ``kiln.json`` (the manifest). This module
owns every name, split and field of that layout; the builder writes what ``plan_rank`` says
and the runtime reads through ``load_engine``.

Splits (per rank r of tp): attention.qkv stores cat(q_r, k_r, v_r) (KV heads duplicated
when there are fewer than tp of them); dense and mlp.proj split dim 1 (row parallel);
mlp.fc (= gate_proj), mlp.gate (= up_proj) and lm_head split dim 0, lm_head padded with zero
rows up to a multiple of tp; everything else is replicated.

FP8 engines (quant_algo "FP8"): each linear of ``QUANTIZED_MODULES`` stores its weight as
float8_e4m3fn plus ``weights_scaling_factor`` and ``activation_scaling_factor`` (float32, (1,),
dequantization scales, the same on every rank); with kv_cache_quant_algo "FP8" each layer adds
``attention.kv_cache_scaling_factor``. The embedding and lm_head stay in the model dtype
(``exclude_modules``). The scale tensors' plan pieces name the scale itself (the quantizing
source serves it under that name).

INT4 engines (quant_algo "W4A16_AWQ" / "W4A16", group_size, has_zero_point, pre_quant_scale):
each linear stores its packed int4 weight, ``weights_scaling_factor`` and, per those flags,
``zero`` and ``prequant_scaling_factor`` (layout and numerics: engine_builder/int4.py); the
quantizing source serves each rank's tensor whole (``int4.int4_piece``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.engine_builder.errors import BuildOptionError, EngineFormatError
from kiln.engine_builder.int4 import INT4_ALGOS, plan_int4_linear
from kiln.engine_builder.options import DTYPE_NAMES
from kiln.engine_builder.writer import read_header
from kiln.scheduler.block_manager import cdiv

FORMAT_NAME = "kiln-engine"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
CONFIG_FILE = "config.json"
MANIFEST_FILE = "kiln.json"
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}  # names: options.DTYPE_NAMES

EMBEDDING = "transformer.vocab_embedding.weight"
FINAL_NORM = "transformer.ln_f.weight"
LM_HEAD = "lm_head.weight"
LAYER = "transformer.layers.{l}."
FP8 = torch.float8_e4m3fn
QUANTIZED_MODULES = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
WEIGHT_SCALE = "weights_scaling_factor"
INPUT_SCALE = "activation_scaling_factor"
KV_CACHE_SCALE = "attention.kv_cache_scaling_factor"
FP8_EXCLUDED_MODULES = ["lm_head", "transformer.vocab_embedding"]


def fp8_quantization(kv_cache_fp8: bool) -> dict[str, Any]:
    """config.json ``quantization`` of an FP8 engine (TensorRT-LLM's fields)."""
    return {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_cache_fp8 else None, "group_size": 128,
            "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": list(FP8_EXCLUDED_MODULES)}


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class ModelConfig:
    """Typed, validated view of an engine's config.json (one model, one tp/pp mapping).

    Invariants (checked at construction): num_attention_heads and intermediate_size divide
    by tp_size; num_key_value_heads either divides by tp_size or divides tp_size (then each
    rank holds one duplicated KV head); padded_vocab_size is vocab_size rounded up to a
    multiple of tp_size. ``vocab_size`` is the real vocabulary (logits are cut to it).
    """

    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    norm_epsilon: float
    rotary_base: float
    rotary_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    tp_size: int = 1
    pp_size: int = 1
    quant_algo: str | None = None
    hidden_act: str = "silu"
    # config.json "quantization" as stored (TensorRT-LLM field names); quant_algo mirrors its key.
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.quantization is None:  # TensorRT-LLM's defaults around quant_algo
            object.__setattr__(self, "quantization", {
                "quant_algo": self.quant_algo, "kv_cache_quant_algo": None, "group_size": 128,
                "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None,
            })
        tp, heads, kv = self.tp_size, self.num_attention_heads, self.num_key_value_heads
        if self.dtype not in DTYPES:
            raise BuildOptionError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.pp_size != 1:
            raise BuildOptionError(f"pipeline parallelism (pp {self.pp_size}) is not supported: build the engine with "
                                   "tensor parallelism only (--tp)")
        if tp < 1:
            raise BuildOptionError(f"tp must be >= 1 (got {tp})")
        if heads % tp:
            raise BuildOptionError(f"tp={tp} does not divide the {heads} attention heads")
        if heads % kv:
            raise BuildOptionError(f"{kv} KV heads do not divide the {heads} attention heads")
        if kv % tp and tp % kv:
            raise BuildOptionError(f"tp={tp} and the {kv} KV heads: neither divides the other")
        if self.intermediate_size % tp:
            raise BuildOptionError(f"tp={tp} does not divide intermediate_size {self.intermediate_size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_cache_quant_algo(self) -> str | None:
        return (self.quantization or {}).get("kv_cache_quant_algo")

    @property
    def padded_vocab_size(self) -> int:
        return cdiv(self.vocab_size, self.tp_size) * self.tp_size

    @property
    def num_heads_per_rank(self) -> int:
        return self.num_attention_heads // self.tp_size

    @property
    def num_kv_heads_per_rank(self) -> int:
        """KV heads each rank holds: 1 (a duplicate) when there are fewer KV heads than ranks."""
        return max(self.num_key_value_heads // self.tp_size, 1)

    @property
    def intermediate_size_per_rank(self) -> int:
        return self.intermediate_size // self.tp_size

    @property
    def vocab_rows_per_rank(self) -> int:
        return self.padded_vocab_size // self.tp_size

    def kv_heads_of_rank(self, rank: int) -> range:
        """Indices of the source KV heads that ``rank`` stores."""
        kv, tp = self.num_key_value_heads, self.tp_size
        if kv < tp:  # tp // kv consecutive ranks share (a copy of) one KV head
            head = rank // (tp // kv)
            return range(head, head + 1)
        per = kv // tp
        return range(rank * per, (rank + 1) * per)

    def to_trtllm_config(self) -> dict[str, Any]:
        """config.json contents, TensorRT-LLM field names (attn_bias / qk_layernorm are Kiln's)."""
        return {
            "architecture": self.architecture,
            "dtype": self.dtype,
            "logits_dtype": "float32",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_size": self.head_size,
            "intermediate_size": self.intermediate_size,
            "norm_epsilon": self.norm_epsilon,
            "hidden_act": self.hidden_act,
            "position_embedding_type": "rope_gpt_neox",
            "max_position_embeddings": self.max_position_embeddings,
            "rotary_base": self.rotary_base,
            "rotary_scaling": self.rotary_scaling,
            "mapping": {"world_size": self.tp_size * self.pp_size, "tp_size": self.tp_size, "pp_size": self.pp_size},
            "quantization": dict(self.quantization),
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "share_embedding_table": False,  # lm_head.weight is always written
            "tie_word_embeddings": self.tie_word_embeddings,
            "attn_bias": self.qkv_bias,
            "qk_layernorm": self.qk_norm,
        }

    @classmethod
    def from_trtllm_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_trtllm_config`` (TensorRT-LLM defaults for optional fields)."""
        mapping = cfg.get("mapping") or {}
        heads = int(cfg["num_attention_heads"])
        return cls(
            architecture=cfg["architecture"],
            dtype=cfg["dtype"],
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_size=int(cfg.get("head_size") or int(cfg["hidden_size"]) // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            norm_epsilon=float(cfg.get("norm_epsilon", 1e-5)),
            rotary_base=float(cfg.get("rotary_base", 10000.0)),
            rotary_scaling=cfg.get("rotary_scaling"),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attn_bias", False)),
            qk_norm=bool(cfg.get("qk_layernorm", False)),
            tp_size=int(mapping.get("tp_size", 1)),
            pp_size=int(mapping.get("pp_size", 1)),
            quant_algo=(cfg.get("quantization") or {}).get("quant_algo"),
            hidden_act=cfg.get("hidden_act", "silu"),
            quantization=cfg.get("quantization"),
        )


# ---------------------------------------------------------------------------------------
# The conversion plan: which source rows/columns make up each rank's tensors.
# Source tensors are named by logical keys; an architecture maps them to its own names.

SOURCE_KEYS = (
    "embed", "input_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm",
    "o", "post_norm", "gate", "up", "down", "final_norm", "lm_head",
)


@dataclass(frozen=True)
class Piece:
    """A dim-0 block of an output tensor: rows/cols of a source tensor, or zero rows."""

    source: str | None  # source tensor name; None: ``num_rows`` rows of zeros
    rows: tuple[int, int] | None = None  # source rows [a, b) (dim 0); None = all
    cols: tuple[int, int] | None = None  # source columns [a, b) (dim 1); None = all
    num_rows: int = 0  # only for zero pieces


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of one rank file, and how to assemble it from the source; ``dtype`` None
    means the model dtype."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class SourceTensor:
    """A tensor the source must provide: its shape and its kind (for random init)."""

    shape: tuple[int, ...]
    kind: str  # "weight" | "norm" | "bias"


def source_tensors(mc: ModelConfig, names: dict[str, str]) -> dict[str, SourceTensor]:
    """Every source tensor a build of ``mc`` reads, with its expected (unsharded) shape."""
    h, d, i = mc.hidden_size, mc.head_size, mc.intermediate_size
    q_out, kv_out = mc.num_attention_heads * d, mc.num_key_value_heads * d
    per_layer = {
        "input_norm": ((h,), "norm"), "q": ((q_out, h), "weight"), "k": ((kv_out, h), "weight"),
        "v": ((kv_out, h), "weight"), "o": ((h, q_out), "weight"), "post_norm": ((h,), "norm"),
        "gate": ((i, h), "weight"), "up": ((i, h), "weight"), "down": ((h, i), "weight"),
    }
    if mc.qkv_bias:
        per_layer.update({"q_bias": ((q_out,), "bias"), "k_bias": ((kv_out,), "bias"), "v_bias": ((kv_out,), "bias")})
    if mc.qk_norm:
        per_layer.update({"q_norm": ((d,), "norm"), "k_norm": ((d,), "norm")})
    out = {names["embed"]: SourceTensor((mc.vocab_size, h), "weight")}
    for layer in range(mc.num_hidden_layers):
        for key, (shape, kind) in per_layer.items():
            out[names[key].format(l=layer)] = SourceTensor(shape, kind)
    out[names["final_norm"]] = SourceTensor((h,), "norm")
    if not mc.tie_word_embeddings:
        out[names["lm_head"]] = SourceTensor((mc.vocab_size, h), "weight")
    return out


def _span(index: int, size: int) -> tuple[int, int]:
    return index * size, (index + 1) * size


def _qkv_pieces(mc: ModelConfig, names: dict[str, str], rank: int, suffix: str) -> tuple[Piece, ...]:
    d = mc.head_size
    kv = mc.kv_heads_of_rank(rank)
    q_rows = _span(rank, mc.num_heads_per_rank * d)
    kv_rows = (kv.start * d, kv.stop * d)
    return (Piece(names["q" + suffix], q_rows), Piece(names["k" + suffix], kv_rows), Piece(names["v" + suffix], kv_rows))


def plan_rank(mc: ModelConfig, names: dict[str, str], rank: int) -> list[OutputTensor]:
    """Tensors of ``rank{rank}.safetensors`` in file order, each with its source pieces."""
    h, d = mc.hidden_size, mc.head_size
    qkv_rows = (mc.num_heads_per_rank + 2 * mc.num_kv_heads_per_rank) * d
    inter = mc.intermediate_size_per_rank
    out = [OutputTensor(EMBEDDING, (mc.vocab_size, h), (Piece(names["embed"]),))]
    for layer in range(mc.num_hidden_layers):
        src = {key: tmpl.format(l=layer) for key, tmpl in names.items()}
        pre = LAYER.format(l=layer)
        linear = _linear_planner(mc, pre, out, rank)
        out.append(OutputTensor(pre + "input_layernorm.weight", (h,), (Piece(src["input_norm"]),)))
        linear("attention.qkv", (qkv_rows, h), _qkv_pieces(mc, src, rank, ""))
        if mc.qkv_bias:
            out.append(OutputTensor(pre + "attention.qkv.bias", (qkv_rows,), _qkv_pieces(mc, src, rank, "_bias")))
        if mc.qk_norm:
            out.append(OutputTensor(pre + "attention.q_layernorm.weight", (d,), (Piece(src["q_norm"]),)))
            out.append(OutputTensor(pre + "attention.k_layernorm.weight", (d,), (Piece(src["k_norm"]),)))
        q_cols = _span(rank, mc.num_heads_per_rank * d)
        linear("attention.dense", (h, q_cols[1] - q_cols[0]), (Piece(src["o"], cols=q_cols),))
        if mc.kv_cache_quant_algo == "FP8":
            out.append(_scale(pre + KV_CACHE_SCALE))
        out.append(OutputTensor(pre + "post_layernorm.weight", (h,), (Piece(src["post_norm"]),)))
        linear("mlp.fc", (inter, h), (Piece(src["gate"], _span(rank, inter)),))
        linear("mlp.gate", (inter, h), (Piece(src["up"], _span(rank, inter)),))
        linear("mlp.proj", (h, inter), (Piece(src["down"], cols=_span(rank, inter)),))
    out.append(OutputTensor(FINAL_NORM, (h,), (Piece(names["final_norm"]),)))
    out.append(_lm_head(mc, names, rank))
    return out


def _scale(name: str) -> OutputTensor:
    """A per-tensor FP8 scale: float32 (1,), served by the quantizing source under its own name."""
    return OutputTensor(name, (1,), (Piece(name),), torch.float32)


def _linear_planner(mc: ModelConfig, prefix: str, out: list[OutputTensor], rank: int):
    """Appends a linear's weight (fp8 in an FP8 engine, then its two scales; INT4 tensors in an
    INT4 engine, engine_builder/int4.py) to ``out``."""
    fp8 = mc.quant_algo == "FP8"
    if mc.quant_algo not in (None, "FP8", *INT4_ALGOS):
        raise BuildOptionError(f"quant_algo {mc.quant_algo!r} has no engine layout in this Kiln "
                               f"(supported: FP8, {', '.join(INT4_ALGOS)})")

    def add(module: str, shape: tuple[int, ...], pieces: tuple[Piece, ...]) -> None:
        name = prefix + module
        if mc.quant_algo in INT4_ALGOS:
            out.extend(plan_int4_linear(name + ".weight", shape, rank, mc.tp_size, mc.quantization))
            return
        out.append(OutputTensor(name + ".weight", shape, pieces, FP8 if fp8 else None))
        if fp8:
            out.extend((_scale(f"{name}.{WEIGHT_SCALE}"), _scale(f"{name}.{INPUT_SCALE}")))

    return add


def _lm_head(mc: ModelConfig, names: dict[str, str], rank: int) -> OutputTensor:
    rows = mc.vocab_rows_per_rank
    a, b = _span(rank, rows)
    real = (min(a, mc.vocab_size), min(b, mc.vocab_size))
    source = names["embed"] if mc.tie_word_embeddings else names["lm_head"]
    pieces = []
    if real[1] > real[0]:
        pieces.append(Piece(source, real))
    if real[1] - real[0] < rows:
        pieces.append(Piece(None, num_rows=rows - (real[1] - real[0])))
    return OutputTensor(LM_HEAD, (rows, mc.hidden_size), tuple(pieces))


def make_manifest(
    mc: ModelConfig, source: dict[str, Any], ranks: list[dict[str, Any]], num_parameters: int,
    kiln_version: str, created: str, quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """kiln.json: what was built from what. ``ranks``: [{"file", "size", "sha256"}] per rank;
    ``quantization``: the quantizer's record (recipe, calibration set, quality report)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kiln_version": kiln_version,
        "created": created,
        "source": source,  # {"path", "architecture", "config_sha256", "weight_files"} or {"random_weights", "seed"}
        "architecture": mc.architecture,
        "dtype": mc.dtype,
        "mapping": {"tp_size": mc.tp_size, "pp_size": mc.pp_size, "world_size": mc.tp_size * mc.pp_size},
        "quantization": {"quant_algo": mc.quant_algo, "kv_cache_quant_algo": mc.kv_cache_quant_algo,
                         **(quantization or {})},
        "num_parameters": num_parameters,
        "ranks": ranks,
    }


# ---------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedEngine:
    """One rank of an engine directory: configs, manifest and memory-mapped tensors."""

    path: Path
    config: dict[str, Any]
    model_config: ModelConfig
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    rank: int = 0


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EngineFormatError(f"{path.parent}: not a Kiln engine directory ({path.name} is missing)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineFormatError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise EngineFormatError(f"{path}: expected a JSON object")
    return data


def mmap_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as views of one private memory map (no copy)."""
    stored, _ = read_header(path)
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, st in stored.items():
        raw = flat[st.begin : st.end]
        if st.begin % st.dtype.itemsize:  # misaligned for a view: copy this one
            raw = raw.clone()
        tensors[name] = raw.view(st.dtype).reshape(st.shape)
    return tensors


def load_engine(engine_dir: str | Path, rank: int = 0) -> LoadedEngine:
    """Open rank ``rank`` of an engine directory; EngineFormatError names what is wrong."""
    path = Path(engine_dir)
    if not path.is_dir():
        raise EngineFormatError(f"engine directory {path} does not exist")
    manifest = _read_json(path / MANIFEST_FILE)
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT_NAME or version not in SUPPORTED_FORMAT_VERSIONS:
        raise EngineFormatError(
            f"{path}: engine format {manifest.get('format')!r} version {version!r} is not supported "
            f"(this Kiln reads {FORMAT_NAME} version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}; rebuild it)"
        )
    config = _read_json(path / CONFIG_FILE)
    try:
        model_config = ModelConfig.from_trtllm_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineFormatError(f"{path / CONFIG_FILE}: invalid engine config ({exc})") from None
    if not 0 <= rank < model_config.tp_size:
        raise EngineFormatError(f"{path}: rank {rank} does not exist (the engine was built with tp={model_config.tp_size})")
    weights = path / rank_file(rank)
    if not weights.is_file():
        raise EngineFormatError(f"{path}: {weights.name} is missing")
    try:
        tensors = mmap_tensors(weights)
    except Exception as exc:  # corrupt header or unmappable file
        raise EngineFormatError(f"{weights}: cannot load ({exc})") from None
    return LoadedEngine(path, config, model_config, manifest, tensors, rank)
