"""Device residency of the per-avatar inputs, and the count of every host<->device copy.

The KV cache needs no mirror: a GPU backend makes the scheduler's cache itself
(`Backend.new_cache`, device_cache.py), so K/V live on the device and each chunk's slots are
written there in place. What is left here are the per-avatar inputs (the photo, the appearance
features): the scheduler passes the same numpy arrays on every decoder call, and they are uploaded
only when their content changes (another avatar, another session sharing the backend).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class TransferLog:
    """Host<->device copies made by a backend (one entry per copy call, whatever its size)."""

    h2d: int = 0
    d2h: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0

    def to_host(self, nbytes: int) -> None:
        self.d2h += 1
        self.d2h_bytes += int(nbytes)

    def to_device(self, nbytes: int) -> None:
        self.h2d += 1
        self.h2d_bytes += int(nbytes)

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        return {k: v - before[k] for k, v in self.snapshot().items()}


class WholeMirror:
    """A torch device copy of one host array, re-uploaded only when the array's content changes.

    Content, not identity: a caller may refill the same array for another avatar. The host copy
    it compares with is one avatar's photo or features, small next to a frame's work."""

    def __init__(self, shape: tuple[int, ...], device, log: TransferLog):
        import torch

        self.log = log
        self.dev = torch.zeros(shape, dtype=torch.float32, device=device)
        self.held: np.ndarray | None = None  # what self.dev holds
        self.uploads = 0

    def sync(self, host: np.ndarray) -> bool:
        """Make the device copy equal `host` (on the stream the consumer waits on)."""
        import torch

        if self.held is not None and np.array_equal(self.held, host):
            return False
        self.dev.copy_(torch.from_numpy(np.ascontiguousarray(host, dtype=np.float32)))
        self.log.to_device(host.nbytes)
        self.held = np.array(host, dtype=np.float32, copy=True)
        self.uploads += 1
        return True
