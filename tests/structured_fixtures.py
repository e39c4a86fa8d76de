"""A tiny random llama with a real byte-level BPE tokenizer whose vocabulary covers JSON, a
Qwen-style chat template that renders tools, tool calls and tool results, and Hermes-style
``<tool_call>`` tokens: what structured output and tool calling need from a model."""

from __future__ import annotations

from pathlib import Path

import torch

TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call a function with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}<tool_call>\n"
    "{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}\n"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    '{"name": "Paris", "age": 42, "city": "London", "ok": true, "items": [1, 2, 3], "none": null}',
    "The capital of France is Paris. Hello, my name is octavo. What is the weather like?",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "yes no maybe red green blue 0123456789 -+.eE {}[]:,\"' \n\t",
]


def save_structured_tokenizer(folder: Path) -> int:
    """Save the tokenizer into ``folder``; returns its size (ids 0 .. size - 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", unk_token="<unk>")
    fast.add_tokens(["<tool_call>", "</tool_call>"])  # plain added tokens: kept in decoded text
    fast.chat_template = TOOL_CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return len(fast)


def build_structured_model(folder: Path, initializer_range: float = 0.2) -> None:
    """A two-layer llama over that tokenizer; its vocabulary is padded past the tokenizer's, as
    real checkpoints often are, so masks must cover ids no tokenizer produces."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = save_structured_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=size + 12, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
        initializer_range=initializer_range, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
