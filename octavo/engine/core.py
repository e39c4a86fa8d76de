"""EngineCore: the scheduler, KV cache, model runner and sampler, in token ids.

Each ``step()`` asks the scheduler what runs, has the model runner compute it, appends the
sampled tokens and applies the token-level stops (EOS, stop token ids, ``max_tokens``, the
context length). It returns, per request that advanced, each sample's new tokens. Text never
enters here: detokenization and stop strings are the front end's, which ends a sample that
hits a stop string by aborting it. Structured output is per step, so it lives here: each
constrained sample has its own grammar matcher, advanced as its tokens are appended, and the
model runner masks the logits with the matchers' bitmask; the tokenizer that grammars compile
against is loaded only when the first constrained request arrives. The core runs in its own
process behind ``core_client.ProcessCoreClient`` (``core_process.py``), or in the caller's thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import count, repeat
from typing import Callable, Iterable, Optional

import torch

from octavo.config import EngineConfig, resolve_device, resolve_dtype
from octavo.engine.messages import CoreInfo, CoreOutput, CoreRequest, CoreStats, SampleDelta, StepOutputs
from octavo.engine.request import Sequence, SequenceStatus
from octavo.engine.scheduler import ScheduledBatch, Scheduler
from octavo.kv_cache.manager import BatchBlockTables, KVCacheManager, KVCacheStats
from octavo.model_loader import loader
from octavo.sampling_params import SamplingParams
from octavo.structured_output import StructuredOutputManager
from octavo.worker.kv_cache_memory import bytes_per_block, check_cuda_share, cpu_kv_cache_bytes, cuda_kv_cache_bytes
from octavo.worker.model_runner import LaunchedStep, ModelRunner
from octavo.worker.sampler import make_generator
from octavo.worker.tensor_parallel import TensorParallelRunner, start_tensor_parallel

logger = logging.getLogger(__name__)

# The KV sharing gauges walk every block; refresh them at most this often.
_SHARING_STATS_INTERVAL_S = 1.0
_WASTE_SAMPLE_STEPS = 8  # steady steps between looks for a new peak of paging waste


def check_request_fits(token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                       max_num_seqs: int) -> None:
    """The checks every request passes before it is queued (``ValueError`` naming what to change).
    They read only fixed model limits, so a front end can answer them without the core."""
    if not token_ids:
        raise ValueError("the prompt is empty; give at least one token.")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise ValueError(f"prompt token id {bad} is out of the vocabulary [0, {vocab_size}).")
    if params.num_samples > max_num_seqs:
        raise ValueError(
            f"n/best_of ({params.num_samples}) exceeds max_num_seqs ({max_num_seqs}); "
            "lower it or start the engine with a larger max_num_seqs."
        )
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > vocab_size:
            raise ValueError(f"{name} ({value}) exceeds the vocabulary size ({vocab_size}).")
    bad_word_ids = [token for word in params.bad_words_token_ids or () for token in word]
    for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ()),
                      ("bad_words", bad_word_ids)):
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name} has token id {bad}, out of the vocabulary [0, {vocab_size}).")
    max_tokens = params.max_tokens or 1
    if len(token_ids) + max_tokens > max_model_len:
        raise ValueError(
            f"this model's maximum context length is {max_model_len} tokens, but the request has "
            f"{len(token_ids)} prompt tokens and max_tokens={max_tokens} "
            f"({len(token_ids) + max_tokens} in all). Shorten the prompt or lower max_tokens."
        )


@dataclass
class _CoreRequestState:
    core_id: int
    params: SamplingParams
    seqs: list[Sequence]
    # What the front end needs beside the token ids.
    send_logprobs: bool  # each sampled token's logprob (logprobs, or best_of ranking)
    # The token-level stops, resolved once: the ids that end a sample (stop ids, and EOS unless
    # ignored), and the length at which it ends (max_tokens or the context, whichever is first).
    stop_ids: frozenset[int]
    length_limit: int
    sent_first_scheduled: bool = False
    # Once its first output went out: a lone sample that needs nothing but its token ids (no
    # logprobs; a grammar advances there too), whose tokens that finish nothing take the short
    # path in ``_process``.
    ids_only: bool = False

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class EngineCore:
    """The step loop's state; not thread-safe (one thread or process owns it)."""

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int]) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        path = loader.check_model_path(config.model, config.load_format)
        self.model_path = path
        self.hf_config = loader.load_hf_config(path)
        self.dtype = resolve_dtype(config.dtype, loader.checkpoint_dtype(self.hf_config), self.device)
        self.max_model_len = loader.derive_max_model_len(self.hf_config, config.max_model_len)
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.structured_output = StructuredOutputManager(
            lambda: loader.load_tokenizer(self.model_path, config.tokenizer), self.vocab_size, self.eos_token_ids)
        torch.manual_seed(config.seed)
        # The share must be free before loading; the engine's own use is measured from here.
        self._cuda_reserved_at_start = (check_cuda_share(self.device, config.cache.gpu_memory_utilization)
                                        if self.device.type == "cuda" else 0)

        # Ranks 1.. start loading their shards now, beside rank 0 (this process).
        self.tensor_parallel = start_tensor_parallel(config, self.eos_token_ids, self.hf_config, self.dtype,
                                                     self.device)
        started = time.perf_counter()
        self.model = loader.build_model(
            path, self.hf_config, self.dtype, self.device, self.max_model_len,
            config.load_format, config.allow_pickle_weights, config.seed, quantization=config.quantization,
            gguf_weights=config.gguf_weights,
        )
        self.load_seconds = time.perf_counter() - started
        logger.info("loaded %s (%s, %s) in %.1fs", path, self.dtype, self.device, self.load_seconds)

        cache, sched = config.cache, config.scheduler
        self.block_size = cache.block_size
        max_batched = sched.step_token_budget(self.device, self.max_model_len)
        if not sched.enable_chunked_prefill and max_batched < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) is smaller than max_model_len ({self.max_model_len}) "
                "with chunked prefill off: long prompts could never run. Raise it or enable chunked prefill."
            )
        runner_args = (self.model, self.device, self.dtype, self.block_size, self.eos_token_ids,
                       config.attention_backend)
        if self.tensor_parallel is None:
            self.runner = ModelRunner(*runner_args)
        else:
            self.tensor_parallel.wait_ready()
            self.runner = TensorParallelRunner(self.tensor_parallel, *runner_args)
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

        self.requests: dict[int, _CoreRequestState] = {}
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._in_flight: Optional[tuple[ScheduledBatch, LaunchedStep]] = None
        self._seq_ids = count()
        self.peak_kv_waste_slots = 0
        self.peak_running_at_waste = 0
        self._waste_key: Optional[tuple[int, int]] = None
        self._waste_key_running = -1
        self._steps_since_waste = 0
        self.num_prefill_tokens_computed = 0
        self._sharing_stats: Optional[tuple[int, int]] = None
        self._sharing_stats_time = 0.0

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (the rest goes with the object)."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.shutdown()

    def info(self) -> CoreInfo:
        return CoreInfo(num_blocks=self.kv_cache.pool.num_blocks, block_size=self.block_size,
                        dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
                        max_model_len=self.max_model_len, max_num_seqs=self.scheduler.max_num_seqs,
                        weight_bytes=sum(param.numel() * param.element_size() for param in self.model.parameters()),
                        load_seconds=self.load_seconds)

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
    def add_request(self, request: CoreRequest) -> None:
        """Queue a request; raises ValueError (nothing queued) on bad input."""
        if request.core_id in self.requests:
            raise ValueError(f"request {request.core_id} is already queued.")
        params = request.sampling_params()
        check_request_fits(request.prompt_token_ids, params, self.vocab_size, self.max_model_len,
                           self.scheduler.max_num_seqs)
        token_ids = request.prompt_token_ids
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(token_ids)
        seqs = []
        for index in range(params.num_samples):
            generator = make_generator(params.seed + index, self.device) if params.seed is not None else None
            seqs.append(Sequence(next(self._seq_ids), request.core_id, index, token_ids, params, max_tokens,
                                 generator, request.cache_salt, request.arrival_time, request.count_prefix_stats))
            seqs[-1].grammar = self.structured_output.grammar_for(params.structured_outputs)  # one per sample
        send_logprobs = params.logprobs is not None or params.num_samples > params.n
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        self.requests[request.core_id] = _CoreRequestState(
            request.core_id, params, seqs, send_logprobs, stop_ids, min(len(token_ids) + max_tokens, self.max_model_len))
        # Only the first sample computes the prompt; the others fork from it (sharing blocks).
        seqs[0].pending_forks = seqs[1:]
        self.scheduler.add(seqs[0])

    def abort_requests(self, core_ids: Iterable[int],
                       sample_indices: Optional[Iterable[Optional[list[int]]]] = None) -> None:
        """Stop requests (or only the listed samples of each) and free their blocks; unknown ids
        are ignored."""
        core_ids = list(core_ids)
        per_request = list(sample_indices) if sample_indices is not None else [None] * len(core_ids)
        for core_id, indices in zip(core_ids, per_request):
            state = self.requests.get(core_id)
            if state is None:
                continue
            seqs = state.seqs if indices is None else [state.seqs[i] for i in indices if 0 <= i < len(state.seqs)]
            # Siblings still waiting to fork from an aborted sample would never start: they go too.
            seqs += [child for seq in seqs for child in seq.pending_forks if child not in seqs]
            for seq in seqs:
                seq.pending_forks = []
            self.scheduler.abort(seqs)
            if state.finished:
                del self.requests[core_id]
        self._drop_in_flight_if_idle()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ----------------------------------------------------------------------
    def step(self, on_scheduled: Optional[Callable[[], None]] = None) -> StepOutputs:
        """Run one iteration; returns an output for every request that advanced (``stats`` unset). ``on_scheduled``
        runs once the batch is chosen, before the device works on it (the gauges go out then).

        With asynchronous scheduling (CUDA by default) the step is pipelined: it plans and
        queues step ``k`` on the device, then processes the tokens of step ``k - 1`` while the
        device computes, so host work hides behind device work. The outputs therefore trail
        the device by one step, and a sequence that stops on a token costs one discarded token
        of compute.
        """
        batch = self.scheduler.schedule()
        if on_scheduled is not None:
            on_scheduled()
        if not batch.seqs:
            if self._in_flight is not None:
                return self._process(*self._take_in_flight())
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending (a request that can never fit).")
            return StepOutputs([])
        if not self.async_scheduling:
            return self._process(batch, self._launch(batch, None))
        previous = self._in_flight
        self._in_flight = (batch, self._launch(batch, previous[1] if previous else None))
        outputs = self._process(*previous) if previous is not None else StepOutputs([])
        # A step with a constrained row queued its forward pass but deferred sampling until the
        # tokens just processed had advanced the grammars (the mask was filled meanwhile).
        self._in_flight[1].finish_sampling()
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
        launched = self.runner.launch(batch, BatchBlockTables(self.kv_cache, batch.seqs), previous)
        if not launched.steady:  # a steady step only decodes
            for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
                if seq.num_output_tokens == 0 and seq.num_pending_tokens == 0:
                    self.num_prefill_tokens_computed += num_new
        self.scheduler.on_step_launched(batch)
        # Index filled blocks now, not when the tokens arrive, so the very next step's new
        # requests can hit them (their K/V is written before any later step reads it).
        seqs = batch.seqs
        self.scheduler.cache_full_blocks([seqs[row] for row in launched.full_block_rows] if launched.steady else seqs)
        for seq in launched.samplers:
            seq.num_pending_tokens += 1
        self._track_waste()
        return launched

    def _process(self, batch: ScheduledBatch, launched: LaunchedStep) -> StepOutputs:
        """Take a launched step's tokens: append them, apply token-level stops, build outputs."""
        result = launched.wait()
        outputs: dict[int, CoreOutput] = {}
        requests = self.requests
        if result.prompt_logprobs:
            for seq in batch.seqs:
                state = requests.get(seq.request_id)
                if state is not None and seq.seq_id in result.prompt_logprobs:
                    entries = result.prompt_logprobs[seq.seq_id]
                    seq.prompt_logprobs.extend(entries)
                    output = outputs.get(state.core_id) or self._new_output(state)
                    output.prompt_logprobs = (output.prompt_logprobs or []) + entries
                    outputs[state.core_id] = output
        finishing: list[int] = []
        top_logprobs = result.top_logprobs or repeat(None)
        token_core_ids: list[int] = []  # the ids-only tokens, as two columns
        token_ids_out: list[int] = []
        # One row per sampling sequence; siblings forking from a parent follow it in the rows.
        for seq, token, logprob, top in zip(launched.samplers, result.token_ids, result.logprobs, top_logprobs):
            seq.num_pending_tokens -= 1
            state = requests.get(seq.request_id)
            if state is None or seq.is_finished:
                continue  # aborted, or stopped on the token before (one step was in flight)
            if state.ids_only:
                token_ids = seq.token_ids
                token_ids.append(token)
                if token not in state.stop_ids and len(token_ids) < state.length_limit:
                    if seq.grammar is not None:
                        self._advance_grammar(seq, token)
                    token_core_ids.append(state.core_id)
                    token_ids_out.append(token)
                    continue
                token_ids.pop()  # it ends the sample: the full path below says how
            if seq.pending_forks:
                self.scheduler.fork(seq)  # before the parent's token: the siblings draw their own
            output = outputs.get(state.core_id)
            if output is None:
                output = outputs[state.core_id] = self._new_output(state)
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            if seq.grammar is not None:
                self._advance_grammar(seq, token)
            delta = SampleDelta(seq.sample_index, [token])
            output.samples.append(delta)
            if state.send_logprobs:
                delta.new_logprobs = [logprob]
                if state.params.logprobs is not None:  # the sampler's table always includes the sampled token
                    delta.top_logprobs = [top or {}]
            status = None
            if token in state.stop_ids and seq.num_output_tokens >= state.params.min_tokens:
                status = SequenceStatus.FINISHED_STOPPED
                if token in state.params.stop_token_ids:
                    delta.stop_reason = token
            elif len(seq.token_ids) >= state.length_limit:
                status = SequenceStatus.FINISHED_LENGTH
            if status is not None:
                delta.finish_reason = status.value
                self.scheduler.finish(seq, status)
                finishing.append(state.core_id)
        for core_id in finishing:
            state = requests.get(core_id)
            if state is not None and state.finished:
                outputs[core_id].finished = True
                del requests[core_id]
        return StepOutputs(list(outputs.values()), None, token_core_ids, token_ids_out)

    @staticmethod
    def _advance_grammar(seq: Sequence, token: int) -> None:
        if not seq.grammar.accept(token):
            logger.error("request %s: the grammar rejected token %d; the rest is unconstrained",
                         seq.request_id, token)
            seq.grammar = None

    def _new_output(self, state: _CoreRequestState) -> CoreOutput:
        first = state.seqs[0]
        output = CoreOutput(state.core_id, [], num_cached_tokens=first.num_cached_prompt_tokens)
        if not state.sent_first_scheduled:
            state.sent_first_scheduled = True
            output.first_scheduled_time = first.first_scheduled_time
            params = state.params
            state.ids_only = len(state.seqs) == 1 and not state.send_logprobs and params.prompt_logprobs is None
        return output

    # ---- stats -------------------------------------------------------------------------
    def _track_waste(self) -> None:
        # Walking every running sequence each step would cost O(running) per step, so the peak is
        # looked for when the running set changes and on every _WASTE_SAMPLE_STEPS-th step
        # otherwise: in a steady decode the waste only cycles within each sequence's last block.
        # With no block taken or freed and as many running, it can only have shrunk: skipped too.
        self._steps_since_waste += 1
        key = (self.kv_cache.num_free_blocks, self.scheduler.num_running)
        if key == self._waste_key or (key[1] == self._waste_key_running
                                      and self._steps_since_waste < _WASTE_SAMPLE_STEPS):
            return
        self._waste_key, self._waste_key_running, self._steps_since_waste = key, key[1], 0
        waste = self.scheduler.kv_waste_slots()
        if waste > self.peak_kv_waste_slots:
            self.peak_kv_waste_slots = waste
            self.peak_running_at_waste = self.scheduler.num_running

    def kv_cache_stats(self) -> KVCacheStats:
        stats = self.kv_cache.stats()
        stats.num_allocated_slots, stats.num_filled_slots = self.scheduler.kv_slot_usage()
        return stats

    def stats(self, refresh_sharing: bool = True) -> CoreStats:
        """Requests, not sequences (as vLLM counts them): n samples of one request count once, and a
        request with any sample running counts as running. The sharing counts walk every block, so
        they are refreshed at most every ``_SHARING_STATS_INTERVAL_S``, and only when
        ``refresh_sharing`` (not between scheduling a step and launching it); the rest is current."""
        scheduler, kv_cache = self.scheduler, self.kv_cache
        now = time.monotonic()
        if not scheduler.has_unfinished():
            self._sharing_stats = (0, 0)  # no sequence holds a block
        elif self._sharing_stats is None or (refresh_sharing and
                                             now - self._sharing_stats_time >= _SHARING_STATS_INTERVAL_S):
            full = kv_cache.stats()
            self._sharing_stats = (full.num_shared_blocks, full.blocks_saved_by_sharing)
            self._sharing_stats_time = now
        running = {seq.request_id for seq in scheduler.running}
        waiting = {seq.request_id for seq in scheduler.waiting} - running
        pool = kv_cache.pool
        return CoreStats(
            num_running_requests=len(running), num_waiting_requests=len(waiting),
            kv_cache_usage=pool.num_used_blocks / pool.num_blocks,
            prefix_cache_queries=kv_cache.prefix_cache_queries, prefix_cache_hits=kv_cache.prefix_cache_hits,
            num_shared_blocks=self._sharing_stats[0], blocks_saved_by_sharing=self._sharing_stats[1],
            num_preemptions=scheduler.num_preemptions, num_prefill_tokens_computed=self.num_prefill_tokens_computed,
        )

    def scheduler_counts(self) -> tuple[int, int]:
        """(running, waiting) sequences: a cheap way to tell whether the gauges changed."""
        return len(self.scheduler.running), len(self.scheduler.waiting)
