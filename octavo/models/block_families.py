"""The LayerNorm-decoder families: each reads its HF config into a ``BlockSpec`` and maps its
checkpoint names onto ``octavo.models.block_decoder``'s modules."""

from __future__ import annotations

from octavo.models.block_decoder import SEPARATE_QKV, BlockDecoderForCausalLM, BlockSpec


class GPTJForCausalLM(BlockDecoderForCausalLM):
    """Parallel block on one LayerNorm, interleaved rotary on the first ``rotary_dim`` dims,
    no attention biases, an lm_head bias."""

    ignored_weights = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints
    stacked_params = SEPARATE_QKV

    def checkpoint_renames(self) -> list[tuple[str, str]]:
        return [("wte", "embed_tokens"), ("h", "layers"), ("ln_1", "input_norm"), ("ln_f", "final_norm")]

    @classmethod
    def block_spec(cls, config) -> BlockSpec:
        return BlockSpec(
            hidden_size=config.n_embd, num_layers=config.n_layer, num_heads=config.n_head,
            num_kv_heads=config.n_head, intermediate_size=config.n_inner or 4 * config.n_embd,
            vocab_size=config.vocab_size, norm_eps=config.layer_norm_epsilon,
            activation=config.activation_function, positions="rotary", parallel=True,
            qkv_bias=False, out_bias=False, lm_head_bias=True,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rotary_dim=config.rotary_dim or config.n_embd // config.n_head, rotary_interleaved=True,
        )


class GPTBigCodeForCausalLM(BlockDecoderForCausalLM):
    """GPT-2's block with multi-query attention (one K/V head) in a fused ``c_attn`` (nn.Linear,
    not GPT-2's Conv1D), learned positions, tied embeddings."""

    ignored_weights = (".attn.bias", ".attn.masked_bias")

    def checkpoint_renames(self) -> list[tuple[str, str]]:
        return [
            ("wte", "embed_tokens"), ("wpe", "embed_positions"), ("h", "layers"), ("ln_1", "input_norm"),
            ("ln_2", "mlp_norm"), ("attn.c_attn", "attn.qkv_proj"), ("attn.c_proj", "attn.out_proj"),
            ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out"), ("ln_f", "final_norm"),
        ]

    @classmethod
    def block_spec(cls, config) -> BlockSpec:
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-BigCode with add_cross_attention is an encoder-decoder; it is not supported.")
        multi_query = bool(config.multi_query)
        head_dim = config.n_embd // config.n_head
        return BlockSpec(
            hidden_size=config.n_embd, num_layers=config.n_layer, num_heads=config.n_head,
            num_kv_heads=1 if multi_query else config.n_head,
            intermediate_size=config.n_inner or 4 * config.n_embd, vocab_size=config.vocab_size,
            norm_eps=config.layer_norm_epsilon, activation=config.activation_function, positions="learned",
            max_learned_positions=config.n_positions,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
            attention_scale=head_dim**-0.5 if config.scale_attn_weights else 1.0,
            fused_qkv_layout="blocks" if multi_query else "per_head",
        )


def _falcon_bloom_renames(norms: tuple[str, str]) -> list[tuple[str, str]]:
    """Falcon and BLOOM share their names but for the two LayerNorms of a block."""
    return [
        ("word_embeddings", "embed_tokens"), ("word_embeddings_layernorm", "embed_norm"), ("h", "layers"),
        (norms[0], "input_norm"), (norms[1], "mlp_norm"),
        ("self_attention.query_key_value", "attn.qkv_proj"), ("self_attention.dense", "attn.out_proj"),
        ("mlp.dense_h_to_4h", "mlp.fc_in"), ("mlp.dense_4h_to_h", "mlp.fc_out"), ("ln_f", "final_norm"),
    ]


