"""The static KV cache: fixed buffers, a never-evicted sink, a rolling window and RAPR positions.

Layout of the S = C + W slots: slots [0, C) hold the first chunk (the sink, written once); slots
[C, C + W) are a ring for every later frame. The reference token is a generator input, so it is
pinned by construction. Buffers never change shape; empty slots are masked by `valid`.

RAPR: raw position of frame f is f + 1 (the reference is 0). When a chunk would reach past D, the
chunk and the window are shifted down together so relative offsets inside them hold and the newest
frame sits at D; sink slots keep their raw positions. No position ever exceeds D.

The backend that runs the generator owns the cache's storage (`Backend.new_cache`): this class
keeps K/V in numpy, which every CPU backend takes as input; the GPU backends subclass it to keep
K/V in device buffers and write each chunk's slots there in place (runtime_cuda/device_cache.py).
The slot bookkeeping and RAPR positions are the same for all, and live only here.
"""

from __future__ import annotations

import numpy as np

from ..models.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig):
        g = cfg.generator
        self.chunk = cfg.chunk
        self.window = g.window
        self.max_pos = cfg.max_position
        self.shape = (g.layers, 1, g.heads, cfg.cache_slots, cfg.head_dim)
        self.k, self.v = self._allocate(self.shape)  # zeroed
        self.dirty = False  # K/V written since the last clear
        self.valid = np.zeros((1, cfg.cache_slots), dtype=np.float32)
        self.slot_frame = np.full(cfg.cache_slots, -1, dtype=np.int64)  # frame held by each slot

    # ---- storage (what a device cache overrides) ----------------------------------------------
    def _allocate(self, shape: tuple[int, ...]):
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)

    def _clear(self) -> None:
        self.k[:] = 0.0
        self.v[:] = 0.0

    def _store(self, slots: np.ndarray, new_k, new_v) -> None:
        """Write the chunk's K/V ([layers, 1, heads, C, hd]) into `slots` (one per frame)."""
        self.k[:, :, :, slots] = new_k
        self.v[:, :, :, slots] = new_v

    # ---- bookkeeping (shared) ------------------------------------------------------------------
    def reset(self) -> None:
        if self.dirty:  # on a GPU a clear is a device write; a fresh cache needs none
            self._clear()
            self.dirty = False
        self.valid[:] = 0.0
        self.slot_frame[:] = -1

    def slot_for(self, frame: int) -> int:
        if frame < self.chunk:
            return frame
        return self.chunk + (frame - self.chunk) % self.window

    def shift(self, chunk_start: int) -> int:
        return max(0, chunk_start + self.chunk - self.max_pos)

    def positions(self, chunk_start: int) -> tuple[np.ndarray, np.ndarray]:
        """(cache_pos [1, S], query_pos [1, C]) as float32 for the chunk starting at chunk_start."""
        s = self.shift(chunk_start)
        raw = (self.slot_frame + 1).astype(np.float32)
        is_sink = np.arange(raw.shape[0]) < self.chunk
        pos = np.where(is_sink, raw, raw - s)
        pos = np.where(self.slot_frame >= 0, pos, 0.0).astype(np.float32)
        q = (np.arange(chunk_start, chunk_start + self.chunk) + 1 - s).astype(np.float32)
        return pos[None], q[None]

    def write(self, new_k, new_v, chunk_start: int) -> None:
        """Store the chunk's K/V ([layers, 1, heads, C, hd]) into its slots, in place."""
        frames = np.arange(chunk_start, chunk_start + self.chunk)
        slots = np.array([self.slot_for(int(f)) for f in frames], dtype=np.int64)
        self._store(slots, new_k, new_v)
        self.dirty = True
        self.valid[0, slots] = 1.0
        self.slot_frame[slots] = frames

    def nbytes(self) -> int:
        kv = 2 * int(np.prod(self.shape)) * 4
        return kv + self.valid.nbytes + self.slot_frame.nbytes
