"""LLMEngine: the synchronous front end over an engine core (``LLM`` and beam search use it).

``add_request`` tokenizes and checks a prompt here, then queues it in the core; ``step`` takes
the core's next outputs and turns them into ``RequestOutput``s (detokenization, stop strings,
logprob texts). With the core in its own process (the default on CUDA) the core runs its next
step while this one detokenizes; in-process, ``step`` runs the core's step first.
"""

from __future__ import annotations

import logging
from itertools import count
from typing import Iterable, Optional, Union

import torch

from octavo.config import EngineConfig, resolve_device
from octavo.engine.core_client import InprocCoreClient, ProcessCoreClient
from octavo.engine.data_parallel import DataParallelCoreClient, uses_replicas
from octavo.engine.gc_tuning import tune_after_startup
from octavo.engine.input_processor import InputProcessor, PromptInput
from octavo.engine.messages import CoreRequest, CoreStats
from octavo.engine.output_processor import OutputProcessor, RequestState
from octavo.outputs import RequestOutput
from octavo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "PromptInput", "RequestState", "uses_core_process"]


def uses_core_process(config: EngineConfig) -> bool:
    """The core gets its own process on CUDA unless the config says otherwise (replicas always do)."""
    if uses_replicas(config):
        return True
    if config.engine_core_process is not None:
        return config.engine_core_process
    return resolve_device(config.device).type == "cuda"


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.inputs = InputProcessor(config, core_in_process=not uses_core_process(config))
        self.tokenizer = self.inputs.tokenizer
        self.eos_token_ids = self.inputs.eos_token_ids
        self.max_model_len = self.inputs.max_model_len
        self.vocab_size = self.inputs.vocab_size
        self.model_path = self.inputs.model_path
        log_level = logging.getLevelName(logging.getLogger("octavo").getEffectiveLevel())
        if uses_replicas(config):
            self.core_client: Union[InprocCoreClient, ProcessCoreClient, DataParallelCoreClient] = \
                DataParallelCoreClient(config, self.eos_token_ids, log_level)
        elif uses_core_process(config):
            self.core_client = ProcessCoreClient(config, self.eos_token_ids, log_level)
        else:
            self.core_client = InprocCoreClient(config, self.eos_token_ids)
        info = self.core_client.info
        self.block_size = info.block_size
        self.num_kv_blocks = info.num_blocks
        self.device = torch.device(info.device)
        self.dtype: torch.dtype = getattr(torch, info.dtype)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self.outputs = OutputProcessor(self.tokenizer)
        self._routed = isinstance(self.core_client, DataParallelCoreClient)
        self._ids: dict[str, int] = {}  # request id -> core id of the live request
        self._core_ids = count()
        self._refusals: list[ValueError] = []  # the core refused these requests; step() raises them
        tune_after_startup(freeze=False)  # the user's process: a dropped engine must stay collectable

    @property
    def core(self):
        """The in-process ``EngineCore`` (for tools and tests that look inside); None across processes."""
        return getattr(self.core_client, "core", None)

    # ---- requests ----------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int], Optional[str]]:
        return self.inputs.tokenize_prompt(prompt)

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        self.inputs.validate_prompt(token_ids, params)

    def add_request(self, request_id: str, prompt: PromptInput, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None, stream: bool = True,
                    count_prefix_stats: bool = True) -> None:
        """Validate and queue a request; raises ValueError (nothing queued) on bad input.

        With ``stream=False`` ``step()`` reports the request only once it has finished,
        which spares building an output per request per step (offline batches).
        ``count_prefix_stats=False`` keeps its prefix-cache look-up out of the hit rate.
        """
        self.add_requests([(request_id, prompt, params)], arrival_time, stream, count_prefix_stats)

    def add_requests(self, requests: Iterable[tuple[str, PromptInput, Optional[SamplingParams]]],
                     arrival_time: Optional[float] = None, stream: bool = True,
                     count_prefix_stats: bool = True) -> None:
        """``add_request`` for many at once, sent to the core in one message; all or none are queued."""
        core_requests, states, new_ids = [], [], set()
        try:
            for request_id, prompt, params in requests:
                params = params or SamplingParams()
                if request_id in self._ids or request_id in new_ids:
                    raise ValueError(f"request id {request_id!r} is already in use.")
                new_ids.add(request_id)
                text, token_ids, cache_salt = self.inputs.tokenize_prompt(prompt)
                self.inputs.validate_prompt(token_ids, params)
                core_id = next(self._core_ids)
                state = self.outputs.new_request(request_id, core_id, text, token_ids, params, stream, arrival_time)
                states.append(state)
                core_requests.append(CoreRequest(core_id, token_ids, CoreRequest.sampling_fields(params),
                                                 state.arrival_time, cache_salt, count_prefix_stats))
        except BaseException:
            for state in states:
                self.outputs.remove(state.core_id)
            raise
        for state in states:
            self._ids[state.request_id] = state.core_id
        self.core_client.add(core_requests)

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        """Stop requests at once and free their blocks; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        core_ids = []
        for request_id in request_ids:
            core_id = self._ids.pop(request_id, None)
            if core_id is not None:
                self.outputs.remove(core_id)
                core_ids.append(core_id)
        if core_ids:
            self.core_client.abort(core_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self._ids)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._ids)

    # ---- the step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Take the core's next outputs; returns an output for every request reported this step
        (streaming ones each time they advance, the others once finished)."""
        if self._refusals:
            raise self._refusals.pop(0)
        if not self._ids:
            return []
        step = self.outputs.process(self.core_client.get_outputs())
        if step.stopped_samples:
            core_ids, indices = zip(*step.stopped_samples)
            self.core_client.abort(list(core_ids), list(indices))
        for state, output in step.outputs:
            if output.finished:
                del self._ids[output.request_id]
                if self._routed:
                    self.core_client.release(state.core_id)
        for state, error in step.refused:
            self._ids.pop(state.request_id, None)
            self._refusals.append(ValueError(f"the engine refused request {state.request_id!r}: {error}"))
        if self._refusals and not step.outputs:
            raise self._refusals.pop(0)
        return [output for _, output in step.outputs]  # a refusal that came with outputs: the next call

    # ---- stats and life cycle ------------------------------------------------------------
    def stats(self) -> Optional[CoreStats]:
        """The core's latest gauges (in-process: now)."""
        return self.core_client.stats()

    def kv_cache_stats(self):
        """Detailed KV statistics; needs the in-process core."""
        if self.core is None:
            raise RuntimeError("kv_cache_stats() needs the in-process engine core (engine_core_process=False).")
        return self.core.kv_cache_stats()

    def shutdown(self) -> None:
        self.core_client.shutdown()
