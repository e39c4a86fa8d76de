"""Data parallelism: several engine cores (replicas) behind one front end.

Each replica is a whole engine core (model, KV cache, scheduler) on its own device(s): a local
process pinned with ``CUDA_VISIBLE_DEVICES`` (replicas share a GPU, and split its
``gpu_memory_utilization``, when there are fewer GPUs than replicas; on CPU they split the cores),
or a Ray actor (``ray_cores``). The front end routes every request (``PrefixRouter``) and merges
the replicas' outputs; the core ids it hands out are unique across replicas, so outputs need no
translation. One replica is not served through here at all: the front end talks to its core
directly, with no extra hop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Optional

import msgspec
import torch
import zmq

from octavo.config import EngineConfig
from octavo.engine.core_client import (
    _LIVENESS_POLL_MS,
    AsyncProcessCoreClient,
    EngineDeadError,
    ProcessCoreClient,
)
from octavo.engine.messages import CoreInfo, CoreRequest, CoreStats, StepOutputs

logger = logging.getLogger(__name__)

# A replica that already holds a request's prefix keeps getting it until its waiting tokens exceed
# the least loaded replica's by this many steps' worth of prefill.
_OVERLOAD_STEPS = 1


def uses_replicas(config: EngineConfig) -> bool:
    """Replicas need the data-parallel client; one local core is talked to directly."""
    return config.data_parallel_size > 1 or config.distributed_executor_backend == "ray"


@dataclass
class ReplicaPlan:
    """Where one replica runs: its config, its environment (local) or its Ray bundle."""

    config: EngineConfig
    env: Optional[dict[str, str]] = None
    ray_bundle: Optional[tuple] = None


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def plan_local_replicas(config: EngineConfig, gpus: Optional[list[str]] = None) -> list[ReplicaPlan]:
    """One process per replica: replica i on GPU i, or round-robin over fewer GPUs with each GPU's
    ``gpu_memory_utilization`` split among the replicas on it; on CPU the cores are split."""
    num = config.data_parallel_size
    on_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if not on_cuda:
        if "OMP_NUM_THREADS" in os.environ:
            return [ReplicaPlan(config) for _ in range(num)]
        threads = str(max(1, (os.cpu_count() or 1) // num))
        return [ReplicaPlan(config, {"OMP_NUM_THREADS": threads}) for _ in range(num)]
    if config.device.startswith("cuda:"):
        raise ValueError(f"device={config.device!r} names one GPU, but data_parallel_size={num} places a replica "
                         "per GPU; use device='cuda' and choose the GPUs with CUDA_VISIBLE_DEVICES.")
    gpus = _visible_gpus() if gpus is None else gpus
    if not gpus:
        raise ValueError("device='cuda' was requested but no CUDA GPU is visible; use device='cpu'.")
    assigned = [gpus[index % len(gpus)] for index in range(num)]
    plans = []
    for gpu in assigned:
        share = config.cache.gpu_memory_utilization / assigned.count(gpu)
        replica_config = dataclasses.replace(config, device="cuda",
                                             cache=dataclasses.replace(config.cache, gpu_memory_utilization=share))
        plans.append(ReplicaPlan(replica_config, {"CUDA_VISIBLE_DEVICES": gpu}))
    if len(gpus) < num:
        logger.info("%d replicas on %d GPU(s): each GPU's memory share is split among its replicas", num, len(gpus))
    return plans


def plan_replicas(config: EngineConfig):
    """The replicas' plans, and the Ray placement group that holds them (None locally)."""
    if config.distributed_executor_backend != "ray":
        return plan_local_replicas(config), None
    from octavo.engine.ray_cores import RayPlacement, cluster_has_gpus

    use_gpus = config.device.startswith("cuda") or (config.device == "auto" and cluster_has_gpus())
    placement = RayPlacement(config.data_parallel_size, use_gpus)
    device = "cuda" if use_gpus else "cpu"
    replica_config = dataclasses.replace(config, device=device)
    return [ReplicaPlan(replica_config, ray_bundle=placement.bundle(i))
            for i in range(config.data_parallel_size)], placement


def combined_info(infos: list[CoreInfo]) -> CoreInfo:
    """What the front end plans with: the first replica's shape, the replicas' capacity summed."""
    first = infos[0]
    return msgspec.structs.replace(first, num_blocks=sum(info.num_blocks for info in infos),
                                   max_num_seqs=sum(info.max_num_seqs for info in infos))


@dataclass
class _Routed:
    replica: int
    num_tokens: int  # counted as waiting until the request's first output comes back
    key: Optional[tuple]