class FalconForCausalLM(BlockDecoderForCausalLM):
    """Both decoder layouts. The new one (40B/180B): parallel block with a LayerNorm per branch
    (or one, ``num_ln_in_parallel_attn=1``) and grouped K/V in the fused qkv. The old one (7B,
    RW): one K/V head (``multi_query``) or per-head q/k/v, a parallel block on one LayerNorm or a
    sequential one (``parallel_attn=False``), rotary or ALiBi positions."""

    def checkpoint_renames(self) -> list[tuple[str, str]]:
        two_norms = self.spec.parallel_norms
        return _falcon_bloom_renames(("ln_attn", "ln_mlp") if two_norms else ("input_layernorm", "post_attention_layernorm"))

    @classmethod
    def block_spec(cls, config) -> BlockSpec:
        new_layout = bool(config.new_decoder_architecture)
        num_heads = config.num_attention_heads
        head_dim = config.hidden_size // num_heads
        if new_layout:
            num_kv_heads, qkv_layout = config.num_kv_heads, "grouped"
        elif config.multi_query:
            num_kv_heads, qkv_layout = 1, "blocks"
        else:
            num_kv_heads, qkv_layout = num_heads, "per_head"
        bias = bool(config.bias)
        return BlockSpec(
            hidden_size=config.hidden_size, num_layers=config.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=num_kv_heads, intermediate_size=config.ffn_hidden_size or 4 * config.hidden_size,
            vocab_size=config.vocab_size, norm_eps=config.layer_norm_epsilon, activation=config.activation,
            positions="alibi" if config.alibi else "rotary",
            parallel=new_layout or bool(config.parallel_attn),
            parallel_norms=new_layout and config.num_ln_in_parallel_attn in (None, 2),
            qkv_bias=bias, out_bias=bias, mlp_bias=bias,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
            alibi_scale=head_dim**-0.5,  # transformers adds the bias before scaling the scores
            fused_qkv_layout=qkv_layout,
        )


class BloomForCausalLM(BlockDecoderForCausalLM):
    """Sequential block, ALiBi instead of positions, a LayerNorm on the embeddings, per-head fused
    q/k/v, tied embeddings."""

    def checkpoint_renames(self) -> list[tuple[str, str]]:
        return _falcon_bloom_renames(("input_layernorm", "post_attention_layernorm"))

    @classmethod
    def block_spec(cls, config) -> BlockSpec:
        return BlockSpec(
            hidden_size=config.hidden_size, num_layers=config.n_layer, num_heads=config.n_head,
            num_kv_heads=config.n_head, intermediate_size=4 * config.hidden_size, vocab_size=config.vocab_size,
            norm_eps=config.layer_norm_epsilon, activation="gelu_pytorch_tanh", positions="alibi",
            residual_from_norm=bool(config.apply_residual_connection_post_layernorm),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
            embedding_norm=True, fused_qkv_layout="per_head",
        )


class PhiForCausalLM(BlockDecoderForCausalLM):
    """Phi-1/1.5/2: parallel block on one LayerNorm, partial rotary, biases everywhere including
    the lm_head, optional LayerNorm on q and k."""

    checkpoint_prefix = "model."
    stacked_params = SEPARATE_QKV

    def checkpoint_renames(self) -> list[tuple[str, str]]:
        return [
            ("input_layernorm", "input_norm"), ("self_attn", "attn"), ("attn.dense", "attn.out_proj"),
            ("attn.q_layernorm", "attn.q_norm"), ("attn.k_layernorm", "attn.k_norm"),
            ("mlp.fc1", "mlp.fc_in"), ("mlp.fc2", "mlp.fc_out"), ("final_layernorm", "final_norm"),
        ]

    @classmethod
    def block_spec(cls, config) -> BlockSpec:
        return BlockSpec(
            hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
            norm_eps=config.layer_norm_eps, activation=config.hidden_act, positions="rotary", parallel=True,
            lm_head_bias=True, tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=bool(getattr(config, "qk_layernorm", False)),
        )
