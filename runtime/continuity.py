"""Continuity of the shown motion across chunk boundaries: the fix for the chunk-rate judder.

The generator samples each chunk from fresh noise with one frame of previous motion as context,
and it was trained on a jittered context (up to 0.3 of a parameter's std, several times what a
head moves in one frame), so it treats that context as approximate: the first frame of a chunk
lands off the trajectory. Head pose, blinks and brows then step at the chunk rate (the shipped
weights on real clips: 2-5x the in-chunk change on the head, 1.7-4x in pixels). Noise that
continues across chunks (AR(1), rho 0.9 or 0.99) and 10 or 30 flow steps instead of 3 leave the
head's ratio at 2.3-6.9 (chunk 2-8): the step is the model's, not the sampler's.

The fix lives here, in the scheduler every backend shares, not in any graph: each chunk's motion
is offset so that its first frame continues the previous shown frame's velocity (times a gain,
velocity_gain(C)), and the offset fades linearly across the chunk, (C - k) / (C + 1) at frame k.
The step is spread evenly over the chunk's C + 1 frame changes; what is left at the chunk's end
(1 / (C + 1) of it) folds into the next chunk's offset, so the shown motion never drifts from the
generator's. It only looks back, so it adds no latency; it is plain float32 arithmetic, so a seed
still gives the same frames on every run. The generator keeps its own raw motion as context (its
`prev_motion` and KV cache), exactly the block-causal model it was trained as.

jaw_open and lip_press are left as generated: they carry the lip sync (mouth opening and p/b/m
closures must land on their frame) and step little at chunk starts.
"""

from __future__ import annotations

import numpy as np

from ..models.motion import MOTION_PARAMS

# The velocity's gain per chunk size. Too high overshoots at turning points (the chunk's first
# frame changes more than the others: ratio > 1); too low stalls there (ratio < 1). One gain for
# all sizes (0.8) left real clips at 0.83 (chunk 8) to 1.02 (chunk 4) on average, and one held-out
# clip at 1.16 at chunk 4. Each gain below is the one whose mean pixel judder ratio came closest
# to 1.0 on 10 clips of the real *training* split (every third; the held-out clips only judge it;
# `python -m edgetalk.training.fit_blend --real DIR` re-fits it, as it must be when the generator
# changes, or the readout that moves the shown mouth). Means found with the A/V-aligned readout:
# chunk 2: 0.95 at 0.8, 0.99 at 0.9, 1.02 at 1.0; 3: 0.92 at 0.7, 0.97 at 0.8, 1.01 at 0.9;
# 4: 0.94 at 0.6, 0.99 at 0.7, 1.03 at 0.8; 6: 0.92 at 0.8, 0.98 at 0.9, 1.04 at 1.0; 8: 0.93 at
# 1.0, 0.97 at 1.1, 1.01 at 1.2. (The readout before it: 2: 1.0, 3: 0.8.) Chunk 8 keeps 1.1: the
# fit is nearly flat there (0.97 against 1.01), and 1.2 overshoots the embedded example's
# motion (judder 1.16 in tests/test_judder.py, 1.1 passes).
# Chunk 1 has no inside frames to compare with; it keeps 0.8. Sizes between are interpolated,
# larger ones take chunk 8's.
VELOCITY_GAINS = {1: 0.8, 2: 0.9, 3: 0.9, 4: 0.7, 6: 0.9, 8: 1.1}


def velocity_gain(chunk: int) -> float:
    sizes = sorted(VELOCITY_GAINS)
    return float(np.interp(chunk, sizes, [VELOCITY_GAINS[c] for c in sizes]))


KEEP_AS_GENERATED = ("jaw_open", "lip_press")


class BoundaryBlend:
    """Per stream: raw chunk motion [C, P] in, shown motion [C, P] out (causal, stateful)."""

    def __init__(
        self, chunk: int, params: tuple[str, ...] = MOTION_PARAMS, gain: float | None = None
    ):
        self.mask = np.array(
            [0.0 if name in KEEP_AS_GENERATED else 1.0 for name in params], dtype=np.float32
        )
        k = np.arange(chunk, dtype=np.float32)
        self.weights = ((chunk - k) / (chunk + 1))[:, None].astype(np.float32)
        # gain: the velocity's (training/fit_blend.py tries others); None takes the fitted one
        self.gain = np.float32(velocity_gain(chunk) if gain is None else gain)
        self.reset()

    def reset(self) -> None:
        self.last: np.ndarray | None = None  # the last two shown frames
        self.before_last: np.ndarray | None = None

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.float32)
        if self.last is None:
            shown = raw.copy()
        else:
            vel = self.last - self.before_last if self.before_last is not None else 0.0
            expected = self.last + self.gain * vel
            shown = raw + self.weights[: raw.shape[0]] * ((expected - raw[0]) * self.mask)
        self.before_last = shown[-2].copy() if shown.shape[0] >= 2 else self.last
        self.last = shown[-1].copy()
        return shown.astype(np.float32, copy=False)
