"""A tensor-parallel worker: ``python -m octavo.worker.tp_worker --rank R ...`` (started by rank 0).

It joins the process group, builds its shard of the model and a ``ModelRunner``, says it is
ready, then does what rank 0's ``TensorParallelRunner`` tells it, call for call (see
``octavo.worker.tensor_parallel``). It never samples: its logits calls only feed rank 0's
gather. It exits when told to, when rank 0's process is gone, or on any error (which it
reports first), so a broken rank never leaves the others waiting.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from typing import Optional

import msgspec
import numpy as np
import torch
import zmq

from octavo.config import resolve_device, resolve_dtype
from octavo.engine.messages import decode_startup
from octavo.model_loader import loader
from octavo.worker.model_runner import ModelRunner
from octavo.worker.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from octavo.worker.tensor_parallel import COLLECTIVE_TIMEOUT_S, WorkerCommand, WorkerReply, unpack_step

logger = logging.getLogger("octavo.worker.tp_worker")

_IDLE_POLL_MS = 1000  # how often an idle worker checks that rank 0 is still there


class Follower:
    """A runner that repeats rank 0's calls."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.hidden: Optional[torch.Tensor] = None

    def run(self, command: WorkerCommand) -> None:
        runner, args = self.runner, command.args
        payload = None
        if command.payload:
            payload = torch.empty(command.payload, dtype=torch.int64, device=runner.device)
            torch.distributed.broadcast(payload, src=0)
        if command.kind == "step":
            self._step(args, payload)
        elif command.kind == "logits":
            runner.compute_logits(self.hidden, payload)
        elif command.kind == "copy":
            runner.copy_blocks(list(zip(args[0::2], args[1::2])))
        elif command.kind == "allocate":
            runner.allocate_kv_cache(args[0])
        elif command.kind == "profile":
            runner.profile_peak_activation_bytes(*args)
        elif command.kind == "capture":
            runner.capture_cuda_graphs(*args)
        else:
            raise ValueError(f"unknown worker command {command.kind!r}")

    def _step(self, args: list[int], payload: torch.Tensor) -> None:
        input_ids, positions, slots, query_start, seq_lens, tables = unpack_step(args[:3], payload)
        host = [part.cpu().numpy() for part in (query_start, seq_lens, tables, slots)]
        metadata, _ = self.runner._metadata(host[0], host[1], host[2].astype(np.int32), host[3])
        self.hidden = self.runner.forward(input_ids, positions, metadata, args[3])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="octavo tensor-parallel worker (started by the engine core)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--commands", required=True, help="zmq address of rank 0's command socket")
    parser.add_argument("--replies", required=True, help="zmq address of rank 0's reply socket")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format=f"%(asctime)s %(levelname)s %(name)s [rank {args.rank}]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides what Ctrl-C means
    config, eos_token_ids = decode_startup(sys.stdin.buffer.read())

    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(args.commands)
    replies = context.socket(zmq.PUSH)
    replies.connect(args.replies)
    try:
        try:
            follower = _start(config, eos_token_ids, args.rank, args.world_size, args.init_method)
        except BaseException as exc:
            logger.error("the worker failed to start:\n%s", traceback.format_exc())
            replies.send(msgspec.msgpack.encode(WorkerReply(args.rank, f"{type(exc).__name__}: {exc}")))
            return 1
        replies.send(msgspec.msgpack.encode(WorkerReply(args.rank)))
        decoder = msgspec.msgpack.Decoder(WorkerCommand)
        with torch.inference_mode():
            while True:
                if not commands.poll(_IDLE_POLL_MS):
                    if os.getppid() != args.parent_pid:
                        logger.warning("rank 0 is gone; the worker stops")
                        return 0
                    continue
                command = decoder.decode(commands.recv())
                if command.kind == "shutdown":
                    return 0
                follower.run(command)
    except BaseException:
        logger.error("the worker failed; it stops:\n%s", traceback.format_exc())
        return 1
    finally:
        commands.close(linger=0)
        replies.close(linger=1000)
        context.term()
        destroy_tensor_parallel()


def _start(config, eos_token_ids, rank: int, world_size: int, init_method: str) -> Follower:
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    init_tensor_parallel(rank, world_size, init_method, device, COLLECTIVE_TIMEOUT_S)
    torch.manual_seed(config.seed)
    path = loader.check_model_path(config.model, config.load_format)
    hf_config = loader.load_hf_config(path)
    dtype = resolve_dtype(config.dtype, loader.checkpoint_dtype(hf_config), device)
    max_model_len = loader.derive_max_model_len(hf_config, config.max_model_len)
    model = loader.build_model(path, hf_config, dtype, device, max_model_len, config.load_format,
                               config.allow_pickle_weights, config.seed, quantization=config.quantization,
                               gguf_weights=config.gguf_weights)
    runner = ModelRunner(model, device, dtype, config.cache.block_size, frozenset(eos_token_ids),
                         config.attention_backend)
    return Follower(runner)


if __name__ == "__main__":
    sys.exit(main())
