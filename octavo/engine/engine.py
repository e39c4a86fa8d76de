"""LLMEngine: add requests, run steps, collect outputs.

Each ``step()`` asks the scheduler what runs, has the model runner compute it,
then appends sampled tokens, checks stop conditions, detokenizes and frees the
blocks of finished sequences. Requests added between steps join the next one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import count
from typing import Any, Iterable, Optional, Union

import torch

from octavo.config import EngineConfig, resolve_device, resolve_dtype
from octavo.engine.detokenizer import IncrementalDetokenizer, decode_token
from octavo.engine.request import Sequence, SequenceStatus
from octavo.engine.scheduler import ScheduledBatch, Scheduler
from octavo.kv_cache.manager import KVCacheManager, KVCacheStats
from octavo.model_loader import loader
from octavo.outputs import CompletionOutput, Logprob, RequestOutput
from octavo.sampling_params import SamplingParams
from octavo.worker.kv_cache_memory import bytes_per_block, check_cuda_share, cpu_kv_cache_bytes, cuda_kv_cache_bytes
from octavo.worker.model_runner import LaunchedStep, ModelRunner, SampledToken
from octavo.worker.sampler import make_generator

logger = logging.getLogger(__name__)

PromptInput = Union[str, dict[str, Any]]


@dataclass
class RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    logprobs: Optional[list[list[dict[int, Logprob]]]]  # per sequence, when params.logprobs is set
    stream: bool = True  # report every step, not only when finished

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        path = loader.check_model_path(config.model, config.load_format)
        self.model_path = path
        self.hf_config = loader.load_hf_config(path)
        self.dtype = resolve_dtype(config.dtype, loader.checkpoint_dtype(self.hf_config), self.device)
        self.max_model_len = loader.derive_max_model_len(self.hf_config, config.max_model_len)
        torch.manual_seed(config.seed)
        # The share must be free before loading; the engine's own use is measured from here.
        self._cuda_reserved_at_start = (check_cuda_share(self.device, config.cache.gpu_memory_utilization)
                                        if self.device.type == "cuda" else 0)

        started = time.perf_counter()
        self.model = loader.build_model(
            path, self.hf_config, self.dtype, self.device, self.max_model_len,
            config.load_format, config.allow_pickle_weights, config.seed, config.gguf_weights,
        )
        self.tokenizer = None if config.skip_tokenizer_init else loader.load_tokenizer(path, config.tokenizer)
        self.eos_token_ids = loader.eos_token_ids(path, self.hf_config, self.tokenizer)
        self.vocab_size = self.hf_config.vocab_size
        logger.info("loaded %s (%s, %s) in %.1fs", path, self.dtype, self.device, time.perf_counter() - started)

        cache, sched = config.cache, config.scheduler
        self.block_size = cache.block_size
        max_batched = sched.step_token_budget(self.device, self.max_model_len)
        if not sched.enable_chunked_prefill and max_batched < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) is smaller than max_model_len ({self.max_model_len}) "
                "with chunked prefill off: long prompts could never run. Raise it or enable chunked prefill."
            )
        self.runner = ModelRunner(self.model, self.device, self.dtype, self.block_size, self.eos_token_ids,
                                  config.attention_backend)
        num_blocks = self._num_kv_blocks(max_batched, sched.max_num_seqs)
        self.runner.allocate_kv_cache(num_blocks)
        if not config.enforce_eager:
            self.runner.capture_cuda_graphs(sched.max_num_seqs, self.max_model_len)
        self.kv_cache = KVCacheManager(num_blocks, self.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, sched.max_num_seqs, max_batched, sched.enable_chunked_prefill,
                                   sched.prefill_chunk_cap(self.device, max_batched))
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens; max_model_len %d",
            num_blocks, self.block_size, num_blocks * self.block_size, self.max_model_len,
        )

        self.requests: dict[str, RequestState] = {}
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._in_flight: Optional[tuple[ScheduledBatch, LaunchedStep]] = None
        self._seq_ids = count()
        self.peak_kv_waste_slots = 0
        self.peak_running_at_waste = 0
        self.num_prefill_tokens_computed = 0

    # ---- sizing ------------------------------------------------------------------------
    def _num_kv_blocks(self, max_batched_tokens: int, max_num_seqs: int) -> int:
        cache = self.config.cache
        per_block = bytes_per_block(len(self.runner.attention_layers), self.block_size, self.runner.num_kv_heads,
                                    self.runner.head_dim, self.dtype)
        if cache.num_gpu_blocks_override is not None:
            num_blocks = cache.num_gpu_blocks_override
        elif self.device.type == "cuda":
            peak = self.runner.profile_peak_activation_bytes(max_batched_tokens, self.max_model_len, max_num_seqs)
            num_blocks = cuda_kv_cache_bytes(self.device, cache.gpu_memory_utilization, peak,
                                             self._cuda_reserved_at_start) // per_block
        else:
            num_blocks = cpu_kv_cache_bytes(cache.kv_cache_memory) // per_block
            if cache.kv_cache_memory is None:
                # The default budget is generous; never hold more than a full batch can use.
                num_blocks = min(num_blocks, max_num_seqs * -(-self.max_model_len // self.block_size))
        needed = -(-self.max_model_len // self.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, fewer than max_model_len "
                f"({self.max_model_len}): lower max_model_len or give the cache more memory "
                "(gpu_memory_utilization on GPU, kv_cache_memory on CPU)."
            )
        return num_blocks

    # ---- requests ----------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int], Optional[str]]:
        """(text, token ids, cache salt) from a string or a ``{"prompt"|"prompt_token_ids": ...}`` dict."""
        cache_salt = None
        if isinstance(prompt, dict):
            cache_salt = prompt.get("cache_salt")
            if cache_salt is not None and not isinstance(cache_salt, str):
                raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}.")
            if "prompt_token_ids" in prompt:
                token_ids = prompt["prompt_token_ids"]
                # ``type(t) is int`` also refuses bools, and is fast over long prompts.
                if not isinstance(token_ids, (list, tuple)) or not all(type(t) is int for t in token_ids):
                    raise ValueError("prompt_token_ids must be a list of integers.")
                return prompt.get("prompt"), list(token_ids), cache_salt
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key.")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(
                f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt).__name__}."
            )
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} instead of text.")
        return prompt, self.tokenizer.encode(prompt), cache_salt

    def add_request(self, request_id: str, prompt: PromptInput, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None, stream: bool = True) -> None:
        """Validate and queue a request; raises ValueError (nothing queued) on bad input.

        With ``stream=False`` ``step()`` reports the request only once it has finished,
        which spares building an output per request per step (offline batches).
        """
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use.")
        text, token_ids, cache_salt = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids, params)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(token_ids)
        seqs = []
        for index in range(params.num_samples):
            generator = make_generator(params.seed + index, self.device) if params.seed is not None else None
            seqs.append(Sequence(next(self._seq_ids), request_id, index, token_ids, params, max_tokens,
                                 generator, cache_salt, arrival_time))
        detokenize = params.detokenize and self.tokenizer is not None
        state = RequestState(
            request_id, text, token_ids, params, seqs,
            detokenizers=[IncrementalDetokenizer(self.tokenizer if detokenize else None, token_ids, params)
                          for _ in seqs],
            logprobs=[[] for _ in seqs] if params.logprobs is not None else None,
            stream=stream,
        )
        self.requests[request_id] = state
        # Only the first sample computes the prompt; the others fork from it (sharing blocks).
        seqs[0].pending_forks = seqs[1:]
        self.scheduler.add(seqs[0])

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token.")
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            bad = next(t for t in token_ids if not 0 <= t < self.vocab_size)
            raise ValueError(f"prompt token id {bad} is out of the vocabulary [0, {self.vocab_size}).")
        if params.num_samples > self.scheduler.max_num_seqs:
            raise ValueError(
                f"n/best_of ({params.num_samples}) exceeds max_num_seqs ({self.scheduler.max_num_seqs}); "
                "lower it or start the engine with a larger max_num_seqs."
            )
        if params.stop and (self.tokenizer is None or not params.detokenize):
            raise ValueError(
                "stop strings need detokenized text: "
                + ("this model has no tokenizer" if self.tokenizer is None else "detokenize is False")
                + "; use stop_token_ids instead."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name} ({value}) exceeds the vocabulary size ({self.vocab_size}).")
        max_tokens = params.max_tokens or 1
        if len(token_ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request has "
                f"{len(token_ids)} prompt tokens and max_tokens={max_tokens} "
                f"({len(token_ids) + max_tokens} in all). Shorten the prompt or lower max_tokens."
            )

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        """Stop requests at once and free their blocks; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                self.scheduler.abort(state.seqs)
        self._drop_in_flight_if_idle()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that advanced.

        With asynchronous scheduling (CUDA by default) the step is pipelined: it plans and
        queues step ``k`` on the device, then processes the tokens of step ``k - 1`` while the
        device computes, so host work hides behind device work. The outputs therefore trail
        the device by one step, and a sequence that stops on a token (EOS, stop string)
        costs one discarded token of compute.
        """
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self._in_flight is not None:
                return self._process(*self._take_in_flight())
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending (a request that can never fit).")
            return []
        if not self.async_scheduling:
            return self._process(batch, self._launch(batch, None))
        previous = self._in_flight
        self._in_flight = (batch, self._launch(batch, previous[1] if previous else None))
        outputs = self._process(*previous) if previous is not None else []
        self._drop_in_flight_if_idle()
        return outputs

    def _drop_in_flight_if_idle(self) -> None:
        """With every request gone, the step in flight holds only tokens nobody wants: collect it
        now, so an idle engine has nothing pending."""
        if not self.requests and self._in_flight is not None:
            self._process(*self._take_in_flight())

    def _take_in_flight(self) -> tuple[ScheduledBatch, LaunchedStep]:
        in_flight, self._in_flight = self._in_flight, None
        return in_flight

    def _launch(self, batch: ScheduledBatch, previous: Optional[LaunchedStep]) -> LaunchedStep:
        """Queue the batch on the device and advance the host's counters as if it had run."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_output_tokens == 0 and seq.num_pending_tokens == 0:
                self.num_prefill_tokens_computed += num_new
        block_tables = [self.kv_cache.block_table(seq.seq_id) for seq in batch.seqs]
        launched = self.runner.launch(batch, block_tables, previous)
        self.scheduler.on_step_launched(batch)
        # Index filled blocks now, not when the tokens arrive, so the very next step's new
        # requests can hit them (their K/V is written before any later step reads it).
        self.scheduler.cache_full_blocks(batch.seqs)
        for seq in launched.samplers:
            seq.num_pending_tokens += 1
        self._track_waste()
        return launched

    def _process(self, batch: ScheduledBatch, launched: LaunchedStep) -> list[RequestOutput]:
        """Take a launched step's tokens: append them, check stops, build outputs."""
        result = launched.wait()
        touched: dict[str, RequestState] = {}
        now = time.monotonic()
        for seq in batch.seqs:
            state = self.requests.get(seq.request_id)
            if state is not None and state.seqs[seq.sample_index] is not seq:
                state = None  # aborted, and its id already reused by a new request
            if seq.seq_id in result.prompt_logprobs and state is not None:
                seq.prompt_logprobs.extend(self._to_logprob_dicts(result.prompt_logprobs[seq.seq_id]))
            if seq.seq_id not in result.sampled:
                continue
            family = [seq] + (self.scheduler.fork(seq) if seq.pending_forks and state is not None else [])
            for member in family:
                member.num_pending_tokens -= 1
                if state is None or member.is_finished:
                    continue  # aborted, or stopped on the token before (one step was in flight)
                if member.first_token_time is None:
                    member.first_token_time = now
                self._append_token(state, member, result.sampled[member.seq_id])
                # Offline (non-streaming) requests are reported only once they finish.
                if state.stream or member.is_finished:
                    touched[state.request_id] = state

        outputs = []
        for state in touched.values():
            finished = state.finished
            if finished or state.stream:
                outputs.append(self._make_output(state))
            if finished:
                del self.requests[state.request_id]
        return outputs

    def _append_token(self, state: RequestState, seq: Sequence, sampled: SampledToken) -> None:
        params = seq.params
        token = sampled.token_id
        seq.append_token(token, sampled.logprob)
        if state.logprobs is not None:  # the sampler's table always includes the sampled token
            state.logprobs[seq.sample_index].append(self._to_logprob_dicts([sampled.top_logprobs])[0])

        may_stop = seq.num_output_tokens >= params.min_tokens
        status, stop_reason = None, None
        is_stop_token = token in params.stop_token_ids
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        if may_stop and is_stop_token:
            status, stop_reason = SequenceStatus.FINISHED_STOPPED, token
        elif may_stop and is_eos:
            status = SequenceStatus.FINISHED_STOPPED
        if status is None or params.include_stop_str_in_output:
            # Below min_tokens a stop string must neither end nor cut the text.
            matched = state.detokenizers[seq.sample_index].append([token], find_stops=may_stop)
            if matched is not None and status is None:
                status, stop_reason = SequenceStatus.FINISHED_STOPPED, matched
        if status is None and (seq.num_output_tokens >= seq.max_tokens or len(seq.token_ids) >= self.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            seq.stop_reason = stop_reason
            self.scheduler.finish(seq, status)

    def _to_logprob_dicts(self, entries) -> list[dict[int, Logprob]]:
        decode = self.tokenizer is not None
        return [
            {token_id: Logprob(value, rank, decode_token(self.tokenizer, token_id) if decode else None)
             for token_id, (value, rank) in (entry or {}).items()}
            for entry in entries
        ]

    def _make_output(self, state: RequestState) -> RequestOutput:
        finished = state.finished
        seqs = state.seqs
        if finished and len(seqs) > state.params.n:
            # best_of: keep the n most likely completions
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: state.params.n]
        else:
            seqs = seqs[: state.params.n]
        completions = []
        for index, seq in enumerate(seqs):
            detokenizer = state.detokenizers[seq.sample_index]
            completions.append(CompletionOutput(
                index=index,
                text=detokenizer.text,
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if state.params.logprobs is not None else None,
                logprobs=state.logprobs[seq.sample_index] if state.logprobs is not None else None,
                finish_reason=seq.status.value if seq.is_finished else None,
                stop_reason=seq.stop_reason,
            ))
        first = state.seqs[0]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=first.prompt_logprobs,
            num_cached_tokens=first.num_cached_prompt_tokens,
            metrics={
                "arrival_time": first.arrival_time,
                "first_scheduled_time": first.first_scheduled_time,
                "first_token_time": first.first_token_time,
            },
        )

    # ---- stats -------------------------------------------------------------------------
    def _track_waste(self) -> None:
        waste = self.scheduler.kv_waste_slots()
        if waste > self.peak_kv_waste_slots:
            self.peak_kv_waste_slots = waste
            self.peak_running_at_waste = self.scheduler.num_running

    def kv_cache_stats(self) -> KVCacheStats:
        stats = self.kv_cache.stats()
        stats.num_allocated_slots, stats.num_filled_slots = self.scheduler.kv_slot_usage()
        return stats
