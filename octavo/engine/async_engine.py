"""AsyncLLMEngine: the asyncio front end of a server, over an engine core in its own process.

Requests are tokenized and checked by the caller, then sent to the core; the core's per-step
outputs arrive on the event loop, where the output processor turns them into text and
each request's ``RequestStream`` gets them. HTTP, JSON, detokenization and stop strings run
here; the scheduler and the model run in the core's process, so they never wait for the GIL.
If the core fails or exits, every stream gets ``EngineDeadError`` at once, ``is_dead`` turns
true and the ``on_dead`` callbacks run (the server exits non-zero, for a supervisor to restart).
With ``data_parallel_size`` > 1 the requests are spread over several cores (``data_parallel``);
a replica that dies fails only its own requests (``dead_replicas``), and the engine is dead once
every replica is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from itertools import count
from typing import AsyncIterator, Callable, Optional, Union

from octavo.config import EngineConfig
from octavo.engine.core_client import AsyncProcessCoreClient, EngineDeadError, EngineUnavailableError
from octavo.engine.data_parallel import AsyncDataParallelCoreClient, sum_stats, uses_replicas
from octavo.engine.gc_tuning import tune_after_startup
from octavo.engine.input_processor import InputProcessor, PromptInput
from octavo.engine.messages import CoreRequest, CoreStats, StepOutputs
from octavo.engine.output_processor import OutputProcessor, RequestState
from octavo.metrics import EngineMetrics
from octavo.outputs import CompletionDelta, StreamingRequestOutput
from octavo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncLLMEngine", "CompletionDelta", "EngineDeadError", "EngineOverloadedError", "EngineStoppingError",
    "EngineUnavailableError", "RequestStream", "StreamingRequestOutput",
]


class EngineOverloadedError(EngineUnavailableError):
    """Too many requests are waiting for their first token."""


class EngineStoppingError(EngineUnavailableError):
    """The engine is draining or stopped: it takes no new requests."""


class RequestStream:
    """One request's outputs on the event loop, read with ``async for``.

    Outputs that arrive faster than they are read are merged (deltas concatenated, the newest
    snapshot kept), so a slow reader holds one pending output, not one per step.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.finished = False  # the finished output, or an error, has been read
        self.waiting = True  # accepted, no output yet
        self._pending: Optional[StreamingRequestOutput] = None
        self._error: Optional[BaseException] = None
        self._closed = False  # nothing will be put any more
        self._ready = asyncio.Event()

    def put(self, output: StreamingRequestOutput) -> None:
        if self._pending is not None and self._pending.deltas:
            output.deltas = [old.followed_by(new) for old, new in zip(self._pending.deltas, output.deltas)]
        self._pending = output
        self._closed = output.finished
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._closed = True
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamingRequestOutput:
        while True:
            if self._pending is not None:
                output, self._pending = self._pending, None
                self.finished = output.finished
                return output
            if self._error is not None:
                self.finished = True
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()


@dataclass
class _Progress:
    """Metrics bookkeeping of one live request."""

    num_generated: int = 0
    last_token_time: Optional[float] = None
    replica: int = 0


