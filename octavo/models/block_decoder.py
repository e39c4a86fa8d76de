"""One config-driven LayerNorm decoder for GPT-J, GPT-BigCode, Falcon, BLOOM and Phi-2.

These families share a shape the Llama decoder does not have: LayerNorm with bias, a plain
(not gated) MLP, biases almost everywhere, and either a sequential block (norm, attention,
add, norm, MLP, add) or a parallel one where attention and MLP read the same input and their
outputs join the residual in one add. They differ in switches: positions (rotary, partial or
interleaved; learned; ALiBi), one or two norms in a parallel block, multi-query or grouped
K/V, and a few extras (an embedding LayerNorm, q/k LayerNorm, an lm_head bias). A family
describes itself as a ``BlockSpec`` and maps its checkpoint names onto the modules here; see
``octavo.models.block_families``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from octavo.layers.activation import get_activation
from octavo.layers.alibi import alibi_slopes
from octavo.layers.attention import Attention, AttentionMetadata
from octavo.layers.linear import Linear
from octavo.layers.quantization.base import QuantizationConfig
from octavo.layers.rotary import RotaryEmbedding
from octavo.layers.vocab_embedding import VocabParallelEmbedding, gather_vocab_logits
from octavo.models.base import CausalLM
from octavo.worker.parallel_state import tp_group


# (in_features, out_features or shard sizes, bias, module path, tensor-parallel mode, shard rows)
# -> the layer; see ``BlockDecoderForCausalLM.make_linear``.
LinearFactory = Callable[..., Linear]


@dataclass(frozen=True)
class BlockSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    activation: str
    # "rotary", "learned" (an embedding table per position) or "alibi".
    positions: str
    parallel: bool = False  # attention and MLP both read the block input
    parallel_norms: bool = False  # ... each through its own LayerNorm (Falcon's new layout)
    residual_from_norm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    embedding_norm: bool = False  # LayerNorm right after the embeddings (BLOOM)
    qk_norm: bool = False  # per-head LayerNorm on q and k before rotary (Phi-2's qk_layernorm)
    rotary_dim: Optional[int] = None  # None: the config's partial_rotary_factor of head_dim
    rotary_interleaved: bool = False
    alibi_scale: float = 1.0  # multiplies the ALiBi slopes (Falcon-RW scales its bias like the scores)
    max_learned_positions: int = 0
    attention_scale: Optional[float] = None  # None: 1 / sqrt(head_dim)
    # Row order of a checkpoint's fused q/k/v matrix, see ``fused_qkv_to_blocks``.
    fused_qkv_layout: str = "blocks"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class BlockAttention(nn.Module):
    def __init__(self, spec: BlockSpec, rotary_emb: Optional[RotaryEmbedding], linear: LinearFactory,
                 path: str) -> None:
        super().__init__()
        self.head_dim = head_dim = spec.head_dim
        # This tensor-parallel rank's heads (all of them on one rank); K/V heads are split too, or
        # replicated where there are fewer of them than ranks (multi-query models).
        (head_start, self.num_heads), (kv_start, self.num_kv_heads) = tp_group().attention_heads(
            spec.num_heads, spec.num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        kv_rows = (kv_start * head_dim, self.kv_size)
        self.qkv_proj = linear(spec.hidden_size, {"q": spec.num_heads * head_dim, "k": spec.num_kv_heads * head_dim,
                                                  "v": spec.num_kv_heads * head_dim},
                               spec.qkv_bias, f"{path}.qkv_proj", "column", {"k": kv_rows, "v": kv_rows})
        self.out_proj = linear(spec.num_heads * head_dim, spec.hidden_size, spec.out_bias, f"{path}.out_proj", "row")
        self.qk_norm = spec.qk_norm
        if self.qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=spec.norm_eps)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=spec.norm_eps)
        self.rotary_emb = rotary_emb  # one table shared by all layers
        slopes = None
        if spec.positions == "alibi":  # each head's slope depends on its index among all heads
            slopes = alibi_slopes(spec.num_heads)[head_start:head_start + self.num_heads] * spec.alibi_scale
        scale = spec.attention_scale if spec.attention_scale is not None else self.head_dim**-0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=scale, alibi_slopes=slopes)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm or self.rotary_emb is not None:
            num_tokens = hidden.shape[0]
            q = q.reshape(num_tokens, self.num_heads, self.head_dim)
            k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rotary_emb is not None:
                q, k = self.rotary_emb(positions, q, k)
            q, k = q.flatten(1), k.flatten(1)
        return self.out_proj(self.attn(q, k, v, metadata))


class BlockMLP(nn.Module):
    def __init__(self, spec: BlockSpec, linear: LinearFactory, path: str) -> None:
        super().__init__()
        self.fc_in = linear(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, f"{path}.fc_in", "column")
        self.fc_out = linear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, f"{path}.fc_out", "row")
        self.act = get_activation(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class DecoderBlock(nn.Module):
    def __init__(self, spec: BlockSpec, rotary_emb: Optional[RotaryEmbedding], linear: LinearFactory,
                 path: str) -> None:
        super().__init__()
        self.parallel = spec.parallel
        self.residual_from_norm = spec.residual_from_norm
        self.input_norm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
        self.attn = BlockAttention(spec, rotary_emb, linear, f"{path}.attn")
        # Sequential blocks normalise again before the MLP; parallel ones only with parallel_norms.
        self.mlp_norm = (nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
                         if not spec.parallel or spec.parallel_norms else None)
        self.mlp = BlockMLP(spec, linear, f"{path}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        normed = self.input_norm(hidden)
        attn_out = self.attn(positions, normed, metadata)
        if self.parallel:
            mlp_out = self.mlp(normed if self.mlp_norm is None else self.mlp_norm(hidden))
            return hidden + (attn_out + mlp_out)
        hidden = (normed if self.residual_from_norm else hidden) + attn_out
        normed = self.mlp_norm(hidden)
        return (normed if self.residual_from_norm else hidden) + self.mlp(normed)


class BlockModel(nn.Module):
    def __init__(self, config, spec: BlockSpec, max_position: int, linear: LinearFactory) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.embed_positions = (nn.Embedding(spec.max_learned_positions, spec.hidden_size)
                                if spec.positions == "learned" else None)
        self.embed_norm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps) if spec.embedding_norm else None
        self.rotary_emb = None
        if spec.positions == "rotary":
            self.rotary_emb = RotaryEmbedding(config, spec.head_dim, max_position, rotary_dim=spec.rotary_dim,
                                              interleaved=spec.rotary_interleaved)
        self.layers = nn.ModuleList(DecoderBlock(spec, self.rotary_emb, linear, f"model.layers.{index}")
                                    for index in range(spec.num_layers))
        self.final_norm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(positions)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        if self.rotary_emb is not None:
            positions = self.rotary_emb.cache_rows(positions, metadata)
        for layer in self.layers:
            hidden = layer(positions, hidden, metadata)
        return self.final_norm(hidden)


def fused_qkv_to_blocks(tensor: torch.Tensor, layout: str, num_heads: int, num_kv_heads: int,
                        head_dim: int) -> torch.Tensor:
    """Reorder the rows of a fused q/k/v weight or bias into ``[q heads | k heads | v heads]``.

    ``layout`` names the checkpoint's row order: ``"blocks"`` (already so: BigCode and Falcon
    multi-query), ``"per_head"`` (``[head, (q, k, v), dim]``: BLOOM, multi-head Falcon and
    BigCode) or ``"grouped"`` (``[kv head, (its q heads..., k, v), dim]``: Falcon's new layout).
    """
    rest = tensor.shape[1:]
    if layout == "blocks":
        return tensor
    if layout == "per_head":
        rows = tensor.reshape(num_heads, 3, head_dim, *rest)
        q, k, v = rows[:, 0], rows[:, 1], rows[:, 2]
    elif layout == "grouped":
        rows = tensor.reshape(num_kv_heads, num_heads // num_kv_heads + 2, head_dim, *rest)
        q, k, v = rows[:, :-2], rows[:, -2], rows[:, -1]
    else:
        raise ValueError(f"unknown fused qkv layout {layout!r}.")
    return torch.cat([part.reshape(-1, *rest) for part in (q, k, v)])


def _replace_segments(name: str, old: str, new: str) -> str:
    """Replace the dotted path ``old`` by ``new`` where it stands as whole segments of ``name``."""
    return f".{name}.".replace(f".{old}.", f".{new}.")[1:-1]


# For checkpoints that keep q, k and v apart (GPT-J, Phi): fused into attn.qkv_proj on loading.
SEPARATE_QKV = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}


class BlockDecoderForCausalLM(CausalLM):
    """Base of the LayerNorm-decoder families. A subclass gives ``block_spec(config)``, the
    ``checkpoint_prefix`` its checkpoints put before every name but the lm_head's (optional when
    loading), and ``checkpoint_renames()``: (checkpoint path, module path) pairs of dotted
    segments, applied in order when loading and backwards when naming a missing tensor. A fused
    q/k/v matrix is renamed to ``attn.qkv_proj`` and reordered by the spec's ``fused_qkv_layout``;
    separate ``q_proj``/``k_proj``/``v_proj`` need ``stacked_params = SEPARATE_QKV``.

    Projections are ``Linear`` layers (``make_linear``) known to a quantization config by their
    checkpoint names: quantized checkpoints load where q/k/v are stored apart (GPT-J, Phi-2), and
    online FP8 works for every family; a fused q/k/v stored quantized is refused by the layer."""

    checkpoint_prefix = "transformer."
    supports_tensor_parallel = True

    @classmethod
    def block_spec(cls, config) -> BlockSpec:
        raise NotImplementedError

    def checkpoint_renames(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def __init__(self, config, max_position: int, quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.spec = spec = self.block_spec(config)
        if spec.positions == "learned" and max_position > spec.max_learned_positions:
            raise ValueError(
                f"max_model_len ({max_position}) exceeds the model's {spec.max_learned_positions} learned "
                "positions; lower max_model_len."
            )
        self._renames = self.checkpoint_renames()
        self.quant_config = quant_config
        self.model = BlockModel(config, spec, max_position, self.make_linear)
        self.tie_word_embeddings = spec.tie_word_embeddings
        # Split by vocabulary rows across tensor-parallel ranks, gathered where sampling runs.
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, spec.lm_head_bias, prefix="lm_head", parallel="vocab")
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_linear(self, in_features: int, out_features: Union[int, dict[str, int]], bias: bool, path: str,
                    parallel: str = "replicated", shard_rows: Optional[dict[str, tuple[int, int]]] = None) -> Linear:
        """A projection at module ``path``, split across tensor-parallel ranks as ``parallel`` says;
        the quantization config knows it by its checkpoint name."""
        return Linear(in_features, out_features, bias, self.quant_config, prefix=self.checkpoint_name(path),
                      parallel=parallel, shard_rows=shard_rows)

    def rename_checkpoint_weight(self, name: str) -> str:
        if name.startswith("lm_head."):
            return name
        name = name.removeprefix(self.checkpoint_prefix)
        for checkpoint_path, module_path in self._renames:
            name = _replace_segments(name, checkpoint_path, module_path)
        return "model." + name

    def checkpoint_name(self, name: str) -> str:
        if name.startswith("lm_head."):
            return name
        name = name.removeprefix("model.")
        for checkpoint_path, module_path in reversed(self._renames):
            name = _replace_segments(name, module_path, checkpoint_path)
        return self.checkpoint_prefix + name

    def transform_checkpoint_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # Only full-precision rows reorder; the layer refuses a fused q/k/v stored quantized.
        full_precision = tensor.is_floating_point() and tensor.element_size() > 1
        if ".qkv_proj." in name and name.rpartition(".")[2] in ("weight", "bias") and full_precision:
            spec = self.spec
            return fused_qkv_to_blocks(tensor, spec.fused_qkv_layout, spec.num_heads, spec.num_kv_heads,
                                       spec.head_dim)
        return tensor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return gather_vocab_logits(self.lm_head(hidden_states), self.spec.vocab_size)
