"""Green-list watermarking (Kirchenbauer et al., 2023, "A Watermark for Large Language Models").

At each step the previous token seeds a pseudo-random split of the vocabulary into a green
list (a ``gamma`` fraction of it) and a red list, and ``delta`` is added to the green logits
before sampling. Text generated that way holds more green tokens than chance; the detector
recomputes each token's list from the token before it and reports the z-score of the green
count against the ``gamma`` expected without a watermark.

The split is a keyed integer hash of (previous token, token), so each token is green with
probability ``gamma`` independently of the others: the sampler computes it for a whole batch
in a few vectorised integer ops on the device, and the detector gets the same bits on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0
DEFAULT_KEY = 15485863  # the hash key of the reference implementation and of HF TGI

_MASK = (1 << 31) - 1  # values stay below 2**31 so that products fit a signed 64-bit integer


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer finaliser (xorshift-multiply rounds); int64 in and out."""
    x = ((x ^ (x >> 16)) * 0x2C1B3C6D) & _MASK
    x = ((x ^ (x >> 13)) * 0x297A2D39) & _MASK
    return x ^ (x >> 16)


def _row_seeds(previous_tokens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return _mix((keys & _MASK) ^ _mix(previous_tokens & _MASK))


def green_mask(previous_tokens: torch.Tensor, vocab_size: int, gammas: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] bool: token j is green for row i, whose previous token is ``previous_tokens[i]``.

    ``previous_tokens``, ``gammas`` (float) and ``keys`` (int64) are [rows] on one device.
    """
    device = previous_tokens.device
    tokens = _mix(torch.arange(vocab_size, dtype=torch.int64, device=device))
    scores = _mix(_row_seeds(previous_tokens.to(torch.int64), keys.to(torch.int64))[:, None] ^ tokens[None, :])
    return scores < (gammas.to(torch.float64) * (_MASK + 1)).to(torch.int64)[:, None]


def is_green(previous_tokens: Sequence[int], tokens: Sequence[int], gamma: float, key: int) -> list[bool]:
    """Whether each ``tokens[i]`` is green after ``previous_tokens[i]`` (the detector's view)."""
    previous = torch.tensor(list(previous_tokens), dtype=torch.int64)
    keys = torch.full_like(previous, key)
    scores = _mix(_row_seeds(previous, keys) ^ _mix(torch.tensor(list(tokens), dtype=torch.int64)))
    return (scores < int(gamma * (_MASK + 1))).tolist()


@dataclass
class WatermarkDetection:
    num_tokens_scored: int
    num_green_tokens: int
    green_fraction: float
    z_score: float
    p_value: float  # one-sided: the chance of at least this many green tokens without a watermark

    def is_watermarked(self, z_threshold: float = 4.0) -> bool:
        return self.z_score > z_threshold


def detect_watermark(token_ids: Sequence[int], gamma: float = DEFAULT_GAMMA, key: int = DEFAULT_KEY,
                     ignore_repeated_bigrams: bool = True) -> WatermarkDetection:
    """Score ``token_ids`` (a generated text's tokens, optionally preceded by the prompt's last
    token, which seeds the first one): each token after the first is looked up in the green list
    of the token before it.

    ``ignore_repeated_bigrams`` scores each distinct (previous, token) pair once, so repetitive
    text, watermarked or not, cannot inflate the score by repeating one green (or red) pair.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma!r}.")
    pairs = list(zip(token_ids[:-1], token_ids[1:]))
    if ignore_repeated_bigrams:
        pairs = list(dict.fromkeys(pairs))
    if not pairs:
        raise ValueError("the text is too short to score: it needs at least two tokens.")
    green = sum(is_green([p for p, _ in pairs], [t for _, t in pairs], gamma, key))
    scored = len(pairs)
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1.0 - gamma))
    return WatermarkDetection(scored, green, green / scored, z, 0.5 * math.erfc(z / math.sqrt(2.0)))


def detect_watermark_text(text: str, tokenizer: Any, gamma: float = DEFAULT_GAMMA, key: int = DEFAULT_KEY,
                          ignore_repeated_bigrams: bool = True) -> WatermarkDetection:
    """``detect_watermark`` on ``text`` tokenized by ``tokenizer`` (the generating model's): text
    that does not re-tokenize to the generated tokens scores lower than the tokens would."""
    return detect_watermark(tokenizer.encode(text, add_special_tokens=False), gamma, key, ignore_repeated_bigrams)