class PrefixRouter:
    """Chooses a replica per request, from what the front end sent and what came back.

    A replica's load is its waiting tokens: the prompt tokens of requests sent to it (or held for
    it) that have produced no output yet; ties go to fewer running requests (as the replica last
    reported), then to fewer requests routed so far. Requests whose prompts share their first full
    block (and cache salt) go to a replica that already has that prefix while its load is within
    ``overload_tokens`` of the least loaded replica; beyond that, the least loaded replica gets it
    and joins the prefix's replicas. The first request of a prefix on a replica goes ahead alone;
    the others wait in the front end until its first output arrives (its prompt's blocks are then
    cached), so each replica computes a shared prefix once, not once per request of its first step.
    """

    def __init__(self, num_replicas: int, block_size: int, overload_tokens: int) -> None:
        self.block_size = block_size
        self.overload_tokens = overload_tokens
        self.alive = [True] * num_replicas
        self.waiting_tokens = [0] * num_replicas
        self.running = [0] * num_replicas
        self.num_routed = [0] * num_replicas
        self._requests: dict[int, _Routed] = {}  # requests with no output yet
        self._placed: dict[int, int] = {}  # core id -> replica, until the request ends
        self._owners: dict[tuple, list[int]] = {}  # prefix key -> replicas that have (or compute) it
        self._leaders: dict[tuple, int] = {}  # (key, replica) -> the core id computing the prefix there
        self._held: dict[tuple, list[CoreRequest]] = {}  # (key, replica) -> requests waiting for it

    @property
    def num_alive(self) -> int:
        return sum(self.alive)

    def prefix_key(self, request: CoreRequest) -> Optional[tuple]:
        if len(request.prompt_token_ids) < self.block_size:
            return None  # no full block: nothing for the prefix cache to share
        return (request.cache_salt, tuple(request.prompt_token_ids[:self.block_size]))

    def _load(self, replica: int) -> tuple[int, int, int]:
        return self.waiting_tokens[replica], self.running[replica], self.num_routed[replica]

    def route(self, request: CoreRequest) -> tuple[int, bool]:
        """(replica, send now); a request not sent now is released by ``on_output`` of its leader."""
        live = [replica for replica, alive in enumerate(self.alive) if alive]
        if not live:
            raise EngineDeadError("every engine replica is dead.")
        least = min(live, key=self._load)
        replica, key = least, self.prefix_key(request)
        if key is not None:
            owners = [owner for owner in self._owners.get(key, ()) if self.alive[owner]]
            best = min(owners, key=self._load) if owners else None
            if best is not None and self.waiting_tokens[best] <= self.waiting_tokens[least] + self.overload_tokens:
                replica = best
            else:
                self._owners[key] = owners + [least]
        self._requests[request.core_id] = _Routed(replica, len(request.prompt_token_ids), key)
        self._placed[request.core_id] = replica
        self.waiting_tokens[replica] += len(request.prompt_token_ids)
        self.num_routed[replica] += 1
        if key is None:
            return replica, True
        slot = (key, replica)
        if slot in self._leaders:
            self._held.setdefault(slot, []).append(request)
            return replica, False
        self._leaders[slot] = request.core_id
        return replica, True

    def replica_of(self, core_id: int) -> Optional[int]:
        """The replica of a live request."""
        return self._placed.get(core_id)

    def release(self, core_id: int) -> None:
        """The request ended in the front end (a stop string, say): forget where it ran."""
        self._placed.pop(core_id, None)

    def on_output(self, core_id: int, finished: bool) -> list[CoreRequest]:
        """A request's output arrived: it waits no more. Returns the requests to send now (those
        held behind it, when it led its prefix on its replica)."""
        if finished:
            self._placed.pop(core_id, None)
        routed = self._requests.pop(core_id, None)
        if routed is None:
            return []
        self.waiting_tokens[routed.replica] -= routed.num_tokens
        return self._release(routed, core_id)

    def forget(self, core_id: int) -> tuple[Optional[int], bool, list[CoreRequest]]:
        """An abort before any output: (its replica, whether it was sent, requests to send now)."""
        replica = self._placed.pop(core_id, None)
        routed = self._requests.pop(core_id, None)
        if routed is None:
            return replica, True, []
        self.waiting_tokens[routed.replica] -= routed.num_tokens
        held = self._held.get((routed.key, routed.replica), [])
        for index, request in enumerate(held):
            if request.core_id == core_id:
                del held[index]
                return routed.replica, False, []
        return routed.replica, True, self._release(routed, core_id)

    def _release(self, routed: _Routed, core_id: int) -> list[CoreRequest]:
        slot = (routed.key, routed.replica)
        if routed.key is None or self._leaders.get(slot) != core_id:
            return []
        del self._leaders[slot]
        return self._held.pop(slot, [])

    def set_running(self, replica: int, num_running: int) -> None:
        self.running[replica] = num_running

    def mark_dead(self, replica: int) -> None:
        """Route nothing more to ``replica``; forget what it held."""
        self.alive[replica] = False
        for core_id in [core_id for core_id, routed in self._requests.items() if routed.replica == replica]:
            del self._requests[core_id]
        for core_id in [core_id for core_id, placed in self._placed.items() if placed == replica]:
            del self._placed[core_id]
        self.waiting_tokens[replica] = 0
        for slot in [slot for slot in self._leaders if slot[1] == replica]:
            del self._leaders[slot]
        for slot in [slot for slot in self._held if slot[1] == replica]:
            del self._held[slot]


