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


def available_memory_bytes() -> Optional[int]:
    """The kernel's estimate of memory available without swapping (MemAvailable); None off Linux.
    The packed weight copies of the CPU fast paths are kept only where they fit in a share of it."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
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
