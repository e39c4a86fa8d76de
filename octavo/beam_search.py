"""Beam search over the engine, in vLLM's shape: ``LLM.beam_search(prompts, BeamSearchParams(...))``.

Each round runs every live beam one token forward as a batch of requests that
ask for the top ``2 * beam_width`` logprobs, then keeps the best candidates.
Beams share their common prefix through the prefix cache: the full KV blocks
of a parent are found by hash and referenced, not recomputed, and a dropped
beam's blocks are released (kept cached until evicted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from typing import Optional

from octavo.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # accepted for vLLM compatibility; candidates use raw logprobs
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}.")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")


@dataclass
class BeamSearchSequence:
    """A finished or live beam. ``tokens`` holds the prompt followed by the generated ids."""

    tokens: list[int]
    num_prompt_tokens: int
    cum_logprob: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    text: Optional[str] = None
    finish_reason: Optional[str] = None

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(beam: BeamSearchSequence, length_penalty: float, eos_token_ids: frozenset[int]) -> float:
    """Cumulative logprob normalised by generated length ** length_penalty (EOS not counted)."""
    length = len(beam.tokens) - beam.num_prompt_tokens
    if length and beam.tokens[-1] in eos_token_ids:
        length -= 1
    return beam.cum_logprob / max(length, 1) ** length_penalty


def run_beam_search(engine, prompt_token_ids: list[list[int]], params: BeamSearchParams,
                    progress=None) -> list[BeamSearchOutput]:
    width = params.beam_width
    eos = frozenset() if params.ignore_eos else engine.eos_token_ids
    live = [[BeamSearchSequence(list(tokens), len(tokens))] for tokens in prompt_token_ids]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompt_token_ids]
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * width, ignore_eos=True,
                                 detokenize=False)
    request_ids = count()
    for _ in range(params.max_tokens):
        requests = {}
        for prompt_index, beams in enumerate(live):
            for beam in beams:
                request_id = f"beam-{next(request_ids)}"
                engine.add_request(request_id, {"prompt_token_ids": beam.tokens}, step_params)
                requests[request_id] = (prompt_index, beam)
        if not requests:
            break
        candidates: list[list[BeamSearchSequence]] = [[] for _ in live]
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if not output.finished:
                        continue
                    prompt_index, beam = requests[output.request_id]
                    for token, logprob in output.outputs[0].logprobs[0].items():
                        candidates[prompt_index].append(BeamSearchSequence(
                            beam.tokens + [token], beam.num_prompt_tokens, beam.cum_logprob + logprob.logprob,
                            beam.logprobs + [logprob.logprob]))
        except BaseException:
            engine.abort_request(list(requests))
            raise
        for prompt_index, pool in enumerate(candidates):
            ranked = sorted(pool, key=lambda b: beam_score(b, params.length_penalty, eos), reverse=True)
            live[prompt_index] = []
            for beam in ranked[:width]:
                if beam.tokens[-1] in eos:
                    beam.finish_reason = "stop"
                    done[prompt_index].append(beam)
                else:
                    live[prompt_index].append(beam)
        if progress is not None:
            progress.update(1)

    outputs = []
    for finished, remaining in zip(done, live):
        for beam in remaining:
            beam.finish_reason = "length"
        best = sorted(finished + remaining, key=lambda b: beam_score(b, params.length_penalty, eos),
                      reverse=True)[:width]
        if engine.tokenizer is not None:
            for beam in best:
                beam.text = engine.tokenizer.decode(beam.output_tokens, skip_special_tokens=True)
        outputs.append(BeamSearchOutput(best))
    return outputs
