"""A tokenizer for the random-weight benchmark models, which ship none.

Without a tokenizer a server streams no text (so no TTFT or ITL can be seen), cannot take chat
messages, and the offline engine skips detokenization: neither side would pay for the text
work that a real deployment pays for. This one covers the whole vocabulary: every id decodes to
a distinct word (``w123``), so every generated token streams as text, and a prompt of such
words encodes back to exactly its ids. The model's BOS/EOS ids get their special tokens, and a
ChatML template makes /v1/chat/completions work.

    python -m octavo.benchmarks.dummy_tokenizer FOLDER   # beside the config.json in FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

UNK_TOKEN = "<unk>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_dummy_tokenizer(folder: Path, vocab_size: int, bos_token_id: int, eos_token_id: int) -> Path:
    """Save the tokenizer into ``folder`` (transformers' files, loadable with AutoTokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # <|im_start|> takes the id after EOS when it is free (Qwen's layout), else the one before.
    start_id = eos_token_id - 1 if eos_token_id + 1 >= vocab_size else eos_token_id + 1
    special = {UNK_TOKEN: 0, "<|endoftext|>": bos_token_id, "<|im_end|>": eos_token_id, "<|im_start|>": start_id}
    if len(set(special.values())) != len(special) or not all(0 <= i < vocab_size for i in special.values()):
        raise ValueError(f"special token ids {special} must be distinct and inside the vocabulary of {vocab_size}.")
    words = {i: f"w{i}" for i in range(vocab_size)}
    words.update({i: token for token, i in special.items()})
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in words.items()}, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNK_TOKEN, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def write_for_model_folder(folder: Path) -> Path:
    """The tokenizer for the config.json already in ``folder``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return write_dummy_tokenizer(folder, config.vocab_size, config.bos_token_id, eos)


if __name__ == "__main__":
    print(write_for_model_folder(Path(sys.argv[1])))
