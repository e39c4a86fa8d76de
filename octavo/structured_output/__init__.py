"""Structured output: outputs constrained to a JSON schema, regex, choice or grammar (xgrammar)."""

from octavo.structured_output.manager import (
    BitmaskFiller,
    GrammarBitmask,
    SequenceGrammar,
    StructuredOutputManager,
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
    "apply_bitmask",
    "constrained_rows",
]
