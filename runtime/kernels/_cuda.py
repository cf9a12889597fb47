"""CUDA source shared by the NVRTC kernels (kernels/int4_mma.py, kernels/fp8_decode.py)."""

from __future__ import annotations


def mma_m16n8k16(ab: str) -> str:
    """``mma(d, a0, a1, a2, a3, b0, b1)``: d[0..3] += A B, PTX m16n8k16 with ``ab`` inputs ("f16" or
    "bf16"), row-major A, column-major B, fp32 accumulators."""
    return (
        "__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {\n"
        f'  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 {{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, '
        '{%8,%9}, "\n'
        '               "{%0,%1,%2,%3};"\n'
        '               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])\n'
        '               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));\n'
        "}\n"
    )
