"""Tensor parallelism, rank 0's side: start the workers, then have them follow every step.

The engine core is rank 0: it keeps the one scheduler and KV cache manager, and its model
runner is a ``TensorParallelRunner``. Each extra rank is a worker process
(``python -m octavo.worker.tp_worker``) that builds its shard of the model and a plain
``ModelRunner`` with a KV cache of the same number of blocks (its own heads), then mirrors
rank 0's runner: every runner call that touches the device (allocate, profile, capture graphs,
copy blocks, forward, logits) first sends the worker a small msgspec command over zmq, and a
forward step's flat inputs (token ids, positions, slots, query starts, lengths, block tables)
follow as one int64 tensor through ``torch.distributed.broadcast``. The collectives inside the
model (all-reduces, the logits gather) then line up. Only rank 0 samples.

A worker that exits fails the next step loudly (its process is checked before every
command), and every collective has a timeout, so nothing waits forever on a dead rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Optional

import msgspec
import torch
import zmq

from octavo.config import EngineConfig
from octavo.layers.attention import AttentionMetadata
from octavo.model_loader import loader
from octavo.models.registry import resolve_model_class
from octavo.worker import parallel_state
from octavo.worker.model_runner import ModelRunner
from octavo.worker.parallel_state import TensorParallelGroup, init_tensor_parallel

logger = logging.getLogger(__name__)

# Bounds every collective: a rank that stops answering fails the others after this long.
COLLECTIVE_TIMEOUT_S = 600.0
# How long a failed collective waits for a worker's exit to show, to name it.
_DEATH_GRACE_S = 2.0
# How often rank 0 looks at the workers' processes while it waits for them to load.
_LIVENESS_POLL_MS = 200
# NVLink multicast (NVLS) stays off in every rank: the lent machines do not support it.
WORKER_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class WorkerCommand(msgspec.Struct, array_like=True):
    """One runner call for the workers; ``payload`` int64 values follow by broadcast."""

    kind: str  # allocate | profile | capture | copy | step | logits | shutdown
    args: list[int]
    payload: int = 0


class WorkerReply(msgspec.Struct, array_like=True):
    """A worker has loaded its shard (``error`` empty), or failed."""

    rank: int
    error: str = ""


def check_tensor_parallel(config: EngineConfig, hf_config, dtype: torch.dtype, device: torch.device) -> None:
    """ValueError naming what to change when the model cannot be split ``tensor_parallel_size``
    ways: too few GPUs, an architecture without tensor-parallel layers (mixture-of-experts
    ones included), head counts or MLP widths the ranks do not divide, quantized weights.
    Checked before any worker starts; the layers check their own split again when built."""
    size = config.tensor_parallel_size
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size ({size}) exceeds the {torch.cuda.device_count()} visible GPUs; "
                         "lower it or make more GPUs visible (CUDA_VISIBLE_DEVICES).")
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(f"with tensor parallelism rank r runs on cuda:r; use device='cuda', not {device}.")
    model_class = resolve_model_class(hf_config)
    if not model_class.supports_tensor_parallel:
        raise ValueError(f"{model_class.__name__} models do not support tensor parallelism yet; "
                         "use tensor_parallel_size=1.")
    quantization = loader.quantization_for_model(model_class, hf_config, config.quantization, dtype)
    if quantization is not None and not quantization.supports_tensor_parallel:
        raise ValueError(f"{quantization.name} weights do not support tensor parallelism yet; use "
                         "tensor_parallel_size=1, FP8 (--quantization fp8 or an fp8 checkpoint), or an unquantized "
                         "checkpoint (quantization none).")
    group = TensorParallelGroup(0, size)
    heads = hf_config.num_attention_heads
    group.attention_heads(heads, getattr(hf_config, "num_key_value_heads", None) or heads)
    hidden = hf_config.hidden_size
    mlp = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden
    group.shard(mlp, "the MLP width (intermediate_size)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TensorParallelWorkers:
    """The worker processes of ranks 1..N-1 and the sockets that drive them."""

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], device: torch.device) -> None:
        from octavo.engine.messages import encode_startup

        self.world_size = config.tensor_parallel_size
        self._folder = tempfile.mkdtemp(prefix="octavo-tp-")
        self.context = zmq.Context()
        self.replies = self.context.socket(zmq.PULL)
        replies_address = f"ipc://{os.path.join(self._folder, 'replies')}"
        self.replies.bind(replies_address)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        environment = {**os.environ, **WORKER_ENVIRONMENT}
        os.environ.update(WORKER_ENVIRONMENT)  # rank 0 creates its NCCL communicator in this process
        startup = encode_startup(config, eos_token_ids)
        self.commands: list[zmq.Socket] = []
        self.processes: list[subprocess.Popen] = []
        for rank in range(1, self.world_size):
            commands = self.context.socket(zmq.PUSH)
            address = f"ipc://{os.path.join(self._folder, f'rank{rank}')}"
            commands.bind(address)
            self.commands.append(commands)
            process = subprocess.Popen(
                [sys.executable, "-m", "octavo.worker.tp_worker", "--rank", str(rank),
                 "--world-size", str(self.world_size), "--init-method", init_method, "--commands", address,
                 "--replies", replies_address, "--parent-pid", str(os.getpid())],
                stdin=subprocess.PIPE, env=environment)
            process.stdin.write(startup)
            process.stdin.close()
            self.processes.append(process)
        self._finalizer = weakref.finalize(self, _stop_workers, list(self.processes), self.context)
        rank0_device = torch.device("cuda", 0) if device.type == "cuda" else device
        if device.type == "cuda":
            torch.cuda.set_device(rank0_device)
        self.group = init_tensor_parallel(0, self.world_size, init_method, rank0_device, COLLECTIVE_TIMEOUT_S)

    def check_alive(self) -> None:
        for rank, process in enumerate(self.processes, start=1):
            if process.poll() is not None:
                raise RuntimeError(f"tensor-parallel worker rank {rank} exited with code {process.returncode}; "
                                   "the engine cannot continue.")

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard; raise a worker's start-up error."""
        waiting = set(range(1, self.world_size))
        while waiting:
            if self.replies.poll(_LIVENESS_POLL_MS):
                reply = msgspec.msgpack.decode(self.replies.recv(), type=WorkerReply)
                if reply.error:
                    raise RuntimeError(f"tensor-parallel worker rank {reply.rank} failed to start: {reply.error}")
                waiting.discard(reply.rank)
            else:
                self.check_alive()

    def command(self, kind: str, args: list[int], payload: Optional[torch.Tensor] = None) -> None:
        """Send every worker a command (then its payload, by broadcast)."""
        self.check_alive()
        message = msgspec.msgpack.encode(WorkerCommand(kind, args, 0 if payload is None else payload.numel()))
        for commands in self.commands:
            commands.send(message, copy=False)
        if payload is not None:
            try:
                self.group.broadcast(payload)
            except RuntimeError:
                self._name_dead_worker()
                raise

    def _name_dead_worker(self) -> None:
        """After a failed collective: raise naming the worker that died, if one did (it may
        take a moment for its exit to show)."""
        deadline = time.monotonic() + _DEATH_GRACE_S
        while time.monotonic() < deadline:
            self.check_alive()
            time.sleep(0.05)

    def shutdown(self) -> None:
        if not self._finalizer.alive:
            return
        with contextlib.suppress(Exception):
            if all(process.poll() is None for process in self.processes):
                message = msgspec.msgpack.encode(WorkerCommand("shutdown", []))
                for commands in self.commands:
                    commands.send(message)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self._finalizer()
        parallel_state.destroy_tensor_parallel()


