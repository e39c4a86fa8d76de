"""Small C++ kernels for the CPU, built on first use with ``torch.utils.cpp_extension`` and cached
on disk; and the on/off environment switches of the CPU fast paths.

Used by the paged decode attention (``attention/cpu_paged.py``), the fused RMSNorm / SiLU
(``cpu_fused.py``) and the float32 GEMM (``cpu_gemm.py``). A kernel that cannot be built (no
compiler, no headers) leaves its PyTorch form in place, with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import threading
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def switch_on(name: str) -> bool:
    """An environment switch of a CPU fast path: on unless set to 0, false or off."""
    return os.environ.get(name, "1") not in ("0", "false", "off")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo ("" off Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return ""


def available_memory_bytes(meminfo: str = "/proc/meminfo", cgroup_root: str = "/sys/fs/cgroup",
                           own_cgroup: str = "/proc/self/cgroup") -> Optional[int]:
    """Memory available without swapping: the kernel's estimate (MemAvailable), or less where this
    process's cgroup (v2: a container's memory limit) leaves less below its limit; None off Linux.
    The packed weight copies of the CPU fast paths are kept only where they fit in a share of it."""
    available = None
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    headroom = _cgroup_headroom_bytes(cgroup_root, own_cgroup)
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def _cgroup_headroom_bytes(root: str, own_cgroup: str) -> Optional[int]:
    """How far this process's cgroup (v2, or v1's memory controller) is below its memory limit,
    counting reclaimable page cache (inactive files) as free, as container runtimes do; None
    without a limit or a readable cgroup."""
    try:
        with open(own_cgroup) as handle:
            entries = [line.strip().split(":", 2) for line in handle if line.count(":") >= 2]
    except OSError:
        return None
    layouts = []  # (folder candidates, limit file, usage file)
    for _, controllers, path in entries:
        relative = path.lstrip("/")
        if controllers == "":
            layouts.append(([os.path.join(root, relative), root], "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            base = os.path.join(root, "memory")
            layouts.append(([os.path.join(base, relative), base], "memory.limit_in_bytes", "memory.usage_in_bytes"))
    for folders, limit_file, usage_file in layouts:
        # inside a cgroup namespace the process's own cgroup is the mount's root
        folder = next((f for f in folders if os.path.exists(os.path.join(f, limit_file))), None)
        if folder is None:
            continue
        try:
            with open(os.path.join(folder, limit_file)) as handle:
                limit = handle.read().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a page-rounded 2**63
                continue
            with open(os.path.join(folder, usage_file)) as handle:
                usage = int(handle.read().strip())
            inactive_file = 0
            with open(os.path.join(folder, "memory.stat")) as handle:
                for line in handle:
                    name, _, value = line.partition(" ")
                    if name in ("inactive_file", "total_inactive_file"):
                        inactive_file = int(value)
            return max(0, int(limit) - (usage - inactive_file))
        except (OSError, ValueError):
            continue
    return None


def _build_tag(source: str) -> str:
    """A short hash of the CPU's flags (the build uses -march=native, so a cache shared with
    another kind of CPU must not hand over this one's binary), the source, torch, and the
    environment's prefix (torch's build cache keys on the include paths, so two virtual
    environments sharing one build folder would rebuild it in turn)."""
    return hashlib.sha256((cpu_flags() + source + torch.__version__ + sys.prefix).encode()).hexdigest()[:12]


class CppKernels:
    """One C++ source registering ``torch.ops.<namespace>.<probe>`` (and its siblings), built
    and loaded at the first ``load()``; later calls answer from memory."""

    def __init__(self, name: str, source: str, namespace: str, probe: str, fallback: str) -> None:
        self.name, self.source, self.namespace, self.probe = name, source, namespace, probe
        self.fallback = fallback  # what runs instead, for the warning
        self._lock = threading.Lock()
        self._ok: Optional[bool] = None
        self.error: Optional[BaseException] = None

    def load(self) -> bool:
        """Build (first time on this machine: half a minute to a minute) and load the kernels;
        False, with a warning once, where that fails."""
        if self._ok is not None:  # called per layer on the fast paths: no lock once decided
            return self._ok
        with self._lock:
            if self._ok is None:
                try:
                    from torch.utils.cpp_extension import load_inline

                    # -ffast-math for vector exp (glibc's vector math functions).
                    load_inline(name=f"{self.name}_{_build_tag(self.source)}", cpp_sources=[self.source],
                                functions=None, extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                                extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
                    self._ok = hasattr(getattr(torch.ops, self.namespace), self.probe)
                except Exception as error:  # no compiler, no headers, ...: the PyTorch forms stay
                    self._ok, self.error = False, error
                    logger.warning("the CPU kernels %s could not be built (%s); %s", self.name, error, self.fallback)
            return self._ok