class AsyncLLMEngine:
    """Starts the engine core for ``config`` (loading the model) and serves its requests as streams.

    ``max_waiting_requests`` bounds the requests accepted but not yet producing output; beyond
    it ``add_request`` raises ``EngineOverloadedError`` rather than queueing without limit.
    """

    def __init__(self, config: EngineConfig, max_waiting_requests: int = 1024,
                 metrics: Optional[EngineMetrics] = None, log_level: str = "info") -> None:
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}.")
        self.config = config
        self.inputs = InputProcessor(config)
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics or EngineMetrics(self.inputs.model_path.name)
        if uses_replicas(config):
            self.client = AsyncDataParallelCoreClient(config, self.inputs.eos_token_ids, log_level)
        else:
            self.client = AsyncProcessCoreClient(config, self.inputs.eos_token_ids, log_level)
        self.info = self.client.info
        self._routed = isinstance(self.client, AsyncDataParallelCoreClient)
        self.num_replicas = config.data_parallel_size
        self.metrics.set_num_replicas(self.num_replicas)
        self._replica_metrics = [self.metrics.replica(index) for index in range(self.num_replicas)]
        self._live = [0] * self.num_replicas  # unfinished requests per replica
        self._replica_stats: list[Optional[CoreStats]] = [None] * self.num_replicas
        self.dead_replicas: dict[int, BaseException] = {}
        self.outputs = OutputProcessor(self.inputs.tokenizer)
        self.on_dead: list[Callable[[BaseException], None]] = []
        self._core_ids = count()
        self._started = False
        self._stopped = False
        self._accepting = True
        self._drain_task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._error: Optional[BaseException] = None
        self._streams: dict[str, RequestStream] = {}
        self._ids: dict[str, int] = {}  # request id -> core id
        self._progress: dict[int, _Progress] = {}
        self._num_waiting = 0

    # ---- read-only views ---------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.inputs.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.inputs.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.inputs.vocab_size

    @property
    def model_path(self):
        return self.inputs.model_path

    @property
    def is_dead(self) -> bool:
        return self._error is not None

    @property
    def latest_stats(self) -> Optional[CoreStats]:
        """The core's gauges as last reported (it reports as steps start and when it goes idle);
        with replicas, their sum (KV usage averaged)."""
        return self._replica_stats[0] if self.num_replicas == 1 else sum_stats(self._replica_stats)

    @property
    def dead_reason(self) -> Optional[BaseException]:
        return self._error

    @property
    def is_healthy(self) -> bool:
        """Started, its core alive and no step has failed."""
        return self._error is None and self._started and not self._stopped

    @property
    def accepting(self) -> bool:
        return self._accepting and self.is_healthy

    @property
    def num_waiting_requests(self) -> int:
        """Requests accepted that have produced no output yet."""
        return self._num_waiting

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    # ---- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start taking the core's outputs on the running event loop."""
        if self._started:
            raise RuntimeError("the engine is already started.")
        self._loop = asyncio.get_running_loop()
        self._started = True
        if self._routed:
            self.client.start(self._on_outputs, self._on_dead, self._on_replica_dead)
        else:
            self.client.start(self._on_outputs, self._on_dead)
        tune_after_startup()

    def begin_drain(self, timeout: Optional[float] = None) -> None:
        """Refuse new requests from now on; accepted ones carry on, and with ``timeout`` those still
        unfinished after that many seconds are aborted. Safe from a signal handler or any thread."""
        self._accepting = False
        if timeout is not None and self._loop is not None and self._drain_task is None:
            self._loop.call_soon_threadsafe(self._start_drain, timeout)

    def _start_drain(self, timeout: float) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain(timeout))

    async def drain(self, timeout: float = 0.0) -> None:
        """Stop taking requests, let unfinished ones run up to ``timeout`` seconds, then abort the
        rest: their streams end with ``EngineStoppingError``."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._streams and self.is_healthy and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self._abort(request_id, EngineStoppingError("the request was aborted: the server is shutting down."))

    async def shutdown(self, timeout: float = 0.0) -> None:
        """``drain(timeout)``, then stop the engine core."""
        await self.drain(timeout)
        self._stopped = True
        await self.client.shutdown()

    # ---- requests ----------------------------------------------------------------------
    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """The engine's prompt checks (``ValueError``), for a front end to answer before queueing."""
        self.inputs.validate_prompt(token_ids, params)

    async def add_request(self, request_id: str, prompt: PromptInput,
                          params: Optional[SamplingParams] = None) -> RequestStream:
        """Queue a request and return its stream.

        Raises ``ValueError`` (bad input; nothing is queued) or an ``EngineUnavailableError``.
        """
        return self.add_request_now(request_id, prompt, params)

    def add_request_now(self, request_id: str, prompt: PromptInput,
                        params: Optional[SamplingParams] = None) -> RequestStream:
        """``add_request`` without the await (for callers already on the event loop)."""
        self.check_can_accept()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use.")
        params = params or SamplingParams()
        text, token_ids, cache_salt = self.inputs.tokenize_prompt(prompt)
        self.inputs.validate_prompt(token_ids, params)
        core_id = next(self._core_ids)
        state = self.outputs.new_request(request_id, core_id, text, token_ids, params, stream=True)
        try:
            routes = self.client.add([CoreRequest(core_id, token_ids, CoreRequest.sampling_fields(params),
                                                  state.arrival_time, cache_salt)])
        except BaseException:
            self.outputs.remove(core_id)  # nothing of it is kept
            raise
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self._ids[request_id] = core_id
        self._num_waiting += 1
        replica = routes[0] if routes else 0
        self._progress[core_id] = _Progress(replica=replica)
        self._live[replica] += 1
        self._publish_gauges(replica)
        return stream

    async def generate(self, request_id: str, prompt: PromptInput,
                       params: Optional[SamplingParams] = None) -> AsyncIterator[StreamingRequestOutput]:
        """Add a request and yield its outputs; leaving early (break, cancel, error) aborts it."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: Union[str, list[str]]) -> None:
        """Abort requests and free their blocks; their streams get nothing more. Unknown or
        finished ids are ignored."""
        for one in [request_id] if isinstance(request_id, str) else request_id:
            self._abort(one, None)

    def _abort(self, request_id: str, error: Optional[BaseException]) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        core_id = self._ids.pop(request_id)
        state = self.outputs.remove(core_id)
        replica = self._end_progress(core_id)
        self._mark_started(stream)
        if error is not None:
            stream.fail(error)
        if state is not None:
            metrics = self._replica_metrics[replica]
            if state.first_token_time is None:
                # Prompts are counted at their first token; one aborted before that counts here.
                metrics.prompt_tokens.inc(len(state.prompt_token_ids))
            metrics.record_finished("abort")
        if not self.is_dead:
            self.client.abort([core_id])
        self._publish_gauges(replica)

    def check_can_accept(self, num_pending: int = 0) -> None:
        """Raise the ``EngineUnavailableError`` a new request would get now. ``num_pending`` counts
        requests a front end has let in but not yet queued (body being read, prompt tokenized)."""
        if self._error is not None:
            raise EngineDeadError(f"the engine is dead: {self._error}")
        if not self._started or self._stopped:
            raise EngineStoppingError("the engine is not started.")
        if not self._accepting:
            raise EngineStoppingError("the server is shutting down and takes no new requests.")
        num_waiting = self._num_waiting + num_pending
        if num_waiting >= self.max_waiting_requests:
            raise EngineOverloadedError(
                f"the server is overloaded: {num_waiting} requests are already waiting "
                f"(the limit is {self.max_waiting_requests}); retry later."
            )

    def _mark_started(self, stream: RequestStream) -> None:
        if stream.waiting:
            stream.waiting = False
            self._num_waiting -= 1

    # ---- the core's outputs, on the event loop ---------------------------------------------
    def _on_outputs(self, message: StepOutputs, replica: int = 0) -> None:
        stats = message.stats
        if stats is not None:
            self._replica_stats[replica] = stats
            metrics = self._replica_metrics[replica]
            metrics.set_core_totals(stats.prefix_cache_queries, stats.prefix_cache_hits,
                                    stats.num_prefill_tokens_computed)
            metrics.set_kv_sharing(stats.num_shared_blocks, stats.blocks_saved_by_sharing)
        if message.outputs or message.token_core_ids:
            step = self.outputs.process(message)
            if step.stopped_samples:
                core_ids, indices = zip(*step.stopped_samples)
                self.client.abort(list(core_ids), list(indices))
            now = time.monotonic()
            for state in step.advanced:
                self._record_progress(state, now)
            for state, output in step.outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                self._mark_started(stream)
                stream.put(output)
                if output.finished:
                    self._finish(state, output.outputs[0].finish_reason or "abort", now)
            for state, error in step.refused:
                stream = self._streams.get(state.request_id)
                if stream is not None:
                    self._finish(state, None, now)
                    stream.fail(ValueError(error))
        self._publish_gauges(replica)

    def _finish(self, state: RequestState, finish_reason: Optional[str], now: float) -> None:
        self._mark_started(self._streams.pop(state.request_id))
        del self._ids[state.request_id]
        replica = self._end_progress(state.core_id)
        if self._routed:
            self.client.release(state.core_id)
        if finish_reason is not None:
            queue_time = (None if state.first_scheduled_time is None
                          else state.first_scheduled_time - state.arrival_time)
            self._replica_metrics[replica].record_finished(finish_reason, now - state.arrival_time, queue_time)

    def _end_progress(self, core_id: int) -> int:
        """Forget a request's bookkeeping; the replica it ran on."""
        progress = self._progress.pop(core_id, None)
        if progress is None:
            return 0
        self._live[progress.replica] -= 1
        return progress.replica

    def _record_progress(self, state: RequestState, now: float) -> None:
        progress = self._progress.get(state.core_id)
        if progress is None:
            return
        generated = state.num_generated_tokens
        if generated > progress.num_generated:
            metrics = self._replica_metrics[progress.replica]
            metrics.generation_tokens.inc(generated - progress.num_generated)
            # As vLLM: one inter-token interval per step that advanced the request, however many
            # of its samples did, so the histogram shows every stall rather than a per-request mean.
            if progress.last_token_time is not None:
                metrics.time_per_output_token.observe(now - progress.last_token_time)
            else:
                metrics.prompt_tokens.inc(len(state.prompt_token_ids))
                metrics.time_to_first_token.observe(now - state.arrival_time)
            progress.last_token_time = now
        progress.num_generated = generated

    def _publish_gauges(self, replica: int = 0) -> None:
        """Running as the core last saw it (refreshed as its steps start); waiting is every live
        request the core is not running, including those still on their way to it."""
        stats, live = self._replica_stats[replica], self._live[replica]
        running = min(stats.num_running_requests, live) if stats is not None else 0
        self._replica_metrics[replica].set_scheduler_state(running, live - running,
                                                           stats.kv_cache_usage if stats is not None else 0.0)

    def _on_replica_dead(self, replica: int, error: BaseException) -> None:
        """One replica of several died: its requests fail (503 engine_dead); the others go on."""
        self.dead_replicas[replica] = error
        if self._stopped:
            return
        failure = EngineDeadError(f"engine replica {replica} is dead: {error}")
        failure.__cause__ = error
        for core_id in [core_id for core_id, progress in self._progress.items() if progress.replica == replica]:
            state = self.outputs.remove(core_id)
            self._end_progress(core_id)
            if state is None:
                continue
            self._ids.pop(state.request_id, None)
            stream = self._streams.pop(state.request_id, None)
            if stream is not None:
                self._mark_started(stream)
                stream.fail(failure)
        self._replica_stats[replica] = None
        self._publish_gauges(replica)

    def _on_dead(self, error: BaseException) -> None:
        if self._error is not None or self._stopped:
            return
        logger.error("the engine is dead: %s", error)
        self._error = error
        for stream in self._streams.values():
            self._mark_started(stream)
            failure = EngineDeadError(f"the engine is dead: {error}")
            failure.__cause__ = error
            stream.fail(failure)
        self._streams.clear()
        self._ids.clear()
        self._progress.clear()
        self._live = [0] * self.num_replicas
        for callback in self.on_dead:
            callback(error)
