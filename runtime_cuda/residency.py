"""Device residency of inputs that change little between calls: the KV cache, per-avatar tensors.

The scheduler owns the KV cache as numpy and hands the whole cache to every generator call; after
each call it writes the chunk's new K/V (C slots) into ring slots. A GPU backend keeps a device
copy of the cache (the mirror) and, next to it on the host, a shadow: exactly what the mirror
holds. Each call compares the scheduler's cache with the shadow, slot by slot, and copies only the
slots that differ to the device. In a stream that is the C slots written since the last call; after
a reset or a switch to another stream it is whatever differs, so the mirror is always exact.

Why compare contents rather than infer the slots from `cache_valid`/`cache_pos` or a version
counter: positions are re-based every chunk by RAPR (they are not slot identities), a counter
would need the scheduler to change, and a comparison is correct whatever the caller did (reset,
interrupt, two streams sharing one backend). It costs one pass over the cache in host memory,
and no device traffic.

Per-avatar inputs (the photo, appearance features) use the same mirror with one slot: uploaded
when they change, not every chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


def changed_slots(shadow: np.ndarray, new: np.ndarray, axis: int) -> np.ndarray:
    """Indices along `axis` where `new` differs from `shadow` anywhere (NaN counts as changed)."""
    if shadow.shape != new.shape:
        raise ValueError(f"cache shape {new.shape} is not the mirror's {shadow.shape}")
    other = tuple(i for i in range(new.ndim) if i != axis)
    return np.flatnonzero(np.any(shadow != new, axis=other))


def slot_runs(slots: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted slot indices -> (first index into `slots`, start slot, stop slot) of each contiguous
    run, so a run is one device copy (a chunk's C slots are one run, or two at the ring's wrap)."""
    runs: list[tuple[int, int, int]] = []
    j = 0
    while j < len(slots):
        k = j
        while k + 1 < len(slots) and slots[k + 1] == slots[k] + 1:
            k += 1
        runs.append((j, int(slots[j]), int(slots[k]) + 1))
        j = k + 1
    return runs


def take_slots(a: np.ndarray, slots: np.ndarray, axis: int) -> np.ndarray:
    """The rows of `a` at `slots`, slot axis first ([n, ...rest]): contiguous for one copy."""
    return np.moveaxis(np.take(a, slots, axis=axis), axis, 0)


def put_slots(a: np.ndarray, slots: np.ndarray, rows: np.ndarray, axis: int) -> None:
    """Inverse of take_slots: a[..., slots, ...] = rows (slot-first)."""
    index = [slice(None)] * a.ndim
    index[axis] = slots
    a[tuple(index)] = np.moveaxis(rows, 0, axis)


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


class SlotMirror:
    """A torch device copy of one host array, updated slot by slot along `axis`.

    Uploads go through a pinned, slot-major staging buffer: the changed rows are gathered on the
    host, sent in ONE copy, and placed with one device copy per contiguous run of slots.
    """

    def __init__(self, shape: tuple[int, ...], axis: int, device, log: TransferLog, pin: bool):
        import torch

        self.axis = axis
        self.log = log
        self.dev = torch.zeros(shape, dtype=torch.float32, device=device)
        self.shadow = np.zeros(shape, dtype=np.float32)  # what self.dev holds
        rest = tuple(s for i, s in enumerate(shape) if i != axis)
        stage = (shape[axis], *rest)
        self.stage_host = torch.zeros(stage, dtype=torch.float32, pin_memory=pin)
        self.stage_np = self.stage_host.numpy()
        self.stage_dev = torch.zeros(stage, dtype=torch.float32, device=device)
        self.non_blocking = pin
        self.uploaded_slots = 0  # total, for tests and reports

    def sync(self, host: np.ndarray) -> int:
        """Make the device copy equal `host`; returns the number of slots copied. Call it on the
        stream that the consumer waits on (the copy stream)."""
        slots = changed_slots(self.shadow, host, self.axis)
        n = len(slots)
        if n == 0:
            return 0
        rows = take_slots(host, slots, self.axis)
        self.stage_np[:n] = rows
        self.stage_dev[:n].copy_(self.stage_host[:n], non_blocking=self.non_blocking)
        self.log.to_device(rows.nbytes)
        for j, start, stop in slot_runs(slots):
            part = self.stage_dev[j : j + stop - start].movedim(0, self.axis)
            self.dev.narrow(self.axis, start, stop - start).copy_(part)
        put_slots(self.shadow, slots, rows, self.axis)
        self.uploaded_slots += n
        return n
