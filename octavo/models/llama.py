"""One config-driven decoder for Llama, Mistral, Qwen2 and Qwen3.

The variants differ only in switches read from the HF config: biases on the
q/k/v projections (Qwen2), per-head RMSNorm on q and k (Qwen3), tied
embeddings, rope scaling, and sliding-window layers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers.activation import SiluAndMul
from octavo.layers.attention import Attention, AttentionMetadata
from octavo.layers.linear import Linear, MergedLinear
from octavo.layers.quantization.base import QuantizationConfig
from octavo.layers.norm import RMSNorm
from octavo.layers.rotary import RotaryEmbedding
from octavo.models.base import CausalLM


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = _head_dim(config)
        model_type = getattr(config, "model_type", "llama")
        qkv_bias = getattr(config, "attention_bias", False) or model_type == "qwen2"
        o_bias = getattr(config, "attention_bias", False) and model_type != "qwen2"
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, bias=qkv_bias,
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias, quant_config=quant_config,
                             prefix=f"{prefix}.o_proj")
        self.use_qk_norm = model_type == "qwen3"
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim**-0.5,
            sliding_window=_sliding_window(config, layer_index),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = hidden.shape[0]
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
    def __init__(self, config, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for this architecture.")
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": size, "up": size}, bias=bias,
                                         quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = Linear(size, config.hidden_size, bias=bias, quant_config=quant_config,
                                prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int, rotary_emb: RotaryEmbedding,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index, rotary_emb, quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden, residual, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, max_position: int, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config, _head_dim(config), max_position)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, index, self.rotary_emb, quant_config, f"{prefix}.layers.{index}")
            for index in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, metadata):
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    stacked_params = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config, max_position: int, quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, quant_config, "model")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False,
                              quant_config=None if self.tie_word_embeddings else quant_config, prefix="lm_head")
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, metadata):
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)
