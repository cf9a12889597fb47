"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) built from ``load_engine`` tensors.

One model class serves the four architectures: Qwen2 adds a qkv bias, Qwen3 a per-head
RMSNorm of q and k before rotary; both are read from the ModelConfig flags, never from the
architecture name. Weights are repacked at load time (gate and up projections fused into
one GEMM). The forward pass takes one flattened, unpadded token batch mixing prefill chunks
and decode tokens and has no per-sequence Python loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kiln.engine_builder.architectures import supported_architectures
from kiln.runtime.attention import AttentionMetadata, KernelSet
from kiln.runtime.fp8_kv import FP8_KV_DTYPE, layer_kv_scales
from kiln.runtime.layers import build_cos_sin_cache, rms_norm
from kiln.runtime.linear import (Linear, LinearContext, LinearMethod, MissingWeightError, UnquantizedLinear,
                                 linear_method_for)
from kiln.runtime.parallel import SINGLE_RANK, Collectives

logger = logging.getLogger(__name__)

# The builder's registry is the one list: every architecture it converts, this model runs
# (Qwen2's bias and Qwen3's q/k norm are read from the config flags, not the name).
SUPPORTED_ARCHITECTURES = tuple(supported_architectures())
__all__ = ["LlamaFamilyModel", "MissingWeightError", "ModelShape", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The engine holds a model this runtime cannot execute."""


@dataclass(frozen=True)
class ModelShape:
    """This rank's view of the model's dimensions."""

    hidden_size: int
    num_layers: int
    num_heads: int  # per rank
    num_kv_heads: int  # per rank
    head_size: int
    vocab_size: int  # real vocabulary (logits are sliced to it)
    norm_eps: float
    qk_norm: bool

    @classmethod
    def from_model_config(cls, mc: Any) -> ModelShape:
        return cls(
            hidden_size=int(mc.hidden_size),
            num_layers=int(mc.num_hidden_layers),
            num_heads=mc.num_heads_per_rank,
            num_kv_heads=mc.num_kv_heads_per_rank,
            head_size=int(mc.head_size),
            vocab_size=int(mc.vocab_size),
            norm_eps=float(mc.norm_epsilon),
            qk_norm=bool(mc.qk_norm),
        )


class DecoderLayer:
    """Pre-norm attention + gated MLP; the residual stream is carried between layers unnormed."""

    def __init__(self, weights: dict[str, Any], shape: ModelShape, ops: KernelSet, group: Collectives) -> None:
        self.shape = shape
        self.ops = ops
        self.input_norm = weights["input_layernorm"]
        self.post_norm = weights["post_layernorm"]
        self.qkv = Linear(weights["qkv"], weights.get("qkv_bias"))  # column parallel
        self.q_norm = weights.get("q_layernorm")
        self.k_norm = weights.get("k_layernorm")
        self.dense = Linear(weights["dense"], collectives=group)  # row parallel
        self.gate_up = Linear(weights["gate_up"])  # column parallel, [gate | up] of this rank
        self.down = Linear(weights["proj"], collectives=group)  # row parallel
        self.q_size = shape.num_heads * shape.head_size
        self.kv_size = shape.num_kv_heads * shape.head_size
        self.scale = shape.head_size**-0.5
        self.rotary_and_write_kv = _fused_rotary_kv(ops)
        self.kv_scales: dict[str, float] = weights["kv_scales"]  # k_scale / v_scale of an FP8 KV cache

    @property
    def linears(self) -> tuple[Linear, ...]:
        return (self.qkv, self.dense, self.gate_up, self.down)

    def attend(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        """Rotary, KV write and paged attention of the projected qkv [T, q + 2 kv]; [T, q_size].
        The cache's dtype says whether it is quantized (then the layer's scales go with it)."""
        s, ops = self.shape, self.ops
        scales = self.kv_scales if kv.dtype == FP8_KV_DTYPE else {}
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.reshape(-1, s.num_heads, s.head_size)
        k = k.reshape(-1, s.num_kv_heads, s.head_size)
        v = v.reshape(-1, s.num_kv_heads, s.head_size)
        if s.qk_norm:
            q = rms_norm(q, self.q_norm, s.norm_eps)
            k = rms_norm(k, self.k_norm, s.norm_eps)
        if self.rotary_and_write_kv is not None:  # one launch instead of two
            q = self.rotary_and_write_kv(q, k, v, positions, cos_sin, kv[0], kv[1], attn.slot_mapping, **scales)
        else:
            q, k = ops.apply_rotary(q, k, positions, cos_sin)
            ops.write_kv_cache(k, v, kv[0], kv[1], attn.slot_mapping, **scales)
        out = ops.paged_attention(
            q, kv[0], kv[1], attn.block_tables, attn.query_start_loc, attn.seq_lens,
            self.scale, attn.max_query_len, attn.max_seq_len, prefill_rows=attn.prefill_rows, **scales,
        )
        return out.reshape(-1, self.q_size)

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        kv: torch.Tensor,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.shape.norm_eps
        x, residual = self.qkv.method.norm_input(x, residual, self.input_norm, eps)
        x = self.attend(self.qkv(x), positions, cos_sin, kv, attn)
        x = self.dense(self.dense.method.prepare(x))
        x, residual = self.gate_up.method.norm_input(x, residual, self.post_norm, eps)
        x = self.down(self.down.method.act_input(self.gate_up(x)))
        return x, residual

    def small_batch(
        self, h: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """The layer for a few tokens (decode at small batch), on the residual stream h: four
        fused GEMVs plus rotary/KV write and attention, the norms, SiLU and residual adds
        inside the linears (``Linear.small``; with tensor parallelism the residual joins rank
        0's partial product before the all-reduce)."""
        eps = self.shape.norm_eps
        qkv = self.qkv.small(h, norm_weight=self.input_norm, eps=eps)
        h = self.dense.small(self.attend(qkv, positions, cos_sin, kv, attn), residual=h)
        gate_up = self.gate_up.small(h, norm_weight=self.post_norm, eps=eps)
        return self.down.small(gate_up, silu_mul=True, residual=h)


def _fused_rotary_kv(ops: KernelSet) -> Callable[..., torch.Tensor] | None:
    """The Triton kernel fusing rotary and the KV write, when the model runs on exactly the
    Triton rotary and KV-write kernels it replaces (it is not a Kernel-API op of its own)."""
    if ops.name != "triton":
        return None
    from kiln.runtime import kernels

    fused = getattr(kernels, "rotary_and_write_kv", None)
    replaces_both = ops.apply_rotary is kernels.apply_rotary and ops.write_kv_cache is kernels.write_kv_cache
    return fused if replaces_both else None


class LlamaFamilyModel:
    """Embedding -> decoder layers -> final norm -> lm_head, for one tensor-parallel rank.

    Invariants: all weights live on ``device`` in ``dtype`` (except the float32 rotary
    cache); logits are float32 of width ``shape.vocab_size`` (padding rows of lm_head are cut).
    """

    def __init__(
        self,
        model_config: Any,
        tensors: Mapping[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        ops: KernelSet | None = None,
        max_positions: int | None = None,
        group: Collectives = SINGLE_RANK,
    ) -> None:
        arch = model_config.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self.shape = ModelShape.from_model_config(model_config)
        self.device, self.dtype = device, dtype
        self.ops = ops or KernelSet()
        self.group = group
        quantization = dict(model_config.quantization)
        ctx = LinearContext(device, dtype, self.ops, quantization)
        load = _WeightLoader(tensors, ctx, linear_method_for(model_config.quant_algo))
        self.embedding = load("transformer.vocab_embedding.weight")  # replicated on every rank
        self.layers = [
            DecoderLayer(load.layer(i, self.shape.qk_norm), self.shape, self.ops, group)
            for i in range(self.shape.num_layers)
        ]
        self.final_norm = load("transformer.ln_f.weight")
        # lm_head stays in the model dtype (TensorRT-LLM excludes it from quantization); each
        # rank holds a slice of the (padded) vocabulary and the logits are gathered.
        lm_head = load.optional("lm_head.weight")
        if lm_head is None:
            if not model_config.tie_word_embeddings:
                raise MissingWeightError("engine has no lm_head.weight and does not tie word embeddings")
            lm_head = self.embedding
        self.lm_head = UnquantizedLinear.from_weight(ctx, lm_head)
        # Steps of at most this many tokens run the fused small-batch layers / lm_head GEMV.
        fused = all(lin.method.has_small for layer in self.layers for lin in layer.linears)
        self.small_batch_rows = self.ops.small_batch_rows if fused else 0
        self.small_linear_max_rows = self.ops.small_linear_max_rows if self.lm_head.has_small else 0
        if self.ops.small_linear is not None and not fused:
            logger.info("small-batch fused layers off: a linear's input width is not a multiple of %d",
                        self.ops.small_linear_k_multiple)
        positions = max(int(model_config.max_position_embeddings), max_positions or 0)
        self.cos_sin_cache = build_cos_sin_cache(
            self.shape.head_size, positions, float(model_config.rotary_base), model_config.rotary_scaling
        ).to(device)
        logger.info(
            "model %s: %d layers, %d/%d heads per rank (rank %d of %d), dtype %s, quantization %s on %s, ops %s",
            arch, self.shape.num_layers, self.shape.num_heads, self.shape.num_kv_heads, group.rank, group.world_size,
            dtype, model_config.quant_algo, device, self.ops.name,
        )

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], attn: AttentionMetadata
    ) -> torch.Tensor:
        """Final-normed hidden states [T, H] of a flattened token batch; writes its KV."""
        x = F.embedding(input_ids, self.embedding)
        if 0 < x.shape[0] <= self.small_batch_rows:
            for layer, kv in zip(self.layers, kv_caches):
                x = layer.small_batch(x, positions, self.cos_sin_cache, kv, attn)
            x, _ = self.ops.fused_add_rms_norm(x, None, self.final_norm, self.shape.norm_eps)
            return x
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.cos_sin_cache, kv, attn)
        x, _ = self.ops.fused_add_rms_norm(x, residual, self.final_norm, self.shape.norm_eps)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [S, vocab_size] of the selected hidden states [S, H] (every rank's
        vocabulary slice, gathered)."""
        head = self.lm_head
        local = head.small(hidden) if 0 < hidden.shape[0] <= self.small_linear_max_rows else head.apply(hidden)
        return self.group.all_gather(local)[:, : self.shape.vocab_size].float()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
        logits_indices: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run the batch and return logits only for ``logits_indices`` (the sampled tokens;
        None = every token, as in a decode step)."""
        hidden = self.hidden_states(input_ids, positions, kv_caches, attn)
        return self.logits(hidden if logits_indices is None else hidden[logits_indices])

    __call__ = forward


