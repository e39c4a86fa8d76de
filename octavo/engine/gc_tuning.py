"""Garbage-collector settings for the step loop and the front end.

Every step allocates a few objects per running sequence (tokens, deltas, outputs) that live
until their request ends, so CPython's collector keeps promoting them and then walks all of
them, model and tokenizer objects included, in full collections. Measured on the front end's
output processing of 512 streams: half of its time went to the collector. Freezing what exists
after start-up takes the long-lived objects out of every later collection, and a larger
first-generation threshold makes collections rarer; nothing here forms cycles at a rate that
would need them sooner.
"""

from __future__ import annotations

import gc

# Allocations between young-generation collections (CPython's default is 700).
_GEN0_THRESHOLD = 50_000


def tune_after_startup(freeze: bool = True) -> None:
    """Call once the model, tokenizer and server are built.

    ``freeze=False`` where the process is the user's (the offline ``LLM``): frozen objects are
    never collected, so an engine dropped there (in a notebook, a test) would keep its memory,
    the GPU's included, for as long as the process lives.
    """
    gc.collect()
    if freeze:
        gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GEN0_THRESHOLD, gen1, gen2)
