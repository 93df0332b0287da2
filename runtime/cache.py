"""The static KV cache: fixed buffers, a never-evicted sink, a rolling window and RAPR positions.

Layout of the S = C + W slots: slots [0, C) hold the first chunk (the sink, written once); slots
[C, C + W) are a ring for every later frame. The reference token is a generator input, so it is
pinned by construction. Buffers never change shape; empty slots are masked by `valid`.

RAPR: raw position of frame f is f + 1 (the reference is 0). When a chunk would reach past D, the
chunk and the window are shifted down together so relative offsets inside them hold and the newest
frame sits at D; sink slots keep their raw positions. No position ever exceeds D.
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
        shape = (g.layers, 1, g.heads, cfg.cache_slots, cfg.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.valid = np.zeros((1, cfg.cache_slots), dtype=np.float32)
        self.slot_frame = np.full(cfg.cache_slots, -1, dtype=np.int64)  # frame held by each slot

    def reset(self) -> None:
        self.k[:] = 0.0
        self.v[:] = 0.0
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

    def write(self, new_k: np.ndarray, new_v: np.ndarray, chunk_start: int) -> None:
        """Store the chunk's K/V ([layers, 1, heads, C, hd]) into its slots, in place."""
        for i in range(self.chunk):
            frame = chunk_start + i
            slot = self.slot_for(frame)
            self.k[:, :, :, slot] = new_k[:, :, :, i]
            self.v[:, :, :, slot] = new_v[:, :, :, i]
            self.valid[0, slot] = 1.0
            self.slot_frame[slot] = frame

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.valid.nbytes + self.slot_frame.nbytes