class _WeightLoader:
    """Fetches TRT-LLM-named tensors onto the device; linears become methods of the engine's
    precision, with what the model fuses (gate and up) fused."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], ctx: LinearContext, method: type[LinearMethod]) -> None:
        self.tensors, self.ctx, self.method = tensors, ctx, method

    def optional(self, name: str) -> torch.Tensor | None:
        tensor = self.tensors.get(name)
        return None if tensor is None else tensor.to(device=self.ctx.device, dtype=self.ctx.dtype).contiguous()

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.optional(name)
        if tensor is None:
            raise MissingWeightError(f"engine tensor {name!r} is missing")
        return tensor

    def linear(self, prefix: str) -> LinearMethod:
        return self.method.load(self.ctx, self.tensors.get, prefix)

    def layer(self, index: int, qk_norm: bool) -> dict[str, Any]:
        prefix = f"transformer.layers.{index}."
        weights: dict[str, Any] = {
            "input_layernorm": self(prefix + "input_layernorm.weight"),
            "post_layernorm": self(prefix + "post_layernorm.weight"),
            "qkv": self.linear(prefix + "attention.qkv"),
            "dense": self.linear(prefix + "attention.dense"),
            "proj": self.linear(prefix + "mlp.proj"),
            # mlp.fc is the activated (gate) branch, mlp.gate the up branch: [fc; gate] makes
            # one GEMM whose halves feed silu_and_mul directly.
            "gate_up": self.method.concat([self.linear(prefix + "mlp.fc"), self.linear(prefix + "mlp.gate")]),
            "kv_scales": layer_kv_scales(self.tensors, index, self.ctx.quantization),  # float32, never cast
        }
        bias = self.optional(prefix + "attention.qkv.bias")
        if bias is not None:
            weights["qkv_bias"] = bias
        if qk_norm:
            weights["q_layernorm"] = self(prefix + "attention.q_layernorm.weight")
            weights["k_layernorm"] = self(prefix + "attention.k_layernorm.weight")
        return weights
