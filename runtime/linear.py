"""How a linear layer computes: one method object per linear owns its weights and its matmul.

The model never branches on precision. Each linear holds a ``LinearMethod`` (chosen once, from
the engine's ``quant_algo``, by ``linear_method_for``) that

  * makes its input from what the layer has: ``norm_input`` (add + RMSNorm of the residual
    stream), ``act_input`` (SiLU-and-mul of the gate/up product) or ``prepare`` (any other
    activation, e.g. attention's output). A method whose GEMM takes quantized activations
    quantizes there, fused into the kernel that produces the activation; the unquantized
    method returns the activation as is;
  * multiplies: ``apply`` (any batch) and ``small`` (the fused small-batch GEMV of decode,
    which takes the raw activation and does norm / SiLU / residual inside the kernel).

``Linear`` adds the tensor-parallel wiring around a method: column-parallel linears keep their
output sharded; row-parallel ones sum their partial products over the ranks (all-reduce). In
the fused small-batch path the residual add sits inside the GEMV: rank 0 alone adds the
residual to its partial product before the all-reduce, so the sum counts it once.

Weights are stored as the engine holds them (TensorRT-LLM names, this rank's shard); methods
may repack them at load time for their kernels (``process_weights``), never the builder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kiln.runtime.attention import KernelSet
from kiln.runtime.parallel import SINGLE_RANK, Collectives

TensorGetter = Callable[[str], "torch.Tensor | None"]


class MissingWeightError(KeyError):
    """A tensor the model needs is absent from the engine."""


class UnsupportedQuantizationError(ValueError):
    """The engine's quantization has no linear method in this runtime."""


@dataclass(frozen=True)
class LinearContext:
    """What every method of one model is built with: where weights go, how they compute, and
    the engine's quantization settings (config.json ``quantization``, TensorRT-LLM names)."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype (activations, unquantized weights, outputs)
    ops: KernelSet
    quantization: dict[str, Any] = field(default_factory=dict)


class LinearMethod:
    """One linear's weights and matmul, for one precision; y = x @ W^T (+ bias).

    Invariants: ``in_features``/``out_features`` are this rank's shard's; ``apply`` and
    ``small`` return the context's compute dtype; whatever ``norm_input``/``act_input``/
    ``prepare`` return is exactly what ``apply`` accepts.
    """

    quant_algo: ClassVar[str | None] = None

    def __init__(self, ctx: LinearContext, in_features: int, out_features: int) -> None:
        self.ctx, self.ops = ctx, ctx.ops
        self.in_features, self.out_features = in_features, out_features

    # ----- construction
    @classmethod
    def load(cls, ctx: LinearContext, get: TensorGetter, prefix: str) -> LinearMethod:
        """The method of the engine tensors named ``{prefix}.weight`` (+ its scales)."""
        raise NotImplementedError

    @classmethod
    def concat(cls, parts: Sequence[LinearMethod]) -> LinearMethod:
        """One method computing the parts' outputs side by side (gate and up into one GEMM)."""
        raise NotImplementedError

    # ----- inputs
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input ``apply`` takes, from an activation in the compute dtype."""
        return x

    def norm_input(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of ``apply`` made of rms_norm(x + residual), the new residual x + residual)."""
        normed, residual = self.ops.fused_add_rms_norm(x, residual, norm_weight, eps)
        return self.prepare(normed), residual

    def act_input(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Input of ``apply`` made of silu(gate) * up, for gate_up = [gate | up]."""
        return self.prepare(self.ops.silu_and_mul(gate_up))

    # ----- products
    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def has_small(self) -> bool:
        """Whether ``small`` (the fused small-batch GEMV) can run this linear."""
        return False

    def small(self, x: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
              silu_mul: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x' @ W^T (+ residual) for a few rows, x' = rms_norm(x) (``norm_weight``) or
        silu_and_mul(x) (``silu_mul``) or x; the prologue and epilogue round like the unfused
        chain (layers.fused_linear is the reference)."""
        raise NotImplementedError


class UnquantizedLinear(LinearMethod):
    """Weights in the compute dtype; ``F.linear`` (cuBLAS) and the Triton GEMV for few rows."""

    def __init__(self, ctx: LinearContext, weight: torch.Tensor) -> None:
        super().__init__(ctx, weight.shape[1], weight.shape[0])
        self.weight = weight

    @classmethod
    def load(cls, ctx: LinearContext, get: TensorGetter, prefix: str) -> UnquantizedLinear:
        return cls(ctx, _to(ctx, _required(get, f"{prefix}.weight")))

    @classmethod
    def from_weight(cls, ctx: LinearContext, weight: torch.Tensor) -> UnquantizedLinear:
        return cls(ctx, _to(ctx, weight))

    @classmethod
    def concat(cls, parts: Sequence[LinearMethod]) -> UnquantizedLinear:
        return cls(parts[0].ctx, torch.cat([p.weight for p in parts]))  # type: ignore[attr-defined]

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)

    @property
    def has_small(self) -> bool:
        ops = self.ops
        return ops.small_linear is not None and self.in_features % ops.small_linear_k_multiple == 0

    def small(self, x: torch.Tensor, **fused: Any) -> torch.Tensor:
        return self.ops.small_linear(x, self.weight, **fused)


LINEAR_METHODS: dict[str | None, type[LinearMethod]] = {None: UnquantizedLinear}
"""quant_algo (config.json ``quantization.quant_algo``) -> the method its linears use."""


def linear_method_for(quant_algo: str | None) -> type[LinearMethod]:
    import kiln.runtime.quant  # noqa: F401  (registers the quantized methods: runtime/quant/)

    method = LINEAR_METHODS.get(quant_algo)
    if method is None:
        supported = ", ".join(sorted(str(k) for k in LINEAR_METHODS))
        raise UnsupportedQuantizationError(
            f"quantization {quant_algo!r} is not supported by this runtime (supported: {supported})")
    return method


class Linear:
    """A linear layer of one rank: a method (the precision) and its place in tensor parallelism.

    ``reduce`` is None for a column-parallel linear (output stays sharded) and the group's
    all-reduce for a row-parallel one. A bias is added after the reduction (counted once).
    """

    def __init__(self, method: LinearMethod, bias: torch.Tensor | None = None,
                 collectives: Collectives | None = None) -> None:
        self.method, self.bias = method, bias
        self.collectives = collectives if collectives is not None and collectives.world_size > 1 else None

    @property
    def out_features(self) -> int:
        return self.method.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x as made by the method's ``prepare`` / ``norm_input`` / ``act_input``."""
        if self.collectives is None:
            return self.method.apply(x, self.bias)
        y = self.collectives.all_reduce(self.method.apply(x))
        return y if self.bias is None else y + self.bias

    def small(self, x: torch.Tensor, *, residual: torch.Tensor | None = None, **prologue: Any) -> torch.Tensor:
        """The fused small-batch product (raw activation in; see ``LinearMethod.small``)."""
        group = self.collectives
        if group is None:
            y = self.method.small(x, residual=residual, **prologue)
        else:  # the residual joins rank 0's partial product: the all-reduce then counts it once
            y = group.all_reduce(self.method.small(x, residual=residual if group.is_first_rank else None, **prologue))
        return y if self.bias is None else y + self.bias


def _required(get: TensorGetter, name: str) -> torch.Tensor:
    tensor = get(name)
    if tensor is None:
        raise MissingWeightError(f"engine tensor {name!r} is missing")
    return tensor


def _to(ctx: LinearContext, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(device=ctx.device, dtype=ctx.dtype).contiguous()
