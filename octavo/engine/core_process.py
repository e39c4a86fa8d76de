"""The engine core's own process: ``python -m octavo.engine.core_process --input ADDR --output ADDR``.

It loads the model, says ``Ready``, then runs a busy loop: take every queued command (add,
abort, shutdown), run one step, send its outputs. Idle, it blocks on the command socket. The
front end's HTTP handling, tokenization and detokenization never run in this interpreter, so
they never take the GIL from the step loop. A failure ends the process loudly: the front end
gets a ``CoreFailed`` message naming the error, and then sees the exit code. A request the core
refuses fails alone.

Started as a module (not forked or spawned by multiprocessing), so the user's ``__main__`` is
never imported again here, and CUDA is initialised only in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from typing import Optional

import zmq

from octavo.engine.core import EngineCore
from octavo.engine.gc_tuning import tune_after_startup
from octavo.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreFailed,
    CoreOutput,
    CoreStats,
    Ready,
    Shutdown,
    StepOutputs,
    decode_startup,
    decode_to_core,
    encode,
)

logger = logging.getLogger("octavo.engine.core_process")

# Gauges (running/waiting requests, KV usage) go out when the counts change, and at least this
# often while busy.
STATS_INTERVAL_S = 0.1
# While idle the loop wakes this often to notice that the front end has gone.
_IDLE_POLL_MS = 500


class CoreLoop:
    """The busy loop around an ``EngineCore``, talking over two zmq sockets."""

    def __init__(self, core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, parent_pid: int) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self._last_stats = 0.0
        self._last_counts: tuple = ()

    def run(self) -> None:
        core = self.core
        while True:
            refused: list[CoreOutput] = []
            changed = False
            timeout = 0 if core.has_unfinished_requests() else _IDLE_POLL_MS
            while self.inbox.poll(timeout):
                message = decode_to_core(self.inbox.recv())
                if isinstance(message, Shutdown):
                    return
                changed = True
                timeout = 0
                if isinstance(message, AddRequests):
                    refused += self._add(message)
                elif isinstance(message, AbortRequests):
                    core.abort_requests(message.core_ids, message.sample_indices)
            if os.getppid() != self.parent_pid:
                logger.warning("the front end is gone; the engine core stops")
                return
            if refused or changed:  # gauges as requests arrive, not only after a step ends
                stats = self._stats_if_changed()
                if refused or stats is not None:
                    self._send(StepOutputs(refused, stats))
            if core.has_unfinished_requests():
                step = core.step(on_scheduled=self._send_stats_if_changed)  # ... and as steps start
                step.stats = self._stats_if_changed()
                if step:
                    self._send(step)

    def _stats_if_changed(self, refresh_sharing: bool = True) -> Optional[CoreStats]:
        """The gauges, when the running or waiting counts moved or the last ones are old."""
        now = time.monotonic()
        # Going idle counts as a change: the sharing gauges, which may trail by an interval while
        # requests run, must read zero once none holds a block (and no later step would send them).
        counts = (*self.core.scheduler_counts(), self.core.has_unfinished_requests())
        if counts == self._last_counts and now - self._last_stats < STATS_INTERVAL_S:
            return None
        self._last_stats, self._last_counts = now, counts
        return self.core.stats(refresh_sharing)

    def _send_stats_if_changed(self) -> None:
        # Between scheduling and launching: nothing here may walk the block pool.
        stats = self._stats_if_changed(refresh_sharing=False)
        if stats is not None:
            self._send(StepOutputs([], stats))

    def _add(self, message: AddRequests) -> list[CoreOutput]:
        refused = []
        for request in message.requests:
            try:
                self.core.add_request(request)
            except Exception as exc:  # noqa: BLE001 - bad input fails its request, never the engine
                refused.append(CoreOutput(request.core_id, [], finished=True, error=str(exc) or repr(exc)))
        return refused

    def _send(self, message: StepOutputs) -> None:
        self.outbox.send(encode(message), copy=False)


def _fail(outbox: zmq.Socket, exc: BaseException, during_startup: bool) -> None:
    outbox.send(encode(CoreFailed(type(exc).__name__, str(exc) or repr(exc), during_startup)))


def serve_core(startup: bytes, input_address: str, output_address: str, parent_pid: int) -> int:
    """Load the core from ``startup`` (``encode_startup``), say ``Ready`` and run the loop until told
    to stop; the exit code. A process or a Ray actor runs this."""
    config, eos_token_ids = decode_startup(startup)
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(output_address)
    core = None
    try:
        try:
            core = EngineCore(config, eos_token_ids)
        except BaseException as exc:
            logger.error("the engine core failed to start: %s", exc)
            _fail(outbox, exc, during_startup=True)
            return 1
        tune_after_startup()
        outbox.send(encode(Ready(core.info())))
        try:
            CoreLoop(core, inbox, outbox, parent_pid).run()
        except BaseException as exc:  # any failure kills the engine, never silently
            logger.error("engine step failed; the engine core stops:\n%s", traceback.format_exc())
            _fail(outbox, exc, during_startup=False)
            return 1
        return 0
    finally:
        if core is not None:
            core.shutdown()  # tensor-parallel workers go with it
        inbox.close(linger=0)
        outbox.close(linger=2000)  # let the last message (a failure, say) reach the front end
        context.term()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="octavo engine core (started by the front end)")
    parser.add_argument("--input", required=True, help="zmq address of the command socket")
    parser.add_argument("--output", required=True, help="zmq address of the output socket")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    # Ctrl-C reaches the whole process group; the front end decides what it means (stop one
    # reply in `octavo chat`, drain a server) and tells the core.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return serve_core(sys.stdin.buffer.read(), args.input, args.output, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
