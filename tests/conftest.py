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
    raise ValueError(arch)


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe"]


def build_tiny_model(arch: str, folder: Path, with_tokenizer: bool = False):
    torch.manual_seed(0)
    model = _build(arch).eval()
    model.save_pretrained(folder)
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
