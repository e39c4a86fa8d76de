"""Engine cores as Ray actors (``distributed_executor_backend="ray"``).

Ray places the cores: one placement-group bundle per replica (one CPU, and one GPU on CUDA), on
any machine of the cluster that has the resources. Each actor runs the same ``serve_core`` loop as
a local core process, connected to zmq sockets that the front end binds on its node's address, so
the front end talks to an actor exactly as to a local process. Ray starts, places and watches
the actors; a dead actor shows as an exited ``process`` (``_ActorProcess``).

``ray.init()`` joins the cluster this machine belongs to (``ray start`` or ``RAY_ADDRESS``) and
otherwise starts a local Ray instance; a caller that already ran ``ray.init`` keeps its instance.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

# How long to wait for the cluster to offer every replica's bundle before saying what is missing.
_PLACEMENT_TIMEOUT_S = 120.0


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ValueError("distributed_executor_backend='ray' needs Ray: pip install 'ray>=2.9'.") from exc
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    return ray


def node_address() -> str:
    """This node's address in the cluster: where the cores' sockets are bound."""
    return _ray().util.get_node_ip_address()


def cluster_has_gpus() -> bool:
    return _ray().cluster_resources().get("GPU", 0) >= 1


class RayPlacement:
    """One placement group for all replicas; ``bundle(i)`` is what ``start_core_actor`` takes."""

    def __init__(self, num_replicas: int, use_gpus: bool) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group, remove_placement_group

        self._remove = remove_placement_group
        self.num_gpus = 1 if use_gpus else 0
        bundle = {"CPU": 1, "GPU": 1} if use_gpus else {"CPU": 1}
        self.group = placement_group([dict(bundle) for _ in range(num_replicas)], strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            self.close()
            raise ValueError(
                f"the Ray cluster cannot place {num_replicas} engine cores of {bundle} each (it has "
                f"{ray.available_resources()} free); add machines with `ray start --address=...` or lower "
                "data_parallel_size.")

    def bundle(self, index: int) -> tuple:
        return (self.group, index, self.num_gpus)

    def close(self) -> None:
        if self.group is not None:
            self._remove(self.group)
            self.group = None


class _CoreActor:
    """The actor's body: the engine core loop, run as one long method call."""

    def run(self, startup: bytes, input_address: str, output_address: str, log_level: str) -> int:
        from octavo.engine.core_process import serve_core

        logging.basicConfig(level=log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s [ray core]: %(message)s")
        # The actor's parent (Ray's worker machinery) stays for the actor's life; Ray ends the
        # actor when the front end that owns it goes.
        return serve_core(startup, input_address, output_address, os.getppid())


def start_core_actor(bundle: tuple, startup: bytes, input_address: str, output_address: str,
                     log_level: str) -> _ActorProcess:
    ray = _ray()
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group, index, num_gpus = bundle
    # Local checkouts (tests, `PYTHONPATH=.`) reach the workers too; an installed octavo needs nothing.
    source = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    actor = ray.remote(_CoreActor).options(
        num_cpus=1, num_gpus=num_gpus, name=None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group,
                                                             placement_group_bundle_index=index),
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    ).remote()
    return _ActorProcess(ray, actor, actor.run.remote(startup, input_address, output_address, log_level))


class _ActorProcess:
    """A core actor seen as a ``Popen``: ``poll``, ``wait`` and ``kill``."""

    def __init__(self, ray, actor, run_ref) -> None:
        self._ray = ray
        self.actor = actor
        self._run = run_ref
        self.returncode: Optional[int] = None
        self.pid = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            ready, _ = self._ray.wait([self._run], timeout=0)
            if ready:
                self._collect()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            ready, _ = self._ray.wait([self._run], timeout=timeout)
            if not ready:
                raise subprocess.TimeoutExpired("ray engine core actor", timeout)
            self._collect()
        return self.returncode

    def kill(self) -> None:
        self._ray.kill(self.actor, no_restart=True)

    def _collect(self) -> None:
        try:
            self.returncode = int(self._ray.get(self._run))
        except Exception as exc:  # noqa: BLE001 - the actor died (killed, its node lost): an exit
            logger.error("the engine core actor died: %s", exc)
            self.returncode = -9
        self._ray.kill(self.actor, no_restart=True)  # give its bundle back
