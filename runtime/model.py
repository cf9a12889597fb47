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

from kiln.runtime.attention import AttentionMetadata, KernelSet
from kiln.runtime.layers import (
    Collective,
    ColumnParallelLinear,
    RowParallelLinear,
    build_cos_sin_cache,
    identity_collective,
    rms_norm,
)

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class UnsupportedModelError(ValueError):
    """The engine holds a model this runtime cannot execute."""


class MissingWeightError(KeyError):
    """A tensor the model needs is absent from the engine."""


def config_value(model_config: Any, name: str) -> Any:
    """Read a ModelConfig value that may be exposed as a method or a plain attribute."""
    value = getattr(model_config, name)
    return value() if callable(value) else value


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
            num_heads=int(config_value(mc, "num_heads_per_rank")),
            num_kv_heads=int(config_value(mc, "num_kv_heads_per_rank")),
            head_size=int(mc.head_size),
            vocab_size=int(mc.vocab_size),
            norm_eps=float(mc.norm_epsilon),
            qk_norm=bool(mc.qk_norm),
        )


class DecoderLayer:
    """Pre-norm attention + gated MLP; the residual stream is carried between layers unnormed."""

    def __init__(self, weights: dict[str, torch.Tensor], shape: ModelShape, ops: KernelSet, all_reduce: Collective):
        self.shape = shape
        self.ops = ops
        self.input_norm = weights["input_layernorm"]
        self.post_norm = weights["post_layernorm"]
        self.qkv = ColumnParallelLinear(weights["qkv"], weights.get("qkv_bias"))
        self.q_norm = weights.get("q_layernorm")
        self.k_norm = weights.get("k_layernorm")
        self.dense = RowParallelLinear(weights["dense"], all_reduce)
        self.gate_up = ColumnParallelLinear(weights["gate_up"])
        self.down = RowParallelLinear(weights["proj"], all_reduce)
        self.q_size = shape.num_heads * shape.head_size
        self.kv_size = shape.num_kv_heads * shape.head_size
        self.scale = shape.head_size**-0.5
        self.rotary_and_write_kv = _fused_rotary_kv(ops)

    def attention(
        self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        return self.dense(self.attend(self.qkv(x), positions, cos_sin, kv, attn))

    def attend(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        """Rotary, KV write and paged attention of the projected qkv [T, q + 2 kv]; [T, q_size]."""
        s, ops = self.shape, self.ops
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.reshape(-1, s.num_heads, s.head_size)
        k = k.reshape(-1, s.num_kv_heads, s.head_size)
        v = v.reshape(-1, s.num_kv_heads, s.head_size)
        if s.qk_norm:
            q = rms_norm(q, self.q_norm, s.norm_eps)
            k = rms_norm(k, self.k_norm, s.norm_eps)
        if self.rotary_and_write_kv is not None:  # one launch instead of two
            q = self.rotary_and_write_kv(q, k, v, positions, cos_sin, kv[0], kv[1], attn.slot_mapping)
        else:
            q, k = ops.apply_rotary(q, k, positions, cos_sin)
            ops.write_kv_cache(k, v, kv[0], kv[1], attn.slot_mapping)
        out = ops.paged_attention(
            q, kv[0], kv[1], attn.block_tables, attn.query_start_loc, attn.seq_lens,
            self.scale, attn.max_query_len, attn.max_seq_len,
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
        x, residual = self.ops.fused_add_rms_norm(x, residual, self.input_norm, eps)
        x = self.attention(x, positions, cos_sin, kv, attn)
        x, residual = self.ops.fused_add_rms_norm(x, residual, self.post_norm, eps)
        x = self.down(self.ops.silu_and_mul(self.gate_up(x)))
        return x, residual

    def small_batch(
        self, h: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv: torch.Tensor,
        attn: AttentionMetadata, linear: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """The layer for a few tokens (decode at small batch), on the residual stream h:
        five launches plus attention, the norms, SiLU and residual adds fused into the
        linears (``linear`` is ``KernelSet.small_linear``). Single rank only: a row-parallel
        linear's all-reduce must come before the residual add."""
        eps = self.shape.norm_eps
        qkv = linear(h, self.qkv.weight, norm_weight=self.input_norm, eps=eps)
        if self.qkv.bias is not None:
            qkv = qkv + self.qkv.bias
        h = linear(self.attend(qkv, positions, cos_sin, kv, attn), self.dense.weight, residual=h)
        gate_up = linear(h, self.gate_up.weight, norm_weight=self.post_norm, eps=eps)
        return linear(gate_up, self.down.weight, silu_mul=True, residual=h)


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
        all_reduce: Collective = identity_collective,
        all_gather: Collective = identity_collective,
    ) -> None:
        arch = model_config.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        if getattr(model_config, "quant_algo", None):
            raise UnsupportedModelError(f"quantized engines ({model_config.quant_algo}) are not supported by this runtime yet")
        self.shape = ModelShape.from_model_config(model_config)
        self.device, self.dtype = device, dtype
        self.ops = ops or KernelSet()
        self.all_gather = all_gather
        # The fused small-batch layer adds the residual right after each row-parallel linear,
        # which is only right when there is no all-reduce in between (one rank).
        self.small_batch_rows = self.ops.small_batch_rows if all_reduce is identity_collective else 0
        load = _WeightLoader(tensors, device, dtype)
        self.embedding = load("transformer.vocab_embedding.weight")
        self.layers = [
            DecoderLayer(load.layer(i, self.shape.qk_norm), self.shape, self.ops, all_reduce)
            for i in range(self.shape.num_layers)
        ]
        widths = (self.shape.hidden_size, self.layers[0].q_size, self.layers[0].gate_up.weight.shape[0] // 2)
        self.small_linear_max_rows = self.ops.small_linear_max_rows
        if self.ops.small_linear is not None and any(w % self.ops.small_linear_k_multiple for w in widths):
            logger.info("small-batch GEMV off: linear input widths %s are not multiples of %d",
                        widths, self.ops.small_linear_k_multiple)
            self.small_batch_rows = self.small_linear_max_rows = 0
        self.final_norm = load("transformer.ln_f.weight")
        self.lm_head = load.optional("lm_head.weight")
        if self.lm_head is None:
            if not model_config.tie_word_embeddings:
                raise MissingWeightError("engine has no lm_head.weight and does not tie word embeddings")
            self.lm_head = self.embedding
        positions = max(int(model_config.max_position_embeddings), max_positions or 0)
        self.cos_sin_cache = build_cos_sin_cache(
            self.shape.head_size, positions, float(model_config.rotary_base), model_config.rotary_scaling
        ).to(device)
        logger.info(
            "model %s: %d layers, %d/%d heads per rank, dtype %s on %s, ops %s",
            arch, self.shape.num_layers, self.shape.num_heads, self.shape.num_kv_heads, dtype, device, self.ops.name,
        )

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], attn: AttentionMetadata
    ) -> torch.Tensor:
        """Final-normed hidden states [T, H] of a flattened token batch; writes its KV."""
        x = F.embedding(input_ids, self.embedding)
        if 0 < x.shape[0] <= self.small_batch_rows:
            linear = self.ops.small_linear
            for layer, kv in zip(self.layers, kv_caches):
                x = layer.small_batch(x, positions, self.cos_sin_cache, kv, attn, linear)
            x, _ = self.ops.fused_add_rms_norm(x, None, self.final_norm, self.shape.norm_eps)
            return x
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.cos_sin_cache, kv, attn)
        x, _ = self.ops.fused_add_rms_norm(x, residual, self.final_norm, self.shape.norm_eps)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [S, vocab_size] of the selected hidden states [S, H]."""
        if 0 < hidden.shape[0] <= self.small_linear_max_rows:
            logits = self.all_gather(self.ops.small_linear(hidden, self.lm_head))
        else:
            logits = self.all_gather(F.linear(hidden, self.lm_head))
        return logits[:, : self.shape.vocab_size].float()

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
    """Fetches TRT-LLM-named tensors onto the device and repacks what the model fuses."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.tensors, self.device, self.dtype = tensors, device, dtype

    def optional(self, name: str) -> torch.Tensor | None:
        tensor = self.tensors.get(name)
        return None if tensor is None else tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.optional(name)
        if tensor is None:
            raise MissingWeightError(f"engine tensor {name!r} is missing")
        return tensor

    def layer(self, index: int, qk_norm: bool) -> dict[str, torch.Tensor]:
        prefix = f"transformer.layers.{index}."
        weights = {
            "input_layernorm": self(prefix + "input_layernorm.weight"),
            "post_layernorm": self(prefix + "post_layernorm.weight"),
            "qkv": self(prefix + "attention.qkv.weight"),
            "dense": self(prefix + "attention.dense.weight"),
            "proj": self(prefix + "mlp.proj.weight"),
            # mlp.fc is the activated (gate) branch, mlp.gate the up branch: [fc; gate] makes
            # one GEMM whose halves feed silu_and_mul directly.
            "gate_up": torch.cat((self(prefix + "mlp.fc.weight"), self(prefix + "mlp.gate.weight"))),
        }
        bias = self.optional(prefix + "attention.qkv.bias")
        if bias is not None:
            weights["qkv_bias"] = bias
        if qk_norm:
            weights["q_layernorm"] = self(prefix + "attention.q_layernorm.weight")
            weights["k_layernorm"] = self(prefix + "attention.k_layernorm.weight")
        return weights
