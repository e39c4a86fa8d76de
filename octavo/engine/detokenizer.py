"""Incremental detokenization and stop-string matching for one sequence.

Decoding the whole output after every token would cost O(length) per token. Instead each
token decodes a short window of recent ids twice, the part already turned into text (the
prefix) and the prefix plus what came since, and appends the difference. Text is appended
only once the window's decode no longer ends in U+FFFD, so a multi-byte character split over
several byte-level tokens appears whole, never as replacement characters. The window starts
on the last prompt tokens so that decoders which drop a sequence's leading space (the
SentencePiece "▁" prefix) treat the first generated token as a continuation, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Callable

from tokenizers import Tokenizer

from octavo.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the output as context (vLLM uses the same count).
_PROMPT_CONTEXT_TOKENS = 5


def fast_decode(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """``decode(ids, skip_special_tokens)``, straight through the Rust tokenizer where the HF
    wrapper would add nothing (no clean-up of tokenization spaces): a seventh of the cost per
    call, which matters at two calls per token per sequence."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids, skip_special_tokens: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids, skip_special_tokens: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def decode_token(tokenizer: Any, token_id: int) -> str:
    """Text of one token for ``Logprob.decoded_token`` (special tokens shown, a lone byte
    of a multi-byte character shows as U+FFFD)."""
    return tokenizer.decode([token_id])


class IncrementalDetokenizer:
    """Builds one sequence's completion text token by token and watches for stop strings.

    With ``params.detokenize`` False or no tokenizer the text stays empty and no stop string
    ever matches.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer if params.detokenize else None
        self._fast_decode = fast_decode(tokenizer) if self._tokenizer is not None else None
        self._skip_special_tokens = params.skip_special_tokens
        self._stops: list[str] = list(params.stop) if self._tokenizer is not None else []
        self._include_stop = params.include_stop_str_in_output
        # Streaming holds back a possible stop-string start only when the stop string would be
        # cut from the text; an included one may be streamed as it appears.
        self._stop_holdback = 0 if self._include_stop else max(map(len, self._stops), default=1) - 1
        self._text = ""
        self._streamed = 0
        # Window state: text has been produced for _ids[:_read_offset]; _prefix_text is the
        # decode of _ids[_prefix_offset:_read_offset], the context the next tokens are diffed on.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids) if self._tokenizer is not None else ""
        # spaces_between_special_tokens=False (when special tokens are kept): an added token
        # right after another one contributes its bare content, without the decoder's spacing.
        self._added_tokens: dict[int, str] | None = None
        if self._tokenizer is not None and not (
            params.skip_special_tokens or params.spaces_between_special_tokens
        ):
            self._added_tokens = {
                i: t.content for i, t in self._tokenizer.added_tokens_decoder.items()
            }
        self._last_was_added = False

    @property
    def text(self) -> str:
        """The completion so far; a matched stop string is cut unless include_stop_str_in_output."""
        return self._text

    def append(self, new_token_ids: list[int], find_stops: bool = True) -> str | None:
        """Add generated tokens; return the stop string if one now appears (the text is cut).

        With ``find_stops=False`` (still below ``min_tokens``) stop strings are not looked for;
        the lookback of later calls still finds one that spans the boundary.
        """
        if self._tokenizer is None:
            return None
        start = len(self._text)
        for token_id in new_token_ids:
            self._text += self._next_text(token_id)
        return self._cut_at_stop(start) if self._stops and find_stops else None

    def take_stream_delta(self, finished: bool) -> str:
        """Text added since the last call that is safe to stream.

        While unfinished, a trailing part that could begin a stop string is withheld (it may yet
        be cut); when finished, everything left is flushed. Incomplete characters never reach the
        text, so the deltas concatenate to ``text``.
        """
        end = len(self._text) if finished else len(self._text) - self._possible_stop_start()
        delta = self._text[self._streamed : end]
        self._streamed = end
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self._fast_decode(token_ids, self._skip_special_tokens)

    def _next_text(self, token_id: int) -> str:
        """Text that ``token_id`` completes ("" while a character or the text is still pending)."""
        self._ids.append(token_id)
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            # Nothing new (a skipped special token) or a character still missing bytes: wait.
            text = ""
        else:
            text = window_text[len(self._prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        if self._added_tokens is not None:
            content = self._added_tokens.get(token_id)
            if content is not None and self._last_was_added:
                text = content
            self._last_was_added = content is not None
        return text

    def _cut_at_stop(self, start: int) -> str | None:
        """Find the earliest stop string that ends after ``start`` and cut the text there.

        A stop string that ends in the new text starts at most ``len(stop) - 1`` characters
        before it, so only that lookback is searched. Ties go to the first listed stop string.
        """
        match_at, match = len(self._text), None
        for stop in self._stops:
            at = self._text.find(stop, max(0, start - len(stop) + 1))
            if at != -1 and at < match_at:
                match_at, match = at, stop
        if match is not None:
            self._text = self._text[: match_at + len(match) if self._include_stop else match_at]
        return match

    def _possible_stop_start(self) -> int:
        """Length of the longest unstreamed suffix that is a proper prefix of a stop string."""
        for length in range(min(self._stop_holdback, len(self._text) - self._streamed), 0, -1):
            tail = self._text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
