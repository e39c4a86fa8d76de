"""AsyncLLMEngine: the synchronous, single-threaded engine behind an asyncio front end.

``LLMEngine`` is not thread-safe, so one background thread owns it. Between steps that thread
drains a command queue (add, abort, stop); then it runs ``step()`` and hands the step's outputs
to the event loop in a single ``call_soon_threadsafe``. Request handlers never touch the
engine: they post commands and await their request's ``RequestStream``. With nothing to do the
thread blocks on the command queue instead of spinning, and if a step raises, the engine is
marked dead and every stream gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, fields
from typing import AsyncIterator, Optional, Union

import torch

from octavo.engine.engine import LLMEngine, PromptInput, RequestState
from octavo.metrics import EngineMetrics
from octavo.outputs import RequestOutput, SampleLogprobs
from octavo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How often the step thread refreshes the gauges while busy (KV stats walk every block).
_STATS_INTERVAL_S = 0.1


class EngineUnavailableError(RuntimeError):
    """The engine cannot take or finish a request now; a server answers 503."""


class EngineDeadError(EngineUnavailableError):
    """A step raised: the engine stopped for good."""


class EngineOverloadedError(EngineUnavailableError):
    """Too many requests are waiting for their first token."""


class EngineStoppingError(EngineUnavailableError):
    """The engine is draining or stopped: it takes no new requests."""


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
    to ``n``): with ``best_of > n`` the kept samples are known only at the end. The logprobs lists
    in ``outputs`` keep growing on the step thread until the request finishes; read them from the
    finished output, and use the deltas while streaming.
    """

    deltas: list[CompletionDelta] = field(default_factory=list)


