"""Triton kernels for Kiln's GPU path (see DESIGN.md "Kernel API").

Each function takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, for tests) and has a
torch reference in kiln.runtime.attention / kiln.runtime.layers. Bad inputs raise
KernelInputError (a ValueError) with one line naming the problem; no function synchronises
with the host.
"""

from ._common import KernelInputError
from .elementwise import fused_add_rms_norm, fused_add_rms_norm_fp8, quantize_fp8, silu_and_mul, silu_and_mul_fp8
from .gemv import FASTER_UP_TO_ROWS as GEMV_FASTER_UP_TO_ROWS
from .gemv import K_MULTIPLE as GEMV_K_MULTIPLE
from .gemv import MAX_ROWS as GEMV_MAX_ROWS
from .gemv import gemv, gemv_fp8
from .paged_attention import AttentionConfig, choose_num_splits, default_config, paged_attention
from .rotary import apply_rotary, rotary_and_write_kv, write_kv_cache

__all__ = [
    "AttentionConfig",
    "GEMV_FASTER_UP_TO_ROWS",
    "GEMV_K_MULTIPLE",
    "GEMV_MAX_ROWS",
    "KernelInputError",
    "apply_rotary",
    "choose_num_splits",
    "default_config",
    "fused_add_rms_norm",
    "fused_add_rms_norm_fp8",
    "gemv",
    "gemv_fp8",
    "paged_attention",
    "quantize_fp8",
    "rotary_and_write_kv",
    "silu_and_mul",
    "silu_and_mul_fp8",
    "write_kv_cache",
]
