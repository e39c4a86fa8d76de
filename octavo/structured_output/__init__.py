"""Structured output: outputs constrained to a JSON schema, regex, choice or grammar (xgrammar)."""

from octavo.structured_output.manager import (
    BitmaskFiller,
    GrammarBitmask,
    SequenceGrammar,
    StructuredOutputManager,
    advance_grammars,
    apply_bitmask,
    constrained_rows,
)
from octavo.structured_output.params import StructuredOutputsParams

__all__ = [
    "BitmaskFiller",
    "GrammarBitmask",
    "SequenceGrammar",
    "StructuredOutputManager",
    "StructuredOutputsParams",
    "advance_grammars",
    "apply_bitmask",
    "constrained_rows",
]
