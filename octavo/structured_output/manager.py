"""Per-sequence grammar state and the per-step token bitmask.

The engine core owns both. ``StructuredOutputManager.grammar_for`` gives each sequence (every
sample of n > 1 included) its own ``SequenceGrammar``; the core advances it with each token
it appends (``accept``), and the model runner asks ``BitmaskFiller.fill`` for the next step's
mask of the rows that have one. The mask is filled on the CPU, across xgrammar's own threads,
while the device runs the step's forward pass, then uploaded and applied before sampling.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from octavo.structured_output.backend import GrammarCompiler, load_xgrammar
from octavo.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class SequenceGrammar:
    """One sequence's matcher, created once its grammar has compiled (usually during prefill)."""

    def __init__(self, compiled: Future) -> None:
        self._compiled = compiled
        self._matcher: Any = None

    @property
    def matcher(self) -> Any:
        if self._matcher is None:
            self._matcher = load_xgrammar().GrammarMatcher(self._compiled.result())
        return self._matcher

    def start(self) -> bool:
        """Create the matcher (waiting for the compile if it is still running); False if the
        grammar failed to compile, which the checks at construction make all but impossible."""
        try:
            self.matcher
        except Exception:  # noqa: BLE001 - whatever the compiler raised, the engine must go on
            logger.exception("a grammar failed to compile; its request continues unconstrained")
            return False
        return True

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it (which the mask prevents)."""
        matcher = self.matcher
        return not matcher.is_terminated() and matcher.accept_token(token_id)


class StructuredOutputManager:
    """Hands out per-sequence grammars; compiles lazily, so engines without xgrammar still run.
    ``load_tokenizer`` is called once, on the compile thread, for the first constrained request."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self._load_tokenizer = load_tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = frozenset(stop_token_ids)
        self._compiler: Optional[GrammarCompiler] = None

    def grammar_for(self, params: Optional[StructuredOutputsParams]) -> Optional[SequenceGrammar]:
        if params is None:
            return None
        if self._compiler is None:
            self._compiler = GrammarCompiler(self._load_tokenizer, self._vocab_size, self._stop_token_ids)
        return SequenceGrammar(self._compiler.compile(params))


def constrained_rows(seqs: Sequence[Any]) -> tuple[list[int], list[SequenceGrammar]]:
    """The rows of ``seqs`` (Sequences) that need a mask this step, and their grammars. Finished
    rows need none (a token sampled for them is dropped); a grammar that failed to compile is
    dropped from its sequence."""
    rows: list[int] = []
    grammars: list[SequenceGrammar] = []
    for row, seq in enumerate(seqs):
        grammar = seq.grammar
        if grammar is None or seq.is_finished:
            continue
        if not grammar.start():
            seq.grammar = None
            continue
        rows.append(row)
        grammars.append(grammar)
    return rows, grammars


@dataclass
class GrammarBitmask:
    """A step's packed masks (bit j of row i: token j is allowed) and the logits rows they cover."""

    bitmask: torch.Tensor  # [num_rows, ceil(vocab / 32)] int32, on the logits' device
    rows: list[int]


class BitmaskFiller:
    """Fills and uploads the bitmask for the constrained rows of a step.

    The host buffer is pinned and reused. That is safe because the model runner fills the mask
    of step k + 1 only once step k's tokens have reached the host (a constrained step samples
    after the step before it is processed), and step k's upload was queued before its sampling.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._host: Optional[torch.Tensor] = None
        self._batch_matcher: Any = None

    def fill(self, grammars: Sequence[SequenceGrammar], rows: list[int], num_rows: int) -> GrammarBitmask:
        """The masks of ``grammars`` for logits ``rows`` (of ``num_rows``), uploaded to the device."""
        xgr = load_xgrammar()
        host = self._buffer(num_rows, xgr)
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher()
        self._batch_matcher.batch_fill_next_token_bitmask([grammar.matcher for grammar in grammars], host, rows)
        if self.device.type == "cuda":
            bitmask = host.to(self.device, non_blocking=True)
        else:
            bitmask = host.clone()  # the caller may keep it past the next fill
        return GrammarBitmask(bitmask, rows)

    def _buffer(self, num_rows: int, xgr: Any) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < num_rows:
            shape = xgr.get_bitmask_shape(max(num_rows, 64), self.vocab_size)
            self._host = torch.empty(shape, dtype=xgr.bitmask_dtype, pin_memory=self.device.type == "cuda")
        return self._host[:num_rows]


def apply_bitmask(logits: torch.Tensor, mask: GrammarBitmask) -> None:
    """Set to -inf, in place, the float32 ``logits`` of tokens the grammars forbid."""
    load_xgrammar().apply_token_bitmask_inplace(logits, mask.bitmask, vocab_size=logits.shape[1],
                                                indices=mask.rows)
