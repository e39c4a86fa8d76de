"""GPT-2: learned positions, LayerNorm, GELU MLP, fused q/k/v stored as Conv1D."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers.activation import get_activation
from octavo.layers.attention import Attention, AttentionMetadata
from octavo.layers.linear import Linear
from octavo.layers.quantization.base import QuantizationConfig
from octavo.layers.vocab_embedding import VocabParallelEmbedding, gather_vocab_logits
from octavo.models.base import CausalLM
from octavo.worker.parallel_state import tp_group


class GPT2Attention(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        hidden = config.n_embd
        self.head_dim = hidden // config.n_head
        group = tp_group()
        (_, self.num_heads), _ = group.attention_heads(config.n_head, config.n_head)
        # The checkpoint fuses q/k/v into one tensor; across ranks each keeps its heads of all three.
        out_features = 3 * hidden if group.world_size == 1 else {"q": hidden, "k": hidden, "v": hidden}
        self.c_attn = Linear(hidden, out_features, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_attn",
                             parallel="column")
        self.c_proj = Linear(hidden, hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_proj",
                             parallel="row")
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale=scale)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).chunk(3, dim=-1)
        return self.c_proj(self.attn(q, k, v, metadata))


class GPT2MLP(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_fc",
                           parallel="column")
        self.c_proj = Linear(inner, config.n_embd, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_proj",
                             parallel="row")
        self.act = get_activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, quant_config, f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, quant_config, f"{prefix}.h.{index}") for index in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, positions, metadata):
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden = block(hidden, metadata)
        return self.ln_f(hidden)


class GPT2LMHeadModel(CausalLM):
    supports_tensor_parallel = True
    ignored_weights = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints
    # HF stores these as Conv1D ([in, out]); nn.Linear wants [out, in].
    _conv1d_weights = ("c_attn.weight", "c_proj.weight", "c_fc.weight")

    def __init__(self, config, max_position: int, quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported.")
        if max_position > config.n_positions:
            raise ValueError(
                f"max_model_len ({max_position}) exceeds GPT-2's n_positions ({config.n_positions}); lower max_model_len."
            )
        self.config = config
        self.transformer = GPT2Model(config, quant_config, "transformer")
        self.tie_word_embeddings = True
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, prefix="lm_head", parallel="vocab")
        self.lm_head.weight = self.transformer.wte.weight

    def rename_checkpoint_weight(self, name: str) -> Optional[str]:
        if name.startswith("transformer.") or name.startswith("lm_head."):
            return name
        return "transformer." + name  # the original checkpoints have no prefix

    def transform_checkpoint_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if name.endswith(self._conv1d_weights) else tensor

    def forward(self, input_ids, positions, metadata):
        return self.transformer(input_ids, positions, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return gather_vocab_logits(self.lm_head(hidden_states), self.config.vocab_size)
