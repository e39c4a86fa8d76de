"""One config-driven decoder for Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Phi-3 and Aquila,
and the MoE Mixtral and Qwen2/3-MoE.

The variants differ only in switches read from the HF config: biases on the
q/k/v projections (Qwen2), per-head RMSNorm on q and k (Qwen3), tied
embeddings, rope scaling (Phi-3's LongRoPE too), sliding-window layers, Gemma's
(1 + w) RMSNorm, GeGLU, scaled embeddings, and (Gemma-2) extra norms around attention and
MLP with soft-capped attention scores and logits, and a sparse MoE feed-forward instead of
the MLP (configs with experts). Phi-3 checkpoints store q/k/v and gate/up already fused,
under the names of the fused layers here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers.activation import gated_activation
from octavo.layers.attention import Attention, AttentionMetadata
from octavo.layers.linear import Linear, MergedLinear
from octavo.layers.moe import SparseMoeBlock
from octavo.layers.quantization.base import QuantizationConfig
from octavo.layers.norm import RMSNorm
from octavo.layers.rotary import RotaryEmbedding
from octavo.layers.vocab_embedding import VocabParallelEmbedding, gather_vocab_logits
from octavo.models.base import CausalLM
from octavo.worker.parallel_state import tp_group


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _is_gemma(config) -> bool:
    return getattr(config, "model_type", "") in ("gemma", "gemma2")


def _rms_norm(config, size: int) -> RMSNorm:
    return RMSNorm(size, eps=config.rms_norm_eps, weight_offset=1.0 if _is_gemma(config) else 0.0)


def _sliding_window(config, layer_index: int) -> Optional[int]:
    """transformers 5 lists per-layer types; older configs apply the window to every layer."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_index: int, rotary_emb: RotaryEmbedding,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = _head_dim(config)
        # This tensor-parallel rank's heads (all of them on one rank).
        (_, self.num_heads), (kv_start, self.num_kv_heads) = tp_group().attention_heads(total_heads, total_kv_heads)
        model_type = getattr(config, "model_type", "llama")
        qkv_bias = (getattr(config, "attention_bias", False) or model_type == "qwen2"
                    or getattr(config, "qkv_bias", False))  # Qwen2-MoE names it qkv_bias
        o_bias = getattr(config, "attention_bias", False) and model_type != "qwen2"
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        kv_rows = (kv_start * self.head_dim, self.kv_size)
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            {"q": total_heads * self.head_dim, "k": total_kv_heads * self.head_dim, "v": total_kv_heads * self.head_dim},
            bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
            parallel="column", shard_rows={"k": kv_rows, "v": kv_rows},
        )
        self.o_proj = Linear(total_heads * self.head_dim, config.hidden_size, bias=o_bias, quant_config=quant_config,
                             prefix=f"{prefix}.o_proj", parallel="row")
        self.use_qk_norm = model_type in ("qwen3", "qwen3_moe")
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # one table shared by all layers
        # Gemma-2 scales by query_pre_attn_scalar instead of head_dim, and soft-caps the scores.
        scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=scale,
            sliding_window=_sliding_window(config, layer_index),
            logits_soft_cap=getattr(config, "attn_logit_softcapping", None),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        num_tokens = hidden.shape[0]
        if not self.use_qk_norm and self.rotary_emb.can_rotate_joint(qkv, self.head_dim):
            # CPU float32: q and k heads rotate together (see RotaryEmbedding.rotate_joint)
            heads = self.num_heads + self.num_kv_heads
            qk = self.rotary_emb.rotate_joint(positions, qkv[:, : self.q_size + self.kv_size].view(
                num_tokens, heads, self.head_dim), metadata.per_step)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            out = self.attn(q.flatten(1), k.flatten(1), qkv[:, self.q_size + self.kv_size :], metadata)
            return self.o_proj(out)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self._qk_norm_rope(positions, q, k)
        else:
            q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q.flatten(1), k.flatten(1), v, metadata)
        return self.o_proj(out)

    def _qk_norm_rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Qwen3's per-head RMSNorm of q and k, then rotary; one fused kernel on CUDA."""
        if q.is_cuda and self.q_norm.eps == self.k_norm.eps:
            from octavo.layers import fused_ops  # imported on first use: CPU runs never load triton

            if fused_ops.enabled():
                rope = self.rotary_emb
                return fused_ops.qk_norm_rope(
                    positions, q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                    rope.cos_sin_cache, rope.rotary_dim,
                )
        return self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))


