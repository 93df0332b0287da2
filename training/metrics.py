"""Measurements from pixels: what `edgetalk eval` reports, usable on any talking-head video.

Mouth opening and head position come from mediapipe's face mesh run on the frames themselves
(inner lips 13/14, face height 10->152), so a model cannot score well by predicting the right
numbers while rendering the wrong picture. Identity uses dlib's face-embedding network.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeTalkError


@dataclass
class FaceTrack:
    opening: np.ndarray  # [T] inner-lip gap / face height (NaN where no face was found)
    center: np.ndarray  # [T, 2] face centre in pixels
    height: np.ndarray  # [T] face height (10 -> 152) in pixels
    landmarks: np.ndarray  # [T, 478, 2] pixels (NaN where no face)

    @property
    def found(self) -> float:
        return float(np.mean(np.isfinite(self.opening))) if self.opening.size else 0.0


class FaceMeasurer:
    """mediapipe face mesh, one instance per video (it tracks between frames)."""

    def __init__(self, video_mode: bool = True):
        try:
            import mediapipe as mp
        except ImportError:
            raise EdgeTalkError(
                "eval needs mediapipe 0.10.21: pip install --no-deps mediapipe==0.10.21 absl-py "
                "attrs flatbuffers 'protobuf>=6.31.1,<7'"
            ) from None
        self.mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not video_mode,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=0.3,
            min_tracking_confidence=0.3,
        )

    def track(self, frames) -> FaceTrack:
        frames = list(frames)
        n = len(frames)
        lms = np.full((n, 478, 2), np.nan, np.float32)
        for i, f in enumerate(frames):
            res = self.mesh.process(np.ascontiguousarray(f))
            if res.multi_face_landmarks:
                h, w = f.shape[:2]
                pts = res.multi_face_landmarks[0].landmark
                lms[i] = [(p.x * w, p.y * h) for p in pts]
        gap = np.linalg.norm(lms[:, 14] - lms[:, 13], axis=1)
        height = np.linalg.norm(lms[:, 152] - lms[:, 10], axis=1)
        center = np.nanmean(lms, axis=1) if n else np.zeros((0, 2))
        return FaceTrack(gap / height, center, height, lms)

    def close(self):
        self.mesh.close()


def _finite_pair(a: np.ndarray, b: np.ndarray):
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _finite_pair(np.asarray(a, float), np.asarray(b, float))
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def av_offset(measured: np.ndarray, reference: np.ndarray, max_lag: int = 5) -> tuple[int, float]:
    """(lag in frames at the cross-correlation peak, peak correlation). Positive: video late."""
    best = (0, -math.inf)
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            c = pearson(measured[lag:], reference[: len(reference) - lag])
        else:
            c = pearson(measured[:lag], reference[-lag:])
        if np.isfinite(c) and c > best[1]:
            best = (lag, c)
    return best


def bilabial_counts(
    opening: np.ndarray, bilabial: np.ndarray, closed_below: float
) -> tuple[int, int]:
    """(closed, measured) bilabial closures: runs of p/b/m frames, closed when the smallest
    opening in the run is below closed_below; runs with no face found are not measured."""
    runs, start = [], None
    for i, b in enumerate(list(bilabial) + [False]):
        if b and start is None:
            start = i
        elif not b and start is not None:
            runs.append((start, i))
            start = None
    closed = [
        np.nanmin(opening[s:e]) < closed_below for s, e in runs if np.isfinite(opening[s:e]).any()
    ]
    return int(sum(closed)), len(closed)


def bilabial_closure(opening: np.ndarray, bilabial: np.ndarray, closed_below: float) -> float:
    """Share of bilabial closures (runs of p/b/m frames) whose smallest opening is closed."""
    closed, measured = bilabial_counts(opening, bilabial, closed_below)
    return closed / measured if measured else float("nan")


BLOCK = 1 << 22  # values per step of the whole-video metrics: float copies of a whole clip
# (240 frames of 256x256x3 in float64 is 377 MB, several of them at once) took 5 s a call


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, 8-bit levels) of two videos or frames of one shape, uint8 or float."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr of {a.shape} against {b.shape}")
    a2, b2 = a.reshape(-1), b.reshape(-1)
    total = 0.0  # 8-bit levels: every partial sum is an integer under 2**53, so exact
    for s in range(0, a2.shape[0], BLOCK):
        d = a2[s : s + BLOCK].astype(np.float64) - b2[s : s + BLOCK]
        total += float(np.dot(d, d))
    mse = total / max(1, a2.shape[0])
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(
        np.mean(
            [
                structural_similarity(x, y, channel_axis=2, data_range=255)
                for x, y in zip(a, b, strict=True)
            ]
        )
    )


def drift(track: FaceTrack, fps: float) -> dict:
    """Head position and scale over time: total linear change and Spearman trend (monotonicity)."""
    t = np.arange(len(track.height)) / fps
    ok = np.isfinite(track.height)
    if ok.sum() < 3:
        return {"frames_with_face": int(ok.sum())}
    h0 = float(np.nanmedian(track.height[ok][: max(3, ok.sum() // 10)]))
    out = {}
    for name, series in (
        ("x", track.center[:, 0]),
        ("y", track.center[:, 1]),
        ("scale", track.height),
    ):
        s = series[ok] / h0  # in face heights (scale: relative size)
        slope = np.polyfit(t[ok], s, 1)[0]
        out[f"{name}_drift_per_min"] = float(slope * 60)
        out[f"{name}_total_drift"] = float(slope * (t[ok][-1] - t[ok][0]))
        out[f"{name}_spearman"] = spearman(t[ok], s)
    out["minutes"] = float((t[ok][-1] - t[ok][0]) / 60)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return pearson(ra.astype(float), rb.astype(float))


def landmark_motion(track: FaceTrack, mask: np.ndarray) -> float:
    """Variance of face landmarks (in face heights) over the masked frames: how alive a face is."""
    lm = track.landmarks[mask.astype(bool)]
    ok = np.isfinite(lm).all(axis=(1, 2))
    lm = lm[ok]
    if len(lm) < 3:
        return float("nan")
    h = np.nanmedian(track.height)
    return float(np.mean(np.var(lm / h, axis=0)))


class IdentityEmbedder:
    """dlib's 128-d face embedding (face-recognition-models), found by path, no pkg_resources."""

    def __init__(self):
        try:
            import dlib
        except ImportError:
            raise EdgeTalkError(
                "identity scores need dlib: pip install dlib-bin face-recognition-models"
            ) from None
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or spec.origin is None:
            raise EdgeTalkError("identity scores need face-recognition-models (pip install it)")
        root = Path(spec.origin).parent / "models"
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(str(root / "shape_predictor_5_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(
            str(root / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        img = np.ascontiguousarray(rgb)
        faces = self.detector(img, 1)
        if not faces:
            return None
        box = max(faces, key=lambda r: r.width() * r.height())
        return np.asarray(self.net.compute_face_descriptor(img, self.shape(img, box)), np.float64)

    def similarity(self, reference: np.ndarray, frames) -> float:
        ref = self.embed(reference)
        if ref is None:
            return float("nan")
        sims = []
        for f in frames:
            e = self.embed(f)
            if e is not None:
                sims.append(float(ref @ e / (np.linalg.norm(ref) * np.linalg.norm(e))))
        return float(np.mean(sims)) if sims else float("nan")


# ---------------------------------------------------------------- scores on real people


def mouth_signal(opening: np.ndarray) -> np.ndarray:
    """Mouth opening made comparable across faces: gaps (no face) filled by interpolation,
    lightly smoothed ([1, 2, 1] / 4, tracker jitter), z-scored. All-NaN or flat gives zeros."""
    x = np.asarray(opening, np.float64).copy()
    ok = np.isfinite(x)
    if ok.sum() < 2:
        return np.zeros_like(x)
    idx = np.arange(len(x))
    x[~ok] = np.interp(idx[~ok], idx[ok], x[ok])
    x = np.convolve(np.pad(x, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def lagged_corr(generated: np.ndarray, real: np.ndarray, max_lag: int = 5) -> tuple[int, float]:
    """(lag, best Pearson correlation) within +-max_lag frames. Positive lag: generated late."""
    return av_offset(np.asarray(generated), np.asarray(real), max_lag)


def chance_corr(
    generated: np.ndarray, real: np.ndarray, min_shift: int, max_lag: int = 5
) -> np.ndarray:
    """The lagged correlation against the real signal shifted circularly by every shift of at
    least min_shift frames (both ways): what an unrelated mouth of the same person scores."""
    n = len(real)
    shifts = range(min_shift, n - min_shift + 1)
    return np.array([lagged_corr(generated, np.roll(real, s), max_lag)[1] for s in shifts])


def range_ratio(generated: np.ndarray, real: np.ndarray) -> float:
    """(p90 - p10) of the generated mouth opening over the real one's (raw openings)."""
    g, r = (np.asarray(x, np.float64) for x in (generated, real))
    g, r = g[np.isfinite(g)], r[np.isfinite(r)]
    if g.size < 3 or r.size < 3:
        return float("nan")
    span = float(np.subtract(*np.percentile(r, [90, 10])))
    return float(np.subtract(*np.percentile(g, [90, 10]))) / span if span > 0 else float("nan")


def loudness_db(pcm: np.ndarray, frames: int, samples_per_frame: int = 640) -> np.ndarray:
    """Per-frame loudness (RMS in dB, floored at -80 dB)."""
    x = np.asarray(pcm[: frames * samples_per_frame], np.float64)
    x = np.pad(x, (0, frames * samples_per_frame - len(x)))
    rms = np.sqrt(np.mean(x.reshape(frames, -1) ** 2, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-4))
