"""The front end's handle on an engine core: in this thread, or in its own process.

Every client takes requests (``add``), aborts (``abort``) and hands back each step's outputs
(``get_outputs``); nothing else crosses the boundary. ``InprocCoreClient`` runs the core's step
in the caller's thread (tests, the CPU path, tools that look inside the core).
``ProcessCoreClient`` starts ``core_process.py`` and talks to it over two zmq sockets: the core
steps while the caller detokenizes. ``AsyncProcessCoreClient`` is the same for an asyncio front
end (the server). A core that fails or exits raises ``EngineDeadError`` at the next call, never a
hang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from typing import Iterable, Optional

import zmq
import zmq.asyncio

from octavo.config import EngineConfig
from octavo.engine.core import EngineCore
from octavo.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreFailed,
    CoreInfo,
    CoreOutput,
    CoreRequest,
    CoreStats,
    FromCore,
    Ready,
    Shutdown,
    StepOutputs,
    decode_from_core,
    encode,
    encode_startup,
)

logger = logging.getLogger(__name__)

# How often a waiting client checks that the core process is still alive.
_LIVENESS_POLL_MS = 200
_SHUTDOWN_WAIT_S = 10.0


class EngineUnavailableError(RuntimeError):
    """The engine cannot take or finish a request now; a server answers 503."""


class EngineDeadError(EngineUnavailableError):
    """The engine core failed or exited: it stopped for good."""


class InprocCoreClient:
    """The core in the caller's thread: ``get_outputs`` runs one step."""

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int]) -> None:
        self.core = EngineCore(config, eos_token_ids)
        self.info = self.core.info()
        self._refused: list[CoreOutput] = []

    def add(self, requests: list[CoreRequest]) -> None:
        for request in requests:
            try:
                self.core.add_request(request)
            except Exception as exc:  # noqa: BLE001 - reported as the request's own failure
                self._refused.append(CoreOutput(request.core_id, [], finished=True, error=str(exc) or repr(exc)))

    def abort(self, core_ids: list[int], sample_indices: Optional[list[Optional[list[int]]]] = None) -> None:
        self.core.abort_requests(core_ids, sample_indices)

    def get_outputs(self) -> StepOutputs:
        refused, self._refused = self._refused, []
        step = self.core.step() if self.core.has_unfinished_requests() else StepOutputs([])
        step.outputs = refused + step.outputs
        return step

    def stats(self) -> CoreStats:
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()


def _raise_failure(message: CoreFailed) -> None:
    text = f"the engine core failed ({message.error_type}): {message.message}"
    if message.during_startup and message.error_type in ("ValueError", "FileNotFoundError"):
        raise ValueError(message.message)  # a configuration the user can fix
    raise EngineDeadError(text)


