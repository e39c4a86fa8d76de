"""Beam search over the engine, in vLLM's shape: ``LLM.beam_search(prompts, BeamSearchParams(...))``.

The search follows transformers' ``generate(num_beams=w, do_sample=False, early_stopping=False)``
step for step, so the same model returns the same beams in the same order:

- Each round runs every live beam one token forward and takes its top ``K`` next tokens,
  ``K = max(2, 1 + number of EOS ids) * w`` (``2 * w`` with ``ignore_eos``). A prompt's
  candidates are ranked by cumulative logprob and the best ``K`` kept.
- The best ``w`` of those that do not end in EOS are the next live beams, so a beam that
  finishes never shrinks the live set.
- A candidate ending in EOS becomes a finished hypothesis only if it ranks within the best
  ``w`` candidates. In the round that reaches ``max_tokens`` every candidate ends, so the
  best ``w`` of that round all become hypotheses. At most ``w`` hypotheses are kept.
- Hypotheses are ranked by ``cum_logprob / generated_len ** length_penalty``, where
  ``generated_len`` counts every generated token, the EOS included (see ``beam_score``).
  ``length_penalty`` 0 ranks by plain cumulative logprob; larger values favour longer beams.
- A prompt stops early once it holds ``w`` hypotheses and its best live beam, scored at its
  current length, cannot beat the worst of them (transformers' heuristic for
  ``early_stopping=False``: with ``length_penalty > 0`` a longer beam might still have won).
  Its live beams are then dropped, not returned.
- The output holds the hypotheses, best score first.

``temperature`` is used as vLLM (V1) uses it: each round's requests run at that temperature,
but candidates are scored by the raw (untempered) logprobs the engine reports, so its only
effect is that every beam's sampled token joins that beam's candidates. At temperature 0 (the
default) the sampled token is the argmax, already a candidate, and the search is deterministic.

Each round submits every live beam as a one-token request. Beams share their common prefix
through the prefix cache: a parent's full KV blocks are found by hash and referenced, not
recomputed, and a dropped beam's blocks are released (kept cached until evicted). These
internal look-ups are taken back out of the prefix-cache statistics, so only the prompt's
own first look-up counts, as for ``generate``. With prefix caching off nothing is shared:
every round recomputes each beam in full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import count
from typing import Iterator, Optional

from octavo.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # as in vLLM: only adds each beam's sampled token to its candidates
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}.")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}.")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}.")


@dataclass
class BeamSearchSequence:
    """A finished or live beam. ``tokens`` holds the prompt followed by the generated ids."""

    tokens: list[int]
    num_prompt_tokens: int
    cum_logprob: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # "stop" (ended in EOS) or "length" (reached max_tokens)

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(beam: BeamSearchSequence, length_penalty: float) -> float:
    """transformers' hypothesis score: cumulative logprob / generated length ** length_penalty,
    the length counting every generated token, EOS included."""
    return beam.cum_logprob / len(beam.output_tokens) ** length_penalty


@dataclass
class _PromptSearch:
    """One prompt's beam search state."""

    live: list[BeamSearchSequence]
    cache_salt: Optional[str] = None  # the prompt's, so its beams see only that salt's cached blocks
    hypotheses: list[BeamSearchSequence] = field(default_factory=list)  # best score first, at most width
    done: bool = False

    def advance(self, children: list[BeamSearchSequence], params: BeamSearchParams, eos: frozenset[int],
                num_candidates: int, last: bool) -> None:
        width, length_penalty = params.beam_width, params.length_penalty
        ranked = sorted(children, key=lambda beam: beam.cum_logprob, reverse=True)[:num_candidates]
        for beam in ranked:
            if beam.tokens[-1] in eos:
                beam.finish_reason = "stop"
            elif last:
                beam.finish_reason = "length"
        # Only the best `width` candidates may finish; a lower-ranked EOS candidate is dropped.
        finished = [beam for beam in ranked[:width] if beam.finish_reason is not None]
        self.hypotheses = sorted(self.hypotheses + finished, key=lambda beam: beam_score(beam, length_penalty),
                                 reverse=True)[:width]
        self.live = [beam for beam in ranked if beam.finish_reason is None][:width]
        if last or not self.live:
            self.done = True
        elif len(self.hypotheses) == width:
            # transformers' early_stopping=False heuristic: score the best live beam at its
            # current length; if that cannot beat the worst hypothesis, stop.
            best = self.live[0]
            best_possible = best.cum_logprob / len(best.output_tokens) ** length_penalty
            self.done = best_possible <= beam_score(self.hypotheses[-1], length_penalty)


