"""Per-request generation settings, validated when constructed.

Names and defaults follow vLLM's ``SamplingParams`` so that code written for it
runs unchanged. Every invalid value raises ``ValueError`` naming the field.

Every field is plain data (numbers, strings, lists, dicts, and ``StructuredOutputsParams``,
itself plain data), so the params can be sent to an engine in another process, except
``logits_processors``: Python callables that work only with the in-process engine.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from octavo.logits_process import LogitsProcessor
# Importable from here too, as from vllm.sampling_params.
from octavo.structured_output.params import StructuredOutputsParams
from octavo.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, DEFAULT_KEY

# Below this temperature sampling is treated as greedy (argmax).
_GREEDY_EPSILON = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    # Structured output: a JSON schema, regex, choice or grammar the text must match.
    structured_outputs: Optional[StructuredOutputsParams] = None  # or its dict form
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: Optional[list[int]] = None  # sample only among these
    bad_words: Optional[list[str]] = None  # words (one or more tokens) never generated
    logits_processors: Optional[list[LogitsProcessor]] = None  # in-process engine only
    watermark: bool = False  # green-list watermark (see octavo.watermark)
    watermark_gamma: float = DEFAULT_GAMMA
    watermark_delta: float = DEFAULT_DELTA
    watermark_key: int = DEFAULT_KEY
    # Token ids of ``bad_words``, filled in from the tokenizer when the request is added.
    bad_words_token_ids: Optional[list[list[int]]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}.")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}.")
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0  # -1 and None are accepted spellings of "disabled", as in vLLM
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        for name in ("allowed_token_ids", "bad_words", "logits_processors"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set, frozenset)):
                setattr(self, name, list(value))
        self._validate()
        self._validate_logits_controls()

    def _validate(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"{name} {message}, got {getattr(self, name)!r}.")

        # numbers.* admits numpy and other numeric scalars; bools are Integral to Python but not numbers here.
        def is_int(value: object) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))

        def is_number(value: object) -> bool:
            return is_int(value) or (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
                                     and math.isfinite(value))

        def check_range(name: str, low: float, high: float, message: str, low_open: bool = False) -> None:
            value = getattr(self, name)
            if not is_number(value) or not (low < value if low_open else low <= value) or not value <= high:
                fail(name, message)

        if not is_int(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            fail("best_of", f"must be an integer >= n ({self.n})")
        check_range("presence_penalty", -2.0, 2.0, "must be a number in [-2, 2]")
        check_range("frequency_penalty", -2.0, 2.0, "must be a number in [-2, 2]")
        check_range("repetition_penalty", 0.0, math.inf, "must be a finite number > 0", low_open=True)
        check_range("temperature", 0.0, 100.0, "must be a number in [0, 100]")
        check_range("top_p", 0.0, 1.0, "must be a number in (0, 1]", low_open=True)
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an integer >= 1, or 0 / -1 to disable it")
        check_range("min_p", 0.0, 1.0, "must be a number in [0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            fail("seed", "must be an integer that fits in 64 bits")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                fail(name, "must be an integer >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative integers")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(name, "must be true or false")

    def _validate_logits_controls(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"{name} {message}, got {getattr(self, name)!r}.")

        def is_token_id(value: object) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value >= 0

        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail("logit_bias", "must be a dict of token id -> bias")
            try:  # JSON object keys arrive as strings
                self.logit_bias = {int(token): bias for token, bias in self.logit_bias.items()}
            except (TypeError, ValueError):
                fail("logit_bias", "must have integer token ids as keys")
            for token, bias in self.logit_bias.items():
                if token < 0:
                    fail("logit_bias", "must have non-negative token ids as keys")
                if (not isinstance(bias, numbers.Real) or isinstance(bias, (bool, np.bool_))
                        or not math.isfinite(bias) or not -100.0 <= bias <= 100.0):
                    fail("logit_bias", "values must be numbers in [-100, 100]")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
            or not all(map(is_token_id, self.allowed_token_ids))
        ):
            fail("allowed_token_ids", "must be a non-empty list of non-negative integers")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list) or not all(isinstance(w, str) and w.strip() for w in self.bad_words)
        ):
            fail("bad_words", "must be a list of non-empty strings")
        if self.bad_words_token_ids is not None and (
            not isinstance(self.bad_words_token_ids, list)
            or not all(isinstance(word, list) and word and all(map(is_token_id, word))
                       for word in self.bad_words_token_ids)
        ):
            fail("bad_words_token_ids", "must be a list of non-empty lists of non-negative integers")
        if self.logits_processors is not None and (
            not isinstance(self.logits_processors, list) or not all(map(callable, self.logits_processors))
        ):
            fail("logits_processors", "must be a list of callables")
        if not isinstance(self.watermark, (bool, np.bool_)):
            fail("watermark", "must be true or false")
        if (not isinstance(self.watermark_gamma, numbers.Real) or isinstance(self.watermark_gamma, bool)
                or not 0.0 < self.watermark_gamma < 1.0):
            fail("watermark_gamma", "must be a number in (0, 1)")
        if (not isinstance(self.watermark_delta, numbers.Real) or isinstance(self.watermark_delta, bool)
                or not math.isfinite(self.watermark_delta) or self.watermark_delta < 0.0):
            fail("watermark_delta", "must be a finite number >= 0")
        if not isinstance(self.watermark_key, numbers.Integral) or isinstance(self.watermark_key, bool):
            fail("watermark_key", "must be an integer")
        if self.structured_outputs is not None and self.ignore_eos:
            fail("ignore_eos", "must be false with structured_outputs: a finished grammar allows only EOS")
        if self.structured_outputs is not None and self.min_tokens:
            fail("min_tokens", "must be 0 with structured_outputs: the grammar decides where the output ends")

    def resolve_bad_words(self, tokenizer: Any) -> None:
        """Fill ``bad_words_token_ids``: each word as it tokenizes at the start of a text and after
        a space (they tokenize differently with most BPE vocabularies)."""
        if not self.bad_words or self.bad_words_token_ids is not None:
            return
        if tokenizer is None:
            raise ValueError("bad_words needs the model's tokenizer, and this model has none.")
        variants: dict[tuple[int, ...], None] = {}
        for word in self.bad_words:
            for text in (word.strip(), " " + word.strip()):
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    variants[ids] = None
        self.bad_words_token_ids = [list(ids) for ids in variants]

    @property
    def uses_logits_controls(self) -> bool:
        """Any stage beyond the classic sampling parameters (the sampler skips them otherwise)."""
        return self.structured_outputs is not None or self.uses_token_controls

    @property
    def uses_token_controls(self) -> bool:
        """The logits controls besides a grammar: biases, allowed and banned tokens, processors,
        the watermark."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words or self.logits_processors
                    or self.watermark)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPSILON

    @property
    def num_samples(self) -> int:
        """How many sequences are generated (best_of of them, n returned)."""
        return self.best_of or self.n