def _stop_workers(processes: list[subprocess.Popen], context: zmq.Context) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    context.destroy(linger=0)


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> tuple[list[int], torch.Tensor]:
    """A forward step's flat inputs as (sizes, one int64 tensor) for the workers."""
    tables = metadata.block_tables
    parts = [input_ids, positions, metadata.slot_mapping, metadata.query_start_loc, metadata.seq_lens,
             tables.reshape(-1)]
    sizes = [input_ids.numel(), tables.shape[0], tables.shape[1] if tables.dim() == 2 else 0]
    return sizes, torch.cat([part.to(torch.int64) for part in parts])


def unpack_step(sizes: list[int], payload: torch.Tensor):
    """(input ids, positions, slots, query starts, sequence lengths, block tables) of ``pack_step``."""
    num_tokens, num_seqs, width = sizes
    splits = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * width]
    input_ids, positions, slots, query_start, seq_lens, tables = payload.split(splits)
    return input_ids, positions, slots, query_start, seq_lens, tables.reshape(num_seqs, width)


class TensorParallelRunner(ModelRunner):
    """Rank 0's model runner: each device call is mirrored by the workers first."""

    def __init__(self, workers: TensorParallelWorkers, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers
        self._mirror = True  # off while a mirrored call runs its own nested calls

    def allocate_kv_cache(self, num_blocks: int) -> None:
        if self._mirror:
            self.workers.command("allocate", [num_blocks])
        super().allocate_kv_cache(num_blocks)

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> float:
        self.workers.command("capture", [max_num_seqs, max_model_len])
        return super().capture_cuda_graphs(max_num_seqs, max_model_len)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            self.workers.command("copy", [block for pair in copies for block in pair])
        super().copy_blocks(copies)

    def profile_peak_activation_bytes(self, num_tokens: int, max_model_len: int, num_sample_rows: int) -> int:
        self.workers.command("profile", [num_tokens, max_model_len, num_sample_rows])
        self._mirror = False
        try:
            return super().profile_peak_activation_bytes(num_tokens, max_model_len, num_sample_rows)
        finally:
            self._mirror = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                num_seqs: int) -> torch.Tensor:
        sizes, payload = pack_step(input_ids, positions, metadata)
        self.workers.command("step", sizes + [num_seqs], payload)
        return super().forward(input_ids, positions, metadata, num_seqs)

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=hidden.device)
        self.workers.command("logits", [], rows.to(torch.int64))
        return super().compute_logits(hidden, rows)


def start_tensor_parallel(config: EngineConfig, eos_token_ids: frozenset[int], hf_config, dtype: torch.dtype,
                          device: torch.device) -> Optional[TensorParallelWorkers]:
    """Check the split and start the workers (``None`` at tensor_parallel_size 1). Rank 0 then
    builds its own shard of the model; ``TensorParallelWorkers.wait_ready`` before the first command."""
    if config.tensor_parallel_size == 1:
        return None
    check_tensor_parallel(config, hf_config, dtype, device)
    return TensorParallelWorkers(config, eos_token_ids, device)