def _router_for(config: EngineConfig, info: CoreInfo) -> PrefixRouter:
    step_tokens = config.scheduler.max_num_batched_tokens or max(8192, info.max_model_len)
    return PrefixRouter(config.data_parallel_size, info.block_size, _OVERLOAD_STEPS * step_tokens)


def _start_all(make: Callable[[ReplicaPlan], object], plans: list[ReplicaPlan]) -> list:
    """Start every replica, then wait for all to load (in parallel); on a failure stop them all."""
    replicas = []
    try:
        for plan in plans:
            replicas.append(make(plan))
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.stop_before_start()
        raise
    return replicas


class _RoutingClient:
    """What the sync and asyncio data-parallel clients share: requests go where the router says;
    the ones it held back (behind a prefix's first request) go once released."""

    router: PrefixRouter
    replicas: list

    def add(self, requests: list[CoreRequest]) -> list[int]:
        batches: dict[int, list[CoreRequest]] = {}
        chosen = []
        for request in requests:
            replica, send = self.router.route(request)
            chosen.append(replica)
            if send:
                batches.setdefault(replica, []).append(request)
        for replica, batch in batches.items():
            self.replicas[replica].add(batch)
        return chosen

    def _send_released(self, replica: int, requests: list[CoreRequest]) -> None:
        self.replicas[replica].add(requests)

    def release(self, core_id: int) -> None:
        self.router.release(core_id)


class DataParallelCoreClient(_RoutingClient):
    """Replicas for the synchronous front end (``LLM``); a replica's failure ends the run."""

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int], log_level: str = "info") -> None:
        plans, self._placement = plan_replicas(config)
        eos = list(eos_token_ids)
        try:
            self.replicas: list[ProcessCoreClient] = _start_all(
                lambda plan: ProcessCoreClient(plan.config, eos, log_level, plan.env, plan.ray_bundle, wait=False),
                plans)
        except BaseException:
            self._close_placement()
            raise
        self.info = combined_info([replica.info for replica in self.replicas])
        self.router = _router_for(config, self.info)
        self._poller = zmq.Poller()
        for replica in self.replicas:
            self._poller.register(replica.output_socket, zmq.POLLIN)

    def abort(self, core_ids: list[int], sample_indices: Optional[list[Optional[list[int]]]] = None) -> None:
        for replica, ids, indices in _split_aborts(self.router, core_ids, sample_indices, self._send_released):
            self.replicas[replica].abort(ids, indices)

    def get_outputs(self) -> StepOutputs:
        """Every replica's queued outputs, merged; blocks until at least one replica has some."""
        while True:
            ready = dict(self._poller.poll(_LIVENESS_POLL_MS))
            if ready:
                break
            for index, replica in enumerate(self.replicas):
                if replica.process.poll() is not None:
                    replica._dead = EngineDeadError(
                        f"engine replica {index} exited with code {replica.process.returncode}.")
                    raise replica._dead
        merged = StepOutputs([], None)
        for index, replica in enumerate(self.replicas):
            if replica.output_socket in ready:
                message = replica.get_outputs()
                _take_outputs(self.router, index, message, self._send_released)
                merged.merge(message)
        merged.stats = None  # per replica: stats() adds them up
        return merged

    def stats(self) -> Optional[CoreStats]:
        """The replicas' latest gauges added up (usage averaged)."""
        return sum_stats([replica.stats() for replica in self.replicas])

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.request_shutdown()
        for replica in self.replicas:
            replica.shutdown()
        self._close_placement()

    def _close_placement(self) -> None:
        if self._placement is not None:
            self._placement.close()


