"""EngineConfig: the one frozen configuration of the runtime, built once at the edge.

Constructing it validates values and does no I/O; what depends on the engine (the model's
dtype, its maximum context) is resolved by small methods that take the ModelConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.engine_builder.options import DTYPE_NAMES  # both pure Python: no torch at import
from kiln.scheduler.config import CAPACITY_POLICIES

if TYPE_CHECKING:
    import torch

# torch is imported inside the methods that need it: the server's command line builds this
# config, and `serve-llm --help` must not pay for importing torch.
# kv_cache_dtype values (kiln.runtime.fp8_kv resolves them; it imports torch, this module must not).
KV_CACHE_DTYPES = ("auto", "model", "fp8")
_DEVICES = ("auto", "cpu", "cuda")
# Which implementation runs every kernel (attention, norms, rotary, GEMVs, ...): "triton" on CUDA,
# "torch" (the pure-torch reference), or "auto" (triton on CUDA, torch elsewhere).
_KERNEL_BACKENDS = ("auto", "triton", "torch")
# "external": drafts come from a proposer object handed to LLMEngine (benchmarks, tests).
SPECULATIVE_METHODS = ("ngram", "draft", "external")
# The EngineConfig fields of speculative decoding (flags of serve-llm and bench-llm, YAML keys).
SPECULATIVE_OPTIONS = ("speculative", "num_speculative_tokens", "ngram_min", "ngram_max", "draft_engine",
                       "speculative_max_batch_size", "speculative_min_acceptance")


class EngineConfigError(ValueError):
    """A bad engine option; the message names the option and the allowed values."""


@dataclass(frozen=True)
class EngineConfig:
    """Runtime options (DESIGN.md "Engine API").

    Invariants: every field is validated in ``__post_init__``; derived values are properties
    or pure methods, so two components reading the config always agree.
    ``num_kv_cache_tokens`` (when set) overrides the memory-fraction sizing of the KV cache;
    ``max_model_len=None`` means the model's ``max_position_embeddings``.
    ``kv_cache_dtype``: "auto" = what the engine says (FP8 when it has KV scales, else the
    compute dtype), "model" = the compute dtype, "fp8" = FP8 even without scales (scale 1.0);
    runtime/fp8_kv.py ``resolve_kv_cache_dtype``.
    """

    engine_dir: str | Path
    device: str = "auto"
    max_num_tokens: int = 8192
    # 512: on an H200 the FP8 Llama-3.1-8B 128/128 x 3,000 run gains 8% over 256 (24,441 -> 26,431
    # output tok/s; 1024: 26,846, with 4x the CUDA-graph memory, and 1000/1000 slower than at 512);
    # BENCHMARKS.md "Sixth H200 session". Graphs for 67 batch sizes, ~0.3 GiB for that model.
    max_batch_size: int = 512
    block_size: int = 32
    kv_cache_fraction: float = 0.9
    num_kv_cache_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    capacity_policy: str = "guaranteed_no_evict"
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    enforce_eager: bool = False
    kernel_backend: str = "auto"
    seed: int = 0
    # GPU index of each tensor-parallel rank (rank r runs on cuda:devices[r]); None = 0..tp-1.
    devices: tuple[int, ...] | None = None
    # Speculative decoding (DESIGN.md "Speculative decoding"); off unless ``speculative`` is set.
    speculative: str | None = None  # "ngram" (prompt lookup) | "draft" (a smaller engine)
    num_speculative_tokens: int = 4  # K: draft tokens per request and step
    ngram_min: int = 2  # n-gram lookup: shortest suffix matched
    ngram_max: int = 4  # longest suffix matched (tried first)
    draft_engine: str | None = None  # the draft engine directory ("draft")
    speculative_max_batch_size: int = 8  # nobody speculates while more requests run
    speculative_min_acceptance: float = 0.3  # a request averaging fewer accepted drafts per step pauses
    # The earlier name of kernel_backend (it selects every kernel, not only attention); folded into
    # kernel_backend by __post_init__ and None afterwards.
    attention_backend: str | None = None

    def __post_init__(self) -> None:
        device = str(self.device)
        if device.split(":")[0] not in _DEVICES:
            raise EngineConfigError(f"device must be one of {_DEVICES} (optionally 'cuda:N'), got {self.device!r}")
        if self.attention_backend is not None:
            if self.kernel_backend not in ("auto", self.attention_backend):
                raise EngineConfigError(f"kernel_backend={self.kernel_backend!r} and its old name attention_backend="
                                        f"{self.attention_backend!r} disagree; give kernel_backend only")
            object.__setattr__(self, "kernel_backend", self.attention_backend)
            object.__setattr__(self, "attention_backend", None)
        if self.kernel_backend not in _KERNEL_BACKENDS:
            raise EngineConfigError(f"kernel_backend must be one of {_KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise EngineConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise EngineConfigError(f"capacity_policy must be one of {CAPACITY_POLICIES}, got {self.capacity_policy!r}")
        for name in ("max_num_tokens", "max_batch_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise EngineConfigError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction!r}")
        if self.num_kv_cache_tokens is not None and self.num_kv_cache_tokens < 1:
            raise EngineConfigError(f"num_kv_cache_tokens must be a positive integer, got {self.num_kv_cache_tokens!r}")
        if self.devices is not None:
            devices = tuple(self.devices)
            if not devices or any(not isinstance(d, int) or d < 0 for d in devices) or len(set(devices)) != len(devices):
                raise EngineConfigError(f"devices must be distinct GPU indices (e.g. 0,1), got {self.devices!r}")
            object.__setattr__(self, "devices", devices)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise EngineConfigError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        self._check_speculative()

    def _check_speculative(self) -> None:
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            raise EngineConfigError(
                f"speculative must be one of {SPECULATIVE_METHODS[:2]} (or unset), got {self.speculative!r}")
        for name in ("num_speculative_tokens", "ngram_min", "ngram_max", "speculative_max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.ngram_min > self.ngram_max:
            raise EngineConfigError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        if not isinstance(self.speculative_min_acceptance, (int, float)) or self.speculative_min_acceptance < 0:
            raise EngineConfigError(
                f"speculative_min_acceptance must be a number >= 0, got {self.speculative_min_acceptance!r}")
        if (self.speculative == "draft") != (self.draft_engine is not None):
            raise EngineConfigError("draft_engine is needed with speculative='draft', and only with it")

    @property
    def spec_tokens(self) -> int:
        """K when speculative decoding is on, else 0."""
        return self.num_speculative_tokens if self.speculative is not None else 0

    @property
    def torch_device(self) -> torch.device:
        """The device to run on; "auto" is CUDA when available, else the CPU."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineConfigError(f"device {self.device!r} requested but CUDA is not available")
        return torch.device(self.device)

    def compute_dtype(self, engine_dtype: str) -> torch.dtype:
        """The dtype weights, activations and KV use.

        On CUDA the engine's dtype. On the CPU always float32: bf16/fp16 matmuls there are
        slow and round differently from the references we test against.
        """
        if engine_dtype not in DTYPE_NAMES:
            raise EngineConfigError(f"unsupported engine dtype {engine_dtype!r}; expected one of {sorted(DTYPE_NAMES)}")
        import torch

        if self.torch_device.type == "cpu":
            return torch.float32
        return getattr(torch, engine_dtype)

    def resolve_max_model_len(self, model_config: Any) -> int:
        """The longest sequence (prompt + output) served: the option, capped by the model."""
        limit = int(model_config.max_position_embeddings)
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise EngineConfigError(
                f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings ({limit})"
            )
        return self.max_model_len


def add_speculative_arguments(g: Any) -> None:
    """The speculative-decoding flags (EngineConfig fields), shared with bench-llm; None = not given."""
    g.add_argument("--speculative", choices=["ngram", "draft"],
                   help="ngram: drafts looked up in the request's own tokens (prompt lookup); draft: drafts "
                        "from a smaller engine with the same tokenizer (--draft-engine)")
    g.add_argument("--num-speculative-tokens", type=int, metavar="K", help="draft tokens per step (default 4)")
    g.add_argument("--ngram-min", type=int, metavar="N", help="shortest suffix n-gram matched (default 2)")
    g.add_argument("--ngram-max", type=int, metavar="M", help="longest suffix n-gram matched (default 4)")
    g.add_argument("--draft-engine", metavar="DIR", help="the draft engine directory (--speculative draft)")
    g.add_argument("--speculative-max-batch-size", type=int, metavar="B",
                   help="no speculation while more requests run (default 8)")
    g.add_argument("--speculative-min-acceptance", type=float, metavar="A",
                   help="a request averaging fewer accepted drafts per step pauses speculating (default 0.3)")

