"""Judder ratio: how much more a frame changes when it starts a streaming chunk.

A streamed avatar is generated chunk by chunk; if each chunk is conditioned poorly on the one
before, the first frame of every chunk jumps and the head and mouth step at the chunk rate. Real
video has no chunks, so its ratio is ~1.0 (DESIGN.md, "Judder ratio").
"""

from __future__ import annotations

import numpy as np


def frame_diffs(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each consecutive pair: d[i] = |f[i+1] - f[i]|, shape [T-1].

    Works on pixels [T,H,W,C] as well as on motion parameters [T,D] (any trailing shape).
    """
    x = np.asarray(frames)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 frames, got shape {x.shape}")
    x = x.astype(np.float32, copy=False).reshape(x.shape[0], -1)
    return np.abs(np.diff(x, axis=0)).mean(axis=1)


def judder_ratio(frames: np.ndarray, chunk: int) -> float:
    """Mean change into chunk-start frames over the mean change into the other frames.

    `frames` is [T,H,W,3] (uint8 or float) or [T,D] motion. The pair (i-1, i) is a boundary pair
    when frame i starts a chunk: i % chunk == 0 and i > 0. 1.0 means no judder; 2.0 means a frame
    that starts a chunk changes twice as much as the frames inside a chunk.

    chunk == 1 returns 1.0: every frame starts a chunk, so there are no inside pairs to compare
    with and no step can stand out from the rest (any stepping is then at the frame rate itself).
    A still video (no change inside chunks) returns 1.0 if the boundaries are still too, else inf.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    d = frame_diffs(frames)
    if chunk == 1:
        return 1.0
    later = np.arange(1, d.shape[0] + 1)  # index of the later frame of each pair
    start = later % chunk == 0
    if not start.any():
        raise ValueError(f"{d.shape[0] + 1} frames hold no chunk boundary at chunk={chunk}")
    at_start, inside = float(d[start].mean()), float(d[~start].mean())
    if inside == 0.0:
        return 1.0 if at_start == 0.0 else float("inf")
    return at_start / inside
