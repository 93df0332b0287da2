"""Audio/video offsets of the real training clips, found by the mouth readout, and the pairs
re-aligned before the readout is fitted (`fit_readout --av-sync`).

Web video carries its own A/V offset: an AAC encoder's priming delay, a wav kept beside the mp4
and cut separately, a re-timed upload. A fit pairs the voice at frame t with the mouth at frame t,
so a clip whose mouth runs 4 frames (160 ms) ahead of its voice teaches a blurred map. The
readout's own predictions find each clip's offset: fitted with the clip's whole identity left
out (identity-grouped folds, as `--score`'s cross-validation), its mouth against the clip's
fitted mouth peaks at the offset (`metrics.av_offset`). On the shipped features the held-out
clips peak at -2..+2 frames and the training clips at -2..+5 (styletalk_Obama_clip3 +4,
edtalk_uncrop_Obama +5: 0.06 and 0.07 at lag 0, 0.50 and 0.57 at their peaks).

The zero is the GRID clips' own offset (their median): GRID is a lab corpus recorded in sync, so
every other clip is moved to GRID's relation between voice and mouth, and the GRID clips stay as
they are. Without GRID clips each clip goes to its own peak. Held-out clips are never read.
"""

from __future__ import annotations

import numpy as np

from ..models.motion import INDEX, MOUTH
from . import metrics
from .fit_readout import fold_fits
from .motion_proxy import mouth

MAX_OFFSET = 8  # frames either way: 320 ms, past any offset seen here (+5)
ANCHOR_PREFIX = "grid_"  # the GRID corpus (catalog ids grid_*): recorded in sync


def predicted_mouth(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, motion: np.ndarray):
    """The labels' mouth signal with their mouth parameters replaced by the readout's (clamped to
    [0, 1] as the scheduler does): what `fit_readout.label_score` compares."""
    shown = np.array(motion, np.float64)
    shown[:, [INDEX[n] for n in MOUTH]] = np.clip(x @ weight.T + bias, 0.0, 1.0)
    return mouth(shown)


def clip_offsets(fit, x_sets: list, y_sets: list, folds: list[list[int]]) -> list[int]:
    """Per clip of x_sets[0] (the real training clips): the lag at which the readout's mouth best
    follows the clip's fitted mouth, the readout refitted without the clip's fold (its identity).
    fit(x_sets, y_sets) -> (weight, bias). Positive: the voice comes late (the mouth leads)."""
    xs, ys = x_sets[0], y_sets[0]
    lags = [0] * len(xs)
    for fold, (w, b) in fold_fits(fit, x_sets, y_sets, folds):
        for j in fold:
            g = predicted_mouth(w, b, xs[j], ys[j])
            lags[j] = metrics.av_offset(g, mouth(ys[j]), MAX_OFFSET)[0]
    return lags


def anchored(ids: list[str], lags: list[int], prefix: str = ANCHOR_PREFIX) -> list[int]:
    """The lags relative to the anchor clips' median (0 when there are none)."""
    anchor = [lag for i, lag in zip(ids, lags, strict=True) if i.startswith(prefix)]
    zero = int(round(float(np.median(anchor)))) if anchor else 0
    return [lag - zero for lag in lags]


def shift(x: np.ndarray, y: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair the input at frame t + lag with the label at frame t (the overlap only)."""
    n = min(len(x), len(y))
    if lag >= 0:
        return x[lag:n], y[: n - lag]
    return x[: n + lag], y[-lag:n]
