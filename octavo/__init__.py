"""octavo: high-throughput LLM inference with PagedAttention and continuous batching."""

from octavo.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from octavo.llm import LLM
from octavo.outputs import CompletionOutput, Logprob, RequestOutput
from octavo.sampling_params import SamplingParams

__all__ = [
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence","LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