def num_beam_candidates(beam_width: int, num_eos_ids: int) -> int:
    """Candidates kept per round (transformers' count): enough that ``beam_width`` non-EOS ones remain."""
    return max(2, 1 + num_eos_ids) * beam_width


def run_beam_search(engine, prompt_token_ids: list[list[int]], params: BeamSearchParams,
                    progress=None, cache_salts: Optional[list[Optional[str]]] = None) -> list[BeamSearchOutput]:
    eos = frozenset() if params.ignore_eos else frozenset(engine.eos_token_ids)
    num_candidates = num_beam_candidates(params.beam_width, len(eos))
    step_params = SamplingParams(temperature=params.temperature, max_tokens=1, logprobs=num_candidates,
                                 ignore_eos=True, detokenize=False)
    salts = cache_salts or [None] * len(prompt_token_ids)
    searches = [_PromptSearch([BeamSearchSequence(list(tokens), len(tokens))], salt)
                for tokens, salt in zip(prompt_token_ids, salts)]
    request_ids = count()
    for step in range(params.max_tokens):
        active = [search for search in searches if not search.done]
        if not active:
            break
        children = _expand(engine, active, step_params, request_ids, count_prefix_queries=step == 0)
        for search, pool in zip(active, children):
            search.advance(pool, params, eos, num_candidates, last=step == params.max_tokens - 1)
        if progress is not None:
            progress.update(1)

    outputs = []
    for search in searches:
        if engine.tokenizer is not None:
            for beam in search.hypotheses:
                beam.text = engine.tokenizer.decode(beam.output_tokens, skip_special_tokens=True)
        outputs.append(BeamSearchOutput(search.hypotheses))
    return outputs


def _expand(engine, searches: list[_PromptSearch], step_params: SamplingParams, request_ids: Iterator[int],
            count_prefix_queries: bool) -> list[list[BeamSearchSequence]]:
    """Run every live beam one token forward; return each search's children (one per returned logprob)."""
    owners: dict[str, tuple[int, BeamSearchSequence]] = {}
    children: list[list[BeamSearchSequence]] = [[] for _ in searches]
    requests = []
    for index, search in enumerate(searches):
        for beam in search.live:
            request_id = f"beam-{next(request_ids)}"
            requests.append((request_id, {"prompt_token_ids": beam.tokens, "cache_salt": search.cache_salt},
                             step_params))
            owners[request_id] = (index, beam)
    # A later round's look-ups find the beams' own blocks: reuse internal to this search, not
    # prompts a user sent, so they stay out of the prefix-cache hit rate.
    engine.add_requests(requests, stream=False, count_prefix_stats=count_prefix_queries)  # all or none
    try:
        pending = set(owners)
        while pending:
            for output in engine.step():
                if output.request_id not in pending or not output.finished:
                    continue  # another caller's request
                pending.discard(output.request_id)
                index, beam = owners[output.request_id]
                for token, logprob in output.outputs[0].logprobs[0].items():
                    children[index].append(BeamSearchSequence(
                        beam.tokens + [token], beam.num_prompt_tokens, beam.cum_logprob + logprob.logprob,
                        beam.logprobs + [logprob.logprob]))
    except BaseException:
        engine.abort_request(list(owners))
        raise
    return children