class _CoreProcess:
    """Starts the engine core and owns the two sockets to it.

    Locally the core is ``python -m octavo.engine.core_process`` over ipc:// sockets (``env`` adds
    to its environment: a replica's ``CUDA_VISIBLE_DEVICES``); with ``ray_bundle`` it is a Ray actor
    in that placement-group bundle, connected over tcp:// sockets bound here. Either way
    ``process`` answers ``poll``, ``wait`` and ``kill`` like a ``Popen``.
    """

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int], context: zmq.Context,
                 log_level: str = "info", env: Optional[dict[str, str]] = None,
                 ray_bundle: Optional[tuple] = None) -> None:
        startup = encode_startup(config, frozenset(eos_token_ids))
        self.context = context
        self.to_core = context.socket(zmq.PUSH)
        self.from_core = context.socket(zmq.PULL)
        if ray_bundle is not None:
            from octavo.engine.ray_cores import node_address, start_core_actor

            self._folder = None
            host = node_address()
            to_core = f"tcp://{host}:{self.to_core.bind_to_random_port(f'tcp://{host}')}"
            from_core = f"tcp://{host}:{self.from_core.bind_to_random_port(f'tcp://{host}')}"
            self.process = start_core_actor(ray_bundle, startup, to_core, from_core, log_level)
        else:
            self._folder = tempfile.mkdtemp(prefix="octavo-core-")
            to_core, from_core = (f"ipc://{os.path.join(self._folder, name)}" for name in ("in", "out"))
            self.to_core.bind(to_core)
            self.from_core.bind(from_core)
            command = [sys.executable, "-m", "octavo.engine.core_process", "--input", to_core, "--output",
                       from_core, "--parent-pid", str(os.getpid()), "--log-level", log_level]
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                            env={**os.environ, **env} if env else None)
            self.process.stdin.write(startup)
            self.process.stdin.close()
        # Whatever happens to the front end object, the child never outlives it.
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self._folder)

    def exit_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine core process exited with code {self.process.returncode}.")

    def wait_ready(self) -> CoreInfo:
        """Block until the core has loaded the model; raise its start-up error otherwise."""
        # With asyncio sockets (before the loop runs) read through a blocking shadow of the socket.
        sock = zmq.Socket.shadow(self.from_core.underlying)
        while True:
            if sock.poll(_LIVENESS_POLL_MS):
                message = decode_from_core(sock.recv())
                if isinstance(message, Ready):
                    return message.info
                if isinstance(message, CoreFailed):
                    self.process.wait()
                    _raise_failure(message)
                raise EngineDeadError(f"the engine core sent {type(message).__name__} before it was ready.")
            if self.process.poll() is not None:
                raise self.exit_error()

    def send(self, message) -> None:
        """Send without blocking on a core that is gone: a PUSH socket with no peer would block
        for ever. A live core that is only behind gets the message once it reads again."""
        data = encode(message)
        while True:
            if self.process.poll() is not None:
                raise self.exit_error()
            try:
                self.to_core.send(data, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                self.to_core.poll(_LIVENESS_POLL_MS, zmq.POLLOUT)

    def request_shutdown(self) -> None:
        """Ask the core to stop (from the thread that owns the sockets)."""
        if self.process.poll() is None:
            try:
                self.to_core.send(encode(Shutdown()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def wait_stopped(self) -> None:
        """Wait for the core to exit after ``request_shutdown`` (stopping it after a while); any thread."""
        try:
            self.process.wait(timeout=_SHUTDOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        self._finalizer()

    def close_sockets(self) -> None:
        self.to_core.close(linger=0)
        self.from_core.close(linger=0)

    def shutdown(self) -> None:
        self.request_shutdown()
        self.wait_stopped()
        self.close_sockets()


def _stop_process(process: subprocess.Popen, folder: Optional[str]) -> None:
    """End the core process (it frees its GPU memory with it) and remove its socket folder."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=_SHUTDOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


class _ProcessClientBase:
    """What the sync and asyncio clients share: the core's process and the ready handshake."""

    def __init__(self, core_process: _CoreProcess, wait: bool) -> None:
        self._process = core_process
        if wait:
            self.wait_ready()

    def wait_ready(self) -> CoreInfo:
        """Wait for the model to load (``wait=False`` starts several cores at once, then waits)."""
        try:
            self.info = self._process.wait_ready()
        except BaseException:
            self._process.shutdown()
            raise
        return self.info

    @property
    def process(self) -> subprocess.Popen:
        return self._process.process


class ProcessCoreClient(_ProcessClientBase):
    """The core in its own process; ``get_outputs`` blocks until the next step's outputs arrive."""

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int], log_level: str = "info",
                 env: Optional[dict[str, str]] = None, ray_bundle: Optional[tuple] = None,
                 wait: bool = True) -> None:
        self.latest_stats: Optional[CoreStats] = None
        self._dead: Optional[EngineDeadError] = None
        super().__init__(_CoreProcess(config, eos_token_ids, zmq.Context(), log_level, env, ray_bundle), wait)

    @property
    def output_socket(self) -> zmq.Socket:
        return self._process.from_core

    def request_shutdown(self) -> None:
        """Ask the core to stop without waiting (``shutdown`` waits): several stop at once."""
        self._process.request_shutdown()

    def add(self, requests: list[CoreRequest]) -> None:
        self._check_alive()
        try:
            self._process.send(AddRequests(requests))
        except EngineDeadError as exc:
            self._dead = exc
            raise

    def abort(self, core_ids: list[int], sample_indices: Optional[list[Optional[list[int]]]] = None) -> None:
        if self._dead is None and core_ids:
            try:
                self._process.send(AbortRequests(core_ids, sample_indices))
            except EngineDeadError as exc:
                self._dead = exc  # nothing left to abort; the next call reports it

    def get_outputs(self) -> StepOutputs:
        """The next outputs message (several are merged if they queued up meanwhile)."""
        self._check_alive()
        sock = self._process.from_core
        while not sock.poll(_LIVENESS_POLL_MS):
            if self._process.process.poll() is not None:
                self._dead = self._process.exit_error()
                raise self._dead
        merged = self._handle(decode_from_core(sock.recv()))
        while sock.poll(0):
            merged.merge(self._handle(decode_from_core(sock.recv())))
        return merged

    def _handle(self, message: FromCore) -> StepOutputs:
        if isinstance(message, CoreFailed):
            try:
                _raise_failure(message)
            except EngineDeadError as exc:
                self._dead = exc
                raise
        if not isinstance(message, StepOutputs):
            raise EngineDeadError(f"unexpected {type(message).__name__} from the engine core.")
        if message.stats is not None:
            self.latest_stats = message.stats
        return message

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead

    def stats(self) -> Optional[CoreStats]:
        return self.latest_stats

    def shutdown(self) -> None:
        self._process.shutdown()

    stop_before_start = shutdown


class AsyncProcessCoreClient(_ProcessClientBase):
    """The core in its own process, for an asyncio front end.

    Built (and the model loaded) before the event loop runs; ``start`` then hands outputs to
    ``on_outputs`` and a failure or exit of the core to ``on_dead`` from the running loop.
    """

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int], log_level: str = "info",
                 env: Optional[dict[str, str]] = None, ray_bundle: Optional[tuple] = None,
                 wait: bool = True) -> None:
        self._tasks: list[asyncio.Future] = []
        super().__init__(_CoreProcess(config, eos_token_ids, zmq.asyncio.Context(), log_level, env, ray_bundle),
                         wait)

    def stop_before_start(self) -> None:
        """Stop a core whose outputs were never taken (``start`` not called): blocking."""
        self._process.shutdown()

    def start(self, on_outputs, on_dead) -> None:
        """Deliver every ``StepOutputs`` to ``on_outputs`` and the first failure to ``on_dead``."""
        loop = asyncio.get_running_loop()
        self._tasks = [asyncio.ensure_future(self._read(on_outputs, on_dead)),
                       loop.run_in_executor(None, self._process.process.wait)]
        self._tasks[1].add_done_callback(lambda _: self._on_exit(on_dead))

    async def _read(self, on_outputs, on_dead) -> None:
        sock = self._process.from_core
        try:
            while True:
                message = decode_from_core(await sock.recv())
                if isinstance(message, CoreFailed):
                    try:
                        _raise_failure(message)
                    except (EngineDeadError, ValueError) as exc:
                        on_dead(exc if isinstance(exc, EngineDeadError) else EngineDeadError(str(exc)))
                    return
                on_outputs(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken message stream is a dead engine
            logger.exception("reading the engine core's outputs failed")
            on_dead(EngineDeadError(f"reading the engine core's outputs failed: {exc!r}"))

    def _on_exit(self, on_dead) -> None:
        # Let the reader deliver what the core sent before exiting (its failure message) first.
        asyncio.get_running_loop().call_later(0.2, on_dead, self._process.exit_error())

    def add(self, requests: list[CoreRequest]) -> None:
        self._process.to_core.send(encode(AddRequests(requests)), copy=False)

    def abort(self, core_ids: list[int], sample_indices: Optional[list[Optional[list[int]]]] = None) -> None:
        if core_ids and self._process.process.poll() is None:
            self._process.to_core.send(encode(AbortRequests(core_ids, sample_indices)), copy=False)

    async def shutdown(self) -> None:
        for task in self._tasks[:1]:
            task.cancel()
        self._process.request_shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self._process.wait_stopped)
        self._process.close_sockets()

