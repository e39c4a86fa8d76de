"""A step's host arrays to the device in one copy.

Each step's inputs (token ids, positions, slot mapping, block tables, sequence lengths, ...) are
small numpy arrays. Uploading each through its own pinned tensor costs a pinned allocation and a
copy launch apiece; here they are packed into one pinned staging buffer and sent with a single
non-blocking copy, and the device tensors are views into the device-side buffer.

The step loop runs ahead of the device (asynchronous scheduling): when the host packs step
``k + 1``, the copy of step ``k`` may not have run yet. Buffers therefore rotate, and a buffer is
refilled only once the event recorded after its last copy has completed (which, with a few
buffers, it almost always has).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

_ALIGN = 64  # bytes: every view starts aligned, so Triton's pointer-alignment specialisation holds
_NUM_BUFFERS = 3


@dataclass
class _Buffer:
    host: torch.Tensor  # pinned uint8
    device: torch.Tensor  # uint8
    done: torch.cuda.Event  # recorded after the buffer's last copy


_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
                 np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}


class InputStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Opt-in (OCTAVO_INPUT_STAGING=1) until it has passed the CUDA test suite: one CUDA run of
        # tests/test_async_scheduling.py failed with it on. Off: one pinned tensor and copy per array.
        self.enabled = os.environ.get("OCTAVO_INPUT_STAGING") == "1"
        self._buffers: list[Optional[_Buffer]] = [None] * _NUM_BUFFERS
        self._next = 0

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Device tensors with the arrays' dtypes and shapes (on the CPU: the arrays themselves)."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(array)) for array in arrays]
        if not self.enabled:
            return [torch.from_numpy(np.ascontiguousarray(array)).pin_memory().to(self.device, non_blocking=True)
                    for array in arrays]
        offsets, total = [], 0
        for array in arrays:
            offsets.append(total)
            total += -(-array.nbytes // _ALIGN) * _ALIGN
        buffer = self._take(max(total, _ALIGN))
        host = buffer.host.numpy()
        for array, offset in zip(arrays, offsets):
            host[offset:offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        buffer.device[:total].copy_(buffer.host[:total], non_blocking=True)
        buffer.done.record(torch.cuda.current_stream(self.device))  # the copy's stream, whatever device is current
        return [buffer.device[offset:offset + array.nbytes].view(_TORCH_DTYPES[array.dtype]).view(array.shape)
                for array, offset in zip(arrays, offsets)]

    def _take(self, nbytes: int) -> _Buffer:
        index, self._next = self._next, (self._next + 1) % _NUM_BUFFERS
        buffer = self._buffers[index]
        if buffer is not None:
            buffer.done.synchronize()  # its last copy has left the host buffer
            if buffer.host.numel() >= nbytes:
                return buffer
        capacity = max(nbytes, 2 * (buffer.host.numel() if buffer is not None else 1 << 16))
        buffer = _Buffer(torch.empty(capacity, dtype=torch.uint8, pin_memory=True),
                         torch.empty(capacity, dtype=torch.uint8, device=self.device), torch.cuda.Event())
        self._buffers[index] = buffer
        return buffer