class RequestStream:
    """One request's outputs on the event loop, read with ``async for``.

    Outputs that arrive faster than they are read are merged (deltas concatenated, the newest
    snapshot kept), so a slow reader holds one pending output, not one per step.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.finished = False  # the finished output, or an error, has been read
        self.waiting = True  # accepted into the queue, no output yet
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
        if not self.accepted.done():
            self.accepted.set_exception(error)
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
class _Add:
    request_id: str
    prompt: PromptInput
    params: Optional[SamplingParams]
    arrival_time: float


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()


@dataclass
class _Tracked:
    """Step-thread bookkeeping for one request: what was delivered, what was counted."""

    state: RequestState
    num_sent: list[int]
    num_generated: int = 0
    saw_first_token: bool = False
    last_token_time: Optional[float] = None  # when the request last gained tokens


class AsyncLLMEngine:
    """Runs ``engine`` on a background thread and serves its requests as async streams.

    ``max_waiting_requests`` bounds the requests accepted but not yet producing output; beyond
    it ``add_request`` raises ``EngineOverloadedError`` rather than queueing without limit.
    """

    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024,
                 metrics: Optional[EngineMetrics] = None) -> None:
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}.")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics or EngineMetrics(engine.model_path.name)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._accepting = True
        self._drain_task: Optional[asyncio.Task] = None
        self._error: Optional[BaseException] = None
        # Event-loop side.
        self._streams: dict[str, RequestStream] = {}
        self._num_waiting = 0
        # Step-thread side.
        self._tracked: dict[str, _Tracked] = {}
        self._last_stats_time = 0.0

    # ---- read-only views ---------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def is_dead(self) -> bool:
        return self._error is not None

    @property
    def is_healthy(self) -> bool:
        """Started, its thread alive and no step has failed."""
        return self._error is None and self._thread is not None and self._thread.is_alive()

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
        """Start the step thread; outputs are delivered to the running event loop."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started.")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="octavo-engine", daemon=True)
        self._thread.start()

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
        """``drain(timeout)``, then stop the step thread."""
        await self.drain(timeout)
        if self._thread is not None:
            self._commands.put(_STOP)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ---- requests ----------------------------------------------------------------------
    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """The engine's prompt checks (``ValueError``), for a front end to answer before queueing.
        They read only fixed model limits, so any thread may call them."""
        self.engine.validate_prompt(token_ids, params)

    async def add_request(self, request_id: str, prompt: PromptInput,
                          params: Optional[SamplingParams] = None) -> RequestStream:
        """Queue a request and return its stream once the engine has accepted it.

        Raises ``ValueError`` (the engine rejected the input; nothing is queued) or an
        ``EngineUnavailableError``. Cancelling the await aborts the request.
        """
        self.check_can_accept()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use.")
        stream = RequestStream(request_id, self._loop)
        self._streams[request_id] = stream
        self._num_waiting += 1
        self._commands.put(_Add(request_id, prompt, params, time.monotonic()))
        try:
            await stream.accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
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
        """Abort requests and free their blocks (on the step thread, between steps); their streams
        get nothing more. Unknown or finished ids are ignored."""
        for one in [request_id] if isinstance(request_id, str) else request_id:
            self._abort(one, None)

    def _abort(self, request_id: str, error: Optional[BaseException]) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._mark_started(stream)
        if error is not None:
            stream.fail(error)
        self._commands.put(_Abort([request_id]))

    def check_can_accept(self, num_pending: int = 0) -> None:
        """Raise the ``EngineUnavailableError`` a new request would get now. ``num_pending`` counts
        requests a front end has let in but not yet queued (body being read, prompt tokenized)."""
        if self._error is not None:
            raise EngineDeadError(f"the engine is dead after an error in a step: {self._error!r}")
        if self._thread is None:
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

    # ---- event-loop side of the hand-over ------------------------------------------------
    def _deliver_acceptance(self, accepted: list[str], rejected: list[tuple[str, Exception]]) -> None:
        for request_id in accepted:
            stream = self._streams.get(request_id)
            if stream is not None and not stream.accepted.done():
                stream.accepted.set_result(None)
        for request_id, error in rejected:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._mark_started(stream)
                stream.fail(error)

    def _deliver_outputs(self, outputs: list[StreamingRequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted after this step had started
            self._mark_started(stream)
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail_all(self, cause: BaseException) -> None:
        for stream in self._streams.values():
            self._mark_started(stream)
            error = EngineDeadError(f"the engine is dead after an error in a step: {cause!r}")
            error.__cause__ = cause
            stream.fail(error)
        self._streams.clear()

    # ---- the step thread -----------------------------------------------------------------
    def _run(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)  # the current device is per thread
        try:
            while self._handle_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as exc:  # any failure kills the engine, never silently
            logger.exception("engine step failed; the engine is dead")
            self._error = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when ``block``); False once told to stop."""
        commands = []
        if block:
            self._publish_stats(force=True)
            commands.append(self._commands.get())
        while not self._commands.empty():
            commands.append(self._commands.get_nowait())
        accepted: list[str] = []
        rejected: list[tuple[str, Exception]] = []
        running = True
        for command in commands:
            if command is _STOP:
                running = False
            elif isinstance(command, _Add):
                try:
                    self._add(command)
                    accepted.append(command.request_id)
                except Exception as exc:  # noqa: BLE001 - a bad request is the requester's error
                    rejected.append((command.request_id, exc))
            else:
                self._abort_in_engine(command.request_ids)
        if accepted or rejected:
            self._loop.call_soon_threadsafe(self._deliver_acceptance, accepted, rejected)
        return running

    def _add(self, command: _Add) -> None:
        self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        state = self.engine.requests[command.request_id]
        self._tracked[command.request_id] = _Tracked(state, num_sent=[0] * len(state.seqs))

    def _abort_in_engine(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            tracked = self._tracked.pop(request_id, None)
            if tracked is None:
                continue
            if not tracked.saw_first_token:
                # Prompts are counted at their first token; one aborted before that still had
                # whatever part of its prompt was prefilled (read before the abort resets it).
                first = tracked.state.seqs[0]
                self.metrics.prompt_tokens.inc(min(first.num_computed_tokens, first.num_prompt_tokens))
            self.metrics.record_finished("abort")
        self.engine.abort_request(request_ids)

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.monotonic()
        delivered = [self._with_deltas(output, now) for output in outputs]
        self._publish_stats()
        if delivered:
            self._loop.call_soon_threadsafe(self._deliver_outputs, delivered)

    def _with_deltas(self, output: RequestOutput, now: float) -> StreamingRequestOutput:
        tracked = self._tracked[output.request_id]
        deltas = []
        if len(tracked.state.seqs) == len(output.outputs):  # every sample returned, in sample order
            for completion, detokenizer in zip(output.outputs, tracked.state.detokenizers):
                sent = tracked.num_sent[completion.index]
                num_tokens = len(completion.token_ids)
                deltas.append(CompletionDelta(
                    text=detokenizer.take_stream_delta(completion.finish_reason is not None),
                    token_ids=completion.token_ids[sent:],
                    logprobs=None if completion.logprobs is None else completion.logprobs[sent:num_tokens],
                ))
                tracked.num_sent[completion.index] = num_tokens
        self._record_progress(tracked, output, now)
        if output.finished:
            del self._tracked[output.request_id]
        values = {f.name: getattr(output, f.name) for f in fields(RequestOutput)}
        return StreamingRequestOutput(**values, deltas=deltas)

    def _record_progress(self, tracked: _Tracked, output: RequestOutput, now: float) -> None:
        seqs = tracked.state.seqs
        generated = sum(seq.num_output_tokens for seq in seqs)
        if generated > tracked.num_generated:
            self.metrics.generation_tokens.inc(generated - tracked.num_generated)
            # As vLLM: one inter-token interval per step that advanced the request, however many
            # of its samples did, so the histogram shows every stall rather than a per-request mean.
            if tracked.last_token_time is not None:
                self.metrics.time_per_output_token.observe(now - tracked.last_token_time)
            tracked.last_token_time = now
        tracked.num_generated = generated
        first = seqs[0]
        if not tracked.saw_first_token and first.first_token_time is not None:
            tracked.saw_first_token = True
            self.metrics.prompt_tokens.inc(len(tracked.state.prompt_token_ids))
            self.metrics.time_to_first_token.observe(first.first_token_time - first.arrival_time)
        if not output.finished:
            return
        queue_time = None if first.first_scheduled_time is None else first.first_scheduled_time - first.arrival_time
        self.metrics.record_finished(output.outputs[0].finish_reason or "abort", now - first.arrival_time,
                                     queue_time)

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats_time < _STATS_INTERVAL_S:
            return
        self._last_stats_time = now
        stats = self.engine.kv_cache_stats()
        scheduler = self.engine.scheduler
        # Requests, not sequences (as vLLM counts them): n samples of one request count once, and a
        # request with any sample running counts as running.
        running = {seq.request_id for seq in scheduler.running}
        waiting = {seq.request_id for seq in scheduler.waiting} - running
        self.metrics.set_scheduler_state(len(running), len(waiting), stats.usage)
        self.metrics.set_prefix_cache_totals(stats.prefix_cache_queries, stats.prefix_cache_hits)
        self.metrics.set_kv_sharing(stats.num_shared_blocks, stats.blocks_saved_by_sharing)
