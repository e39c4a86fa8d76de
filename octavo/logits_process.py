"""Per-row logits processors for the offline API (vLLM's ``logits_processors`` interface).

A processor is any callable (a function, or an instance of a class with ``__call__``) taking
``(output_token_ids, logits)`` or ``(prompt_token_ids, output_token_ids, logits)``, where
``logits`` is one sequence's float32 row of next-token scores [vocab] on the model's device,
and returning the row to sample from (it may modify and return ``logits``). Pass them as
``SamplingParams(logits_processors=[...])``; they run in order, after the grammar mask,
``allowed_token_ids``, ``bad_words`` and ``logit_bias``, before penalties and temperature.

Processors are Python callables and so run only with the in-process engine (``LLM``,
``LLMEngine``): they cannot be sent to an engine in another process or over HTTP.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence, Union

import torch

LogitsProcessor = Union[
    Callable[[list[int], torch.Tensor], torch.Tensor],
    Callable[[list[int], list[int], torch.Tensor], torch.Tensor],
]


def takes_prompt(processor: LogitsProcessor) -> bool:
    """Whether ``processor`` wants the prompt's token ids too (three positional parameters)."""
    try:
        parameters = inspect.signature(processor).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: the two-argument form
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def apply_logits_processors(logits: torch.Tensor, processors: Sequence[LogitsProcessor],
                            prompt_token_ids: list[int], output_token_ids: list[int]) -> torch.Tensor:
    """Run ``processors`` on one row, in order; returns the processed row."""
    for processor in processors:
        result = (processor(prompt_token_ids, output_token_ids, logits) if takes_prompt(processor)
                  else processor(output_token_ids, logits))
        if not isinstance(result, torch.Tensor) or result.shape != logits.shape:
            raise ValueError(f"logits processor {processor!r} must return a tensor shaped like its input "
                             f"{tuple(logits.shape)}, got {getattr(result, 'shape', type(result).__name__)}.")
        logits = result
    return logits
