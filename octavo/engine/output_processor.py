"""The front end's side of every step: token ids from the core become text and outputs.

For each request this keeps what the user sees: per sample the generated ids, the incremental
detokenizer (which also finds stop strings), logprobs with their token texts, the cumulative
logprob, and how it finished. A stop string is found here, not in the core, so the sample is
finished here and reported back for the core to abort; tokens the core sends for it after
that are dropped. This runs in the caller's process, beside the core's step loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from octavo.engine.detokenizer import IncrementalDetokenizer, decode_token
from octavo.engine.messages import CoreOutput, SampleDelta, StepOutputs, TopLogprobs
from octavo.outputs import CompletionDelta, CompletionOutput, Logprob, PromptLogprobs, RequestOutput, \
    SampleLogprobs, StreamingRequestOutput
from octavo.sampling_params import SamplingParams


@dataclass
class SampleState:
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[SampleLogprobs] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    num_sent_tokens: int = 0  # tokens already in a delivered streaming delta
    # No text and no logprobs to build: a token that finishes nothing is only appended.
    ids_only: bool = False


@dataclass
class RequestState:
    request_id: str
    core_id: int
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    stream: bool  # report every step, not only once finished
    arrival_time: float
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        return all(sample.finish_reason is not None for sample in self.samples)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(sample.token_ids) for sample in self.samples)


@dataclass
class ProcessedStep:
    outputs: list[tuple[RequestState, RequestOutput]]  # StreamingRequestOutput for streaming requests
    # (core id, sample indices) the front end finished on a stop string: the core must abort them.
    stopped_samples: list[tuple[int, list[int]]]
    refused: list[tuple[RequestState, str]]  # the core refused these (nothing ran)
    advanced: list[RequestState]  # every request that gained tokens this step (for metrics)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[int, RequestState] = {}  # by core id

    def new_request(self, request_id: str, core_id: int, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, stream: bool, arrival_time: Optional[float] = None) -> RequestState:
        detokenize = params.detokenize and self.tokenizer is not None
        samples = [
            SampleState(IncrementalDetokenizer(self.tokenizer if detokenize else None, prompt_token_ids, params),
                        logprobs=[] if params.logprobs is not None else None,
                        ids_only=not detokenize and params.logprobs is None)
            for _ in range(params.num_samples)
        ]
        state = RequestState(request_id, core_id, prompt, prompt_token_ids, params, samples, stream,
                             arrival_time if arrival_time is not None else time.monotonic(),
                             prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self.requests[core_id] = state
        return state

    def remove(self, core_id: int) -> Optional[RequestState]:
        return self.requests.pop(core_id, None)

    def process(self, message: StepOutputs) -> ProcessedStep:
        step = ProcessedStep([], [], [], [])
        now = time.monotonic()
        for core_output in message.outputs:
            self._take(step, core_output, now)
        requests = self.requests
        for core_id, token in zip(message.token_core_ids, message.token_ids):
            state = requests.get(core_id)
            if state is None:
                continue  # aborted while the core was computing it
            sample = state.samples[0]
            if not sample.ids_only or sample.finish_reason is not None or state.stream:
                # Text to build, a stop string to look for, or a stream to feed: the full path.
                self._take(step, CoreOutput(core_id, [SampleDelta(0, [token])]), now)
                continue
            sample.token_ids.append(token)  # what _take would do for it, without its per-output work
            step.advanced.append(state)
        return step

    def _take(self, step: ProcessedStep, core_output: CoreOutput, now: float) -> None:
        """One request's output from the core: its new tokens, and whether it finished."""
        state = self.requests.get(core_output.core_id)
        if state is None:
            return  # aborted while the core was computing it
        if core_output.error is not None:
            del self.requests[core_output.core_id]
            step.refused.append((state, core_output.error))
            return
        if core_output.first_scheduled_time is not None:  # the first output: it says what was cached
            state.first_scheduled_time = core_output.first_scheduled_time
            state.num_cached_tokens = core_output.num_cached_tokens
        if core_output.prompt_logprobs is not None and state.prompt_logprobs is not None:
            state.prompt_logprobs.extend(self._logprob_dicts(core_output.prompt_logprobs))
        stopped, may_finish = [], core_output.finished
        for delta in core_output.samples:
            sample = state.samples[delta.index]
            if (sample.ids_only and delta.finish_reason is None and delta.new_logprobs is None
                    and sample.finish_reason is None):
                sample.token_ids += delta.new_token_ids  # what _apply would do, without its per-token work
                continue
            may_finish = True
            if self._apply(state, delta):
                stopped.append(delta.index)
        if stopped and not core_output.finished:
            step.stopped_samples.append((state.core_id, stopped))
        if core_output.samples:
            if state.first_token_time is None:
                state.first_token_time = now
            step.advanced.append(state)
        finished = may_finish and state.finished
        if finished:
            del self.requests[core_output.core_id]
        if finished or state.stream:
            step.outputs.append((state, self.make_output(state)))

    def _apply(self, state: RequestState, delta: SampleDelta) -> bool:
        """Add one sample's new tokens; True if a stop string ended it here (the core does not know)."""
        sample = state.samples[delta.index]
        params = state.params
        last = len(delta.new_token_ids) - 1
        for position, token in enumerate(delta.new_token_ids):
            if sample.finish_reason is not None:
                return False  # ended here on a stop string; the core's abort is on its way
            sample.token_ids.append(token)
            if delta.new_logprobs is not None:
                sample.cumulative_logprob += delta.new_logprobs[position]
            if sample.logprobs is not None and delta.top_logprobs is not None:
                sample.logprobs.append(self._logprob_dicts([delta.top_logprobs[position]])[0])
            core_finish = delta.finish_reason if position == last else None
            token_stop = core_finish == "stop"  # a stop token or EOS: not text unless asked for
            if not token_stop or params.include_stop_str_in_output:
                matched = sample.detokenizer.append([token], find_stops=len(sample.token_ids) >= params.min_tokens)
                if matched is not None and not token_stop:
                    sample.finish_reason, sample.stop_reason = "stop", matched
                    return core_finish is None  # else the core ended it too (length) at this token
            if core_finish is not None:
                sample.finish_reason, sample.stop_reason = core_finish, delta.stop_reason
        return False

    def _logprob_dicts(self, entries: list[Optional[TopLogprobs]]) -> list[Optional[dict[int, Logprob]]]:
        tokenizer = self.tokenizer
        return [
            None if entry is None else {
                token_id: Logprob(value, rank, decode_token(tokenizer, token_id) if tokenizer is not None else None)
                for token_id, (value, rank) in entry.items()
            }
            for entry in entries
        ]

    def make_output(self, state: RequestState) -> RequestOutput:
        finished = state.finished
        params = state.params
        indexed = list(enumerate(state.samples))
        if finished and len(indexed) > params.n:
            # best_of: keep the n most likely completions
            indexed = sorted(indexed, key=lambda item: item[1].cumulative_logprob, reverse=True)[: params.n]
        else:
            indexed = indexed[: params.n]
        completions = [
            CompletionOutput(
                index=index,
                text=sample.detokenizer.text,
                token_ids=sample.token_ids,  # grows while streaming (the deltas say what is new)
                cumulative_logprob=sample.cumulative_logprob if params.logprobs is not None else None,
                logprobs=sample.logprobs,
                finish_reason=sample.finish_reason,
                stop_reason=sample.stop_reason,
            )
            for index, (_, sample) in enumerate(indexed)
        ]
        values = dict(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens,
            metrics={
                "arrival_time": state.arrival_time,
                "first_scheduled_time": state.first_scheduled_time,
                "first_token_time": state.first_token_time,
            },
        )
        if not state.stream:
            return RequestOutput(**values)
        return StreamingRequestOutput(**values, deltas=self._deltas(state) if len(indexed) == len(state.samples)
                                      else [])

    @staticmethod
    def _deltas(state: RequestState) -> list[CompletionDelta]:
        """Per sample, what is new since the last delivered output (every sample returned)."""
        deltas = []
        for sample in state.samples:
            sent, num_tokens = sample.num_sent_tokens, len(sample.token_ids)
            deltas.append(CompletionDelta(
                text=sample.detokenizer.take_stream_delta(sample.finish_reason is not None),
                token_ids=sample.token_ids[sent:],
                logprobs=None if sample.logprobs is None else sample.logprobs[sent:num_tokens],
            ))
            sample.num_sent_tokens = num_tokens
        return deltas