class LlamaMLP(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig], prefix: str,
                 intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": size, "up": size}, bias=bias,
                                         quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
                                         parallel="column")
        self.down_proj = Linear(size, config.hidden_size, bias=bias, quant_config=quant_config,
                                prefix=f"{prefix}.down_proj", parallel="row")
        # Gemma-2 reads its GeGLU activation from hidden_activation, every other family from hidden_act.
        gemma2 = getattr(config, "model_type", "") == "gemma2"
        self.act = gated_activation(config.hidden_activation if gemma2 else getattr(config, "hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


def _num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0


def _feed_forward(config, layer_index: int, quant_config: Optional[QuantizationConfig], prefix: str) -> nn.Module:
    """The MLP, or a sparse MoE block where the config has experts (on every layer for Mixtral; Qwen
    MoE configs may keep some layers dense through ``mlp_only_layers`` and ``decoder_sparse_step``)."""
    num_experts = _num_experts(config)
    dense_layers = getattr(config, "mlp_only_layers", None) or []
    sparse_step = getattr(config, "decoder_sparse_step", 1)
    if not num_experts or layer_index in dense_layers or (layer_index + 1) % sparse_step:
        return LlamaMLP(config, quant_config, prefix)
    shared_size = getattr(config, "shared_expert_intermediate_size", 0)
    return SparseMoeBlock(
        config.hidden_size, num_experts, config.num_experts_per_tok,
        getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
        renormalize=getattr(config, "norm_topk_prob", True),  # Mixtral has no switch: it always renormalises
        activation=getattr(config, "hidden_act", "silu"),
        shared_expert=(LlamaMLP(config, quant_config, f"{prefix}.shared_expert", shared_size)
                       if shared_size else None),
    )


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int, rotary_emb: RotaryEmbedding,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index, rotary_emb, quant_config, f"{prefix}.self_attn")
        self.mlp = _feed_forward(config, layer_index, quant_config, f"{prefix}.mlp")
        self.input_layernorm = _rms_norm(config, config.hidden_size)
        self.post_attention_layernorm = _rms_norm(config, config.hidden_size)
        # Gemma-2 also normalises the attention and MLP outputs before each residual add.
        self.sandwich_norms = getattr(config, "model_type", "") == "gemma2"
        if self.sandwich_norms:
            self.pre_feedforward_layernorm = _rms_norm(config, config.hidden_size)
            self.post_feedforward_layernorm = _rms_norm(config, config.hidden_size)

    def forward(self, positions, hidden, residual, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        if self.sandwich_norms:
            hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(hidden), residual)
            return self.post_feedforward_layernorm(self.mlp(hidden)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, max_position: int, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # Gemma scales embeddings by sqrt(hidden), rounded to the model dtype as transformers does.
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5)) if _is_gemma(config) else None
        self.rotary_emb = RotaryEmbedding(config, _head_dim(config), max_position)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, index, self.rotary_emb, quant_config, f"{prefix}.layers.{index}")
            for index in range(config.num_hidden_layers)
        )
        self.norm = _rms_norm(config, config.hidden_size)

    def forward(self, input_ids, positions, metadata):
        hidden = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        positions = self.rotary_emb.cache_rows(positions, metadata)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    supports_tensor_parallel = True
    stacked_params = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config, max_position: int, quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        if quant_config is not None and _num_experts(config):
            raise ValueError(
                f"quantized weights ({quant_config.name}) are not supported for mixture-of-experts models yet: "
                "their experts are stacked full-precision tensors. Load an unquantized checkpoint "
                "(quantization auto or none)."
            )
        self.config = config
        self.model = LlamaModel(config, max_position, quant_config, "model")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False,
                              quant_config=None if self.tie_word_embeddings else quant_config, prefix="lm_head",
                              parallel="vocab")
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)  # Gemma-2

    def forward(self, input_ids, positions, metadata):
        return self.model(input_ids, positions, metadata)

    def rename_checkpoint_weight(self, name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for its MoE block

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        logits = gather_vocab_logits(self.lm_head(hidden_states), self.config.vocab_size)
        if logits is not None and self.final_logit_softcapping:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits
