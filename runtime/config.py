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
_ATTENTION_BACKENDS = ("auto", "triton", "torch")


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
    max_batch_size: int = 256
    block_size: int = 32
    kv_cache_fraction: float = 0.9
    num_kv_cache_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    capacity_policy: str = "guaranteed_no_evict"
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    enforce_eager: bool = False
    attention_backend: str = "auto"
    seed: int = 0
    # GPU index of each tensor-parallel rank (rank r runs on cuda:devices[r]); None = 0..tp-1.
    devices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        device = str(self.device)
        if device.split(":")[0] not in _DEVICES:
            raise EngineConfigError(f"device must be one of {_DEVICES} (optionally 'cuda:N'), got {self.device!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise EngineConfigError(
                f"attention_backend must be one of {_ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
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
