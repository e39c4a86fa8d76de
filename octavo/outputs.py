"""What ``LLM.generate`` returns, in vLLM's shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    """Log-probability of one token; ``rank`` is 1 for the most likely token."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One dict per position: token id -> Logprob (always includes the chosen token).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Optional[int | str] = None  # the stop string or token that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class CompletionDelta:
    """What one sample added since its last delivered output: stream-safe text, tokens, logprobs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[SampleLogprobs] = None

    def followed_by(self, later: CompletionDelta) -> CompletionDelta:
        """This delta and a later one, as one."""
        logprobs = None if self.logprobs is None else self.logprobs + (later.logprobs or [])
        return CompletionDelta(self.text + later.text, self.token_ids + later.token_ids, logprobs)


@dataclass
class StreamingRequestOutput(RequestOutput):
    """A ``RequestOutput`` plus, per returned sample, what is new since the last delivered output.

    ``deltas`` is filled only when every generated sample is returned (``best_of`` unset or equal
    to ``n``): with ``best_of > n`` the kept samples are known only at the end. The token and
    logprobs lists in ``outputs`` keep growing until the request finishes; read them from the
    finished output, and use the deltas while streaming.
    """

    deltas: list[CompletionDelta] = field(default_factory=list)
