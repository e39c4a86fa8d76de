"""The bytes behind each token, for logprobs.

Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) and SentencePiece byte fallback (Llama 2,
Mistral) spell a multi-byte character over several tokens; each of those decodes on its own to
U+FFFD, which would hide what the model chose. OpenAI's answers show such a token by its bytes:
``bytes`` lists them in chat, and completions name the token ``bytes:\\xf0\\x9f``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from transformers.convert_slow_tokenizer import bytes_to_unicode

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


class TokenBytes:
    """``token_bytes(token_id, text)``: the bytes of the token whose standalone decode is
    ``text``. Only tokens decoding to U+FFFD are looked up in the vocabulary (once each)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._looked_up: dict[int, bytes] = {}

    def __call__(self, token_id: int, text: str) -> bytes:
        if _REPLACEMENT_CHAR not in text or self._tokenizer is None:
            return text.encode()
        found = self._looked_up.get(token_id)
        if found is None:
            found = self._looked_up[token_id] = self._piece_bytes(token_id) or text.encode()
        return found

    def _piece_bytes(self, token_id: int) -> Optional[bytes]:
        """The raw bytes a vocabulary piece stands for, when it is spelled as bytes."""
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str) or not piece:
            return None
        fallback = _BYTE_FALLBACK_PIECE.fullmatch(piece)
        if fallback is not None:
            return bytes([int(fallback.group(1), 16)])
        # A genuine U+FFFD in the piece is not in the byte alphabet, so it is never misread.
        if all(char in _BYTE_OF_CHAR for char in piece):
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        return None


def is_whole_text(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 on its own (not part of a character)."""
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def escaped(data: bytes) -> str:
    """Printable ASCII as itself, every other byte as ``\\xNN`` (as OpenAI shows byte tokens)."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)