def sum_stats(stats: list[Optional[CoreStats]]) -> Optional[CoreStats]:
    present = [one for one in stats if one is not None]
    if not present:
        return None
    values = {name: sum(getattr(one, name) for one in present) for name in CoreStats.__struct_fields__}
    values["kv_cache_usage"] /= len(present)
    return CoreStats(**values)


def _take_outputs(router: PrefixRouter, replica: int, message: StepOutputs,
                  send: Callable[[int, list[CoreRequest]], None]) -> None:
    """Router bookkeeping for one replica's message: its requests that answered wait no more."""
    if message.stats is not None:
        router.set_running(replica, message.stats.num_running_requests)
    for output in message.outputs:
        released = router.on_output(output.core_id, output.finished)
        if released:
            send(replica, released)


def _split_aborts(router: PrefixRouter, core_ids: list[int], sample_indices: Optional[list[Optional[list[int]]]],
                  send: Callable[[int, list[CoreRequest]], None]):
    """Aborts grouped by replica: (replica, core ids, sample indices or None). A whole request
    aborted before its first output leaves the router (and, if it was still held, never reaches
    a core)."""
    groups: dict[int, tuple[list[int], list[Optional[list[int]]]]] = {}
    for position, core_id in enumerate(core_ids):
        indices = None if sample_indices is None else sample_indices[position]
        if indices is None:
            replica, sent, released = router.forget(core_id)
            if released:
                send(replica, released)
            if replica is None or not sent:
                continue
        else:
            replica = router.replica_of(core_id)
            if replica is None:
                continue
        ids, indices_list = groups.setdefault(replica, ([], []))
        ids.append(core_id)
        indices_list.append(indices)
    for replica, (ids, indices_list) in groups.items():
        yield replica, ids, None if sample_indices is None else indices_list


class AsyncDataParallelCoreClient(_RoutingClient):
    """Replicas for the asyncio front end (the server).

    ``start`` hands each replica's outputs to ``on_outputs(message, replica)``; a replica that
    fails or exits goes to ``on_replica_dead(replica, error)`` and receives no more requests, and
    once every replica is dead ``on_dead(error)`` runs, as for a single core.
    """

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int], log_level: str = "info") -> None:
        plans, self._placement = plan_replicas(config)
        eos = list(eos_token_ids)
        try:
            self.replicas: list[AsyncProcessCoreClient] = _start_all(
                lambda plan: AsyncProcessCoreClient(plan.config, eos, log_level, plan.env, plan.ray_bundle,
                                                    wait=False),
                plans)
        except BaseException:
            self._close_placement()
            raise
        self.info = combined_info([replica.info for replica in self.replicas])
        self.router = _router_for(config, self.info)
        self._on_outputs: Callable[[StepOutputs, int], None] = lambda message, replica: None
        self._on_dead: Callable[[BaseException], None] = lambda error: None
        self._on_replica_dead: Callable[[int, BaseException], None] = lambda replica, error: None
        self._stopping = False  # the cores exit because they were told to: no deaths to report

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    def start(self, on_outputs, on_dead, on_replica_dead) -> None:
        self._on_outputs, self._on_dead, self._on_replica_dead = on_outputs, on_dead, on_replica_dead
        for index, replica in enumerate(self.replicas):
            replica.start(partial(self._outputs, index), partial(self._replica_dead, index))

    def _outputs(self, replica: int, message: StepOutputs) -> None:
        if self.router.alive[replica]:
            _take_outputs(self.router, replica, message, self._send_released)
            self._on_outputs(message, replica)

    def _replica_dead(self, replica: int, error: BaseException) -> None:
        if self._stopping or not self.router.alive[replica]:
            return
        self.router.mark_dead(replica)
        logger.error("engine replica %d is dead (%s); %d of %d replicas still serve", replica, error,
                     self.router.num_alive, len(self.replicas))
        self._on_replica_dead(replica, error)
        if self.router.num_alive == 0:
            self._on_dead(error)

    def abort(self, core_ids: list[int], sample_indices: Optional[list[Optional[list[int]]]] = None) -> None:
        for replica, ids, indices in _split_aborts(self.router, core_ids, sample_indices, self._send_released):
            if self.router.alive[replica]:
                self.replicas[replica].abort(ids, indices)

    async def shutdown(self) -> None:
        self._stopping = True
        await asyncio.gather(*(replica.shutdown() for replica in self.replicas))
        self._close_placement()

    def _close_placement(self) -> None:
        if self._placement is not None:
            self._placement.close()
