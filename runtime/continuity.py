"""Continuity of the shown motion across chunk boundaries: the fix for the chunk-rate judder.

The generator samples each chunk from fresh noise with one frame of previous motion as context,
and it was trained on a jittered context (up to 0.3 of a parameter's std, several times what a
head moves in one frame), so it treats that context as approximate: the first frame of a chunk
lands off the trajectory. Head pose, blinks and brows then step at the chunk rate (the shipped
weights on real clips: 2-5x the in-chunk change on the head, 1.7-4x in pixels). Noise that
continues across chunks (AR(1), rho 0.9 or 0.99) and 10 or 30 flow steps instead of 3 leave the
head's ratio at 2.3-6.9 (chunk 2-8): the step is the model's, not the sampler's.

The fix lives here, in the scheduler every backend shares, not in any graph: each chunk's motion
is offset so that its first frame continues the previous shown frame's velocity (damped by
VELOCITY_GAIN), and the offset fades linearly across the chunk, (C - k) / (C + 1) at frame k.
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

VELOCITY_GAIN = 0.8  # 1.0 overshoots at turning points (judder ratio 1.1-1.3); 0.6 under-moves
KEEP_AS_GENERATED = ("jaw_open", "lip_press")


class BoundaryBlend:
    """Per stream: raw chunk motion [C, P] in, shown motion [C, P] out (causal, stateful)."""

    def __init__(self, chunk: int, params: tuple[str, ...] = MOTION_PARAMS):
        self.mask = np.array(
            [0.0 if name in KEEP_AS_GENERATED else 1.0 for name in params], dtype=np.float32
        )
        k = np.arange(chunk, dtype=np.float32)
        self.weights = ((chunk - k) / (chunk + 1))[:, None].astype(np.float32)
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
            expected = self.last + np.float32(VELOCITY_GAIN) * vel
            shown = raw + self.weights[: raw.shape[0]] * ((expected - raw[0]) * self.mask)
        self.before_last = shown[-2].copy() if shown.shape[0] >= 2 else self.last
        self.last = shown[-1].copy()
        return shown.astype(np.float32, copy=False)
