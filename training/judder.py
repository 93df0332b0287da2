"""Judder ratio: how much more a frame changes when it starts a streaming chunk.

A streamed avatar is generated chunk by chunk; if each chunk is conditioned poorly on the one
before, the first frame of every chunk jumps and the head and mouth step at the chunk rate. Real
video has no chunks, so its ratio is ~1.0 (DESIGN.md, "Judder ratio").
"""

from __future__ import annotations

import numpy as np

from .metrics import BLOCK  # values per step


def frame_diffs(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each consecutive pair: d[i] = |f[i+1] - f[i]|, shape [T-1].

    Works on pixels [T,H,W,C] as well as on motion parameters [T,D] (any trailing shape).
    """
    x = np.asarray(frames)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 frames, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    t, n = x.shape
    # A few frames at a time: a float copy of a whole clip (and its diff, and its abs) took 6 s
    # and gigabytes for each of the eval's eight videos. 8-bit frames subtract exactly in int16.
    wide = np.int16 if x.dtype == np.uint8 else np.float32
    step = max(1, BLOCK // n)
    out = np.empty(t - 1, np.float64)
    for s in range(0, t - 1, step):
        block = x[s : min(t, s + step + 1)].astype(wide)
        out[s : s + block.shape[0] - 1] = np.abs(np.diff(block, axis=0)).mean(axis=1)
    return out


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
