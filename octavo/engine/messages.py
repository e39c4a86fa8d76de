"""What the front end and the engine core say to each other.

The core works in token ids only: requests come in as prompt ids plus sampling settings, and
every step sends back, per request that advanced, each sample's new token ids (and logprobs
when asked) and how it finished. Text, stop strings and response formats stay in the front
end. The messages are msgspec structs encoded as msgpack arrays: compact, fast, typed on
decode, and never pickles, so nothing that arrives over the socket can run code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import msgspec

from octavo.config import CacheConfig, EngineConfig, SchedulerConfig
from octavo.sampling_params import SamplingParams

# token id -> (logprob, rank), the sampler's table for one position.
TopLogprobs = dict[int, tuple[float, int]]


class CoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request for the core. ``core_id`` is the front end's private id: it is never reused, so
    outputs of an aborted request can never be taken for those of a new one with the same name."""

    core_id: int
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # SamplingParams fields (plain data)
    arrival_time: float
    cache_salt: Optional[str] = None
    # Beam search rounds look up their own beams' blocks: keep them out of the hit rate.
    count_prefix_stats: bool = True

    @staticmethod
    def sampling_fields(params: SamplingParams) -> dict[str, Any]:
        return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)


class SampleDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one sample of a request gained in one step."""

    index: int
    new_token_ids: list[int]
    # The sampled tokens' own logprobs, when the front end needs them (logprobs or best_of).
    new_logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[TopLogprobs]] = None  # with params.logprobs
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: Optional[int] = None  # the stop token id that ended it


class CoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    core_id: int
    samples: list[SampleDelta]
    finished: bool = False
    error: Optional[str] = None  # the core refused the request (nothing ran); a 400 for a server
    prompt_logprobs: Optional[list[Optional[TopLogprobs]]] = None  # new prompt positions this step
    num_cached_tokens: int = 0
    first_scheduled_time: Optional[float] = None


class CoreStats(msgspec.Struct, array_like=True):
    """The scheduler and KV cache as the gauges show them (requests, not sequences)."""

    num_running_requests: int
    num_waiting_requests: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_shared_blocks: int
    blocks_saved_by_sharing: int
    num_preemptions: int
    # Prompt tokens the model computed (the prefix cache's hits are not): shows where prefixes were paid for.
    num_prefill_tokens_computed: int = 0


class CoreInfo(msgspec.Struct):
    """Sent once the core has loaded the model: what the front end reports and plans with."""

    num_blocks: int
    block_size: int
    dtype: str
    device: str
    max_model_len: int
    max_num_seqs: int
    weight_bytes: int = 0  # the model's parameters as loaded (quantized ones are smaller)
    load_seconds: float = 0.0  # building the model and its weights


# ---- the wire --------------------------------------------------------------------------------
class AddRequests(msgspec.Struct, tag=True, array_like=True):
    requests: list[CoreRequest]


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    """Abort whole requests, or with ``sample_indices`` only those samples (a stop string ended
    them in the front end)."""

    core_ids: list[int]
    sample_indices: Optional[list[Optional[list[int]]]] = None


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    outputs: list[CoreOutput]
    stats: Optional[CoreStats] = None
    # The common case in two columns rather than a CoreOutput each: requests whose only news is
    # one more token of their lone sample, with no logprobs, that finishes nothing.
    token_core_ids: list[int] = []
    token_ids: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.outputs or self.token_core_ids or self.stats is not None)

    def merge(self, later: "StepOutputs") -> None:
        """Append a later message's outputs; its gauges, if any, replace these.

        A reader takes ``outputs`` first and the columns after them, which is right within one
        step (a request is in one or the other) but not across steps: a request's token in this
        step's columns must come before its finishing output in the later step. So this step's
        columns become outputs first, and only the latest step's columns stay columns.
        """
        self.outputs += [CoreOutput(core_id, [SampleDelta(0, [token])])
                         for core_id, token in zip(self.token_core_ids, self.token_ids)]
        self.outputs += later.outputs
        self.token_core_ids, self.token_ids = later.token_core_ids, later.token_ids
        self.stats = later.stats or self.stats


class Ready(msgspec.Struct, tag=True, array_like=True):
    info: CoreInfo


class CoreFailed(msgspec.Struct, tag=True, array_like=True):
    """The core stopped for good: at start-up (``during_startup``) or in a step."""

    error_type: str
    message: str
    during_startup: bool


ToCore = Union[AddRequests, AbortRequests, Shutdown]
FromCore = Union[StepOutputs, Ready, CoreFailed]

_encoder = msgspec.msgpack.Encoder()
_to_core_decoder = msgspec.msgpack.Decoder(ToCore)
_from_core_decoder = msgspec.msgpack.Decoder(FromCore)


def encode(message: Union[ToCore, FromCore]) -> bytes:
    return _encoder.encode(message)


def decode_to_core(data: bytes) -> ToCore:
    return _to_core_decoder.decode(data)


def decode_from_core(data: bytes) -> FromCore:
    return _from_core_decoder.decode(data)


def encode_startup(config: EngineConfig, eos_token_ids: frozenset[int]) -> bytes:
    """What a new core process reads on its standard input: its config and the EOS ids."""
    values = {name: getattr(config, name) for name in config.__dataclass_fields__}
    values["dtype"] = str(config.dtype).removeprefix("torch.")
    values["cache"] = vars(config.cache)
    values["scheduler"] = vars(config.scheduler)
    return msgspec.json.encode({"config": values, "eos_token_ids": sorted(eos_token_ids)})


def decode_startup(data: bytes) -> tuple[EngineConfig, list[int]]:
    startup = msgspec.json.decode(data)
    values = startup["config"]
    values["cache"] = CacheConfig(**values["cache"])
    values["scheduler"] = SchedulerConfig(**values["scheduler"])
    return EngineConfig(**values), startup["eos_token_ids"]
