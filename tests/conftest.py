"""Shared fixtures: tiny random Hugging Face models saved to disk, one per architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The choice is fixed when a
# kernel module is first imported, so it is made here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB_SIZE = 256


def _llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _build(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return tf.LlamaForCausalLM(_llama_config(
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            rope_theta=500000.0))
    if arch == "mistral":
        config = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                                  sliding_window=12, **common)
        return tf.MistralForCausalLM(config)
    if arch == "qwen2":
        config = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                tie_word_embeddings=True, **common)
        return tf.Qwen2ForCausalLM(config)
    if arch == "qwen3":
        config = tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                max_position_embeddings=512, tie_word_embeddings=True, **common)
        return tf.Qwen3ForCausalLM(config)
    if arch == "mixtral":
        config = tf.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512, num_local_experts=4,
                                  num_experts_per_tok=2, **common)
        return tf.MixtralForCausalLM(config)
    if arch == "qwen2_moe":
        # Layer 1 stays dense (mlp_only_layers); three of six experts per token, not renormalised.
        config = tf.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                                   shared_expert_intermediate_size=80, num_experts=6, num_experts_per_tok=3,
                                   mlp_only_layers=[1], num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512, **common)
        return tf.Qwen2MoeForCausalLM(config)
    if arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                                   num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=512, tie_word_embeddings=True, **common)
        return tf.Qwen3MoeForCausalLM(config)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
        return tf.GPT2LMHeadModel(config)
    return _build_dense_family(tf, arch, common)


def _build_dense_family(tf, arch: str, common: dict):
    """Each family's tiny model turns on what sets it apart (and what its real checkpoints use)."""
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    if arch == "gemma":  # MQA, head_dim * heads != hidden
        return tf.GemmaForCausalLM(tf.GemmaConfig(intermediate_size=128, num_key_value_heads=1, head_dim=32,
                                                  **sizes, **common))
    if arch == "gemma2":  # one sliding and one global layer, both soft-caps
        # Eager attention: the one transformers implementation that soft-caps the scores (some
        # versions pick sdpa by default, which drops the cap without a word).
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(
            intermediate_size=128, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
            sliding_window=12, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
            attn_implementation="eager", **sizes, **common))
    if arch.startswith("phi3"):  # LongRoPE, sliding window
        # phi3: no test sequence outgrows the original 64 positions (short factors throughout);
        # phi3_long: the long factors for every sequence longer than 16.
        original = 16 if arch == "phi3_long" else 64
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": original,
                "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)]}
        return tf.Phi3ForCausalLM(tf.Phi3Config(
            intermediate_size=128, num_key_value_heads=2, rope_parameters=rope, sliding_window=20,
            original_max_position_embeddings=original, pad_token_id=0, **sizes, **common))
    if arch == "phi":  # partial rotary, GQA, q/k LayerNorm
        return tf.PhiForCausalLM(tf.PhiConfig(intermediate_size=128, num_key_value_heads=2,
                                              partial_rotary_factor=0.5, qk_layernorm=True, **sizes, **common))
    if arch == "gptj":  # interleaved rotary on 8 of 16 head dims
        return tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512,
                                                **common))
    if arch in ("gpt_bigcode", "gpt_bigcode_mha"):
        return tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(
            n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=arch == "gpt_bigcode", **common))
    if arch == "falcon":  # new layout: grouped K/V, a LayerNorm per branch
        return tf.FalconForCausalLM(tf.FalconConfig(
            new_decoder_architecture=True, num_kv_heads=2, bias=False, **sizes, **common))
    if arch == "falcon_old":  # 7B layout: one K/V head, parallel block on one LayerNorm
        return tf.FalconForCausalLM(tf.FalconConfig(multi_query=True, parallel_attn=True, bias=False,
                                                    **sizes, **common))
    if arch == "falcon_rw":  # RW layout: ALiBi, per-head q/k/v, sequential block, biases
        return tf.FalconForCausalLM(tf.FalconConfig(multi_query=False, parallel_attn=False, alibi=True,
                                                    bias=True, **sizes, **common))
    if arch == "bloom":  # ALiBi, embedding LayerNorm, residuals taken after the norms
        return tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, seq_length=512,
                                                  apply_residual_connection_post_layernorm=True, **common))
    if arch == "aquila":  # Llama weights under Aquila's config; saved as such by build_tiny_model
        return tf.LlamaForCausalLM(_llama_config())
    raise ValueError(arch)


def _save_as_aquila(folder: Path) -> None:
    """Aquila ships remote code: its config.json names its own type and classes."""
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(model_type="aquila", architectures=["AquilaForCausalLM"],
                  auto_map={"AutoConfig": "configuration_aquila.AquilaConfig",
                            "AutoModelForCausalLM": "modeling_aquila.AquilaForCausalLM"})
    path.write_text(json.dumps(config, indent=2))


DENSE_FAMILIES = ["gemma", "gemma2", "phi3", "phi", "gptj", "gpt_bigcode", "gpt_bigcode_mha", "falcon",
                  "falcon_old", "falcon_rw", "bloom", "aquila"]
ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe"] \
    + DENSE_FAMILIES


def _perturb_vectors(model) -> None:
    """transformers initialises norm weights to one (or zero) and biases to zero, under which a
    misplaced norm or bias would go unnoticed: give every 1-D parameter its own values."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))


def build_tiny_model(arch: str, folder: Path, with_tokenizer: bool = False):
    torch.manual_seed(0)
    model = _build(arch).eval()
    if arch in DENSE_FAMILIES or arch.startswith("phi3"):
        _perturb_vectors(model)
    model.save_pretrained(folder)
    if arch == "aquila":
        _save_as_aquila(folder)
    if with_tokenizer:
        save_test_tokenizer(folder)
    return model


def save_test_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer over the tiny vocabulary, with a ChatML-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = ["Hello, my name is octavo.", "The capital of France is Paris.", "héllo wörld 😀 日本語"] * 10
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``factory(arch, with_tokenizer=False) -> (folder, hf_model)``, cached per session."""
    cache: dict = {}

    def factory(arch: str, with_tokenizer: bool = False):
        key = (arch, with_tokenizer)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}{'-tok' if with_tokenizer else ''}")
            cache[key] = (folder, build_tiny_model(arch, folder, with_tokenizer))
        return cache[key]

    return factory


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """Engines hold most of the GPU; free each test's before the next sizes its cache."""
    yield
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("OCTAVO_RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow test; set OCTAVO_RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
