"""Motion labels from real video: the 16 explicit parameters per frame, fitted to the face mesh.

The synthetic renderer (`render.deform`) says where every mediapipe landmark goes for a motion
vector, relative to a reference face. Fitting inverts it: with one frame of the clip as the
reference (the first, as `edgetalk run` uses a photo, or for training labels the most closed
mouth), each frame's motion is the vector whose deformed
reference landmarks best match that frame's landmarks (least squares, bounded to the ranges the
decoder knows, warm-started from the previous frame). Labels are cached as .npz (no pickle).

    python -m edgetalk.training.fit_motion --real ../shared/data/real --out runs/real_labels
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..models.motion import HEAD, INDEX, MOTION_DIM
from . import render

RESOLUTION = 256
# Landmark weights: the mouth decides the labels that matter most; eyes and brows next.
_W = np.ones(render.N_MESH, np.float32)
_W[list({*render.UO, *render.LO})] = 3.0
_W[list({*render.UI, *render.LI})] = 5.0
for _eye in render.EYE.values():
    _W[_eye["up0"] + _eye["lo0"]] = 3.0
    _W[_eye["brow"]] = 2.0
LO = np.zeros(MOTION_DIM)
HI = np.ones(MOTION_DIM)
for _k, _r in (("head_yaw", 0.7), ("head_pitch", 0.7), ("head_roll", 0.7)):
    LO[INDEX[_k]], HI[INDEX[_k]] = -_r, _r
for _k, _r in (("head_scale", 0.5), ("head_tx", 0.4), ("head_ty", 0.4)):
    LO[INDEX[_k]], HI[INDEX[_k]] = -_r, _r
STEP = 0.02  # finite-difference step (parameter units)
# Prior per parameter (face heights per unit): breaks ties. mediapipe does not follow the
# renderer's lip shapes exactly, so on rendered frames with known motion a weak prior fitted
# spurious lip_spread/lip_round/teeth_show (no correlation with the truth); these get a strong
# one, the jaw a weak one, head pose almost none.
PRIOR = np.full(MOTION_DIM, 0.06)
PRIOR[[INDEX[k] for k in ("lip_spread", "lip_round", "teeth_show", "smile")]] = 0.3
PRIOR[INDEX["jaw_open"]] = 0.03
PRIOR[[INDEX[k] for k in HEAD]] = 0.015
# mediapipe sees less of the renderer's jaw drop than the renderer makes (the chin lags): on
# rendered frames of 5 training faces with known motion, true jaw = 1.05 x fitted + 0.10
# (r 0.88). The labels are scaled by this gain so the decoder, rendering them, opens as wide.
JAW_GAIN = 1.2


def mesh_track(frames, video_mode: bool = True) -> np.ndarray:
    """[T, 478, 3] mediapipe landmarks in pixels (z scaled like x); NaN where no face."""
    import mediapipe as mp

    out = np.full((len(frames), 478, 3), np.nan, np.float32)
    with mp.solutions.face_mesh.FaceMesh(
        static_image_mode=not video_mode,
        max_num_faces=1,
        refine_landmarks=True,
        min_detection_confidence=0.3,
        min_tracking_confidence=0.3,
    ) as mesh:
        for i, f in enumerate(frames):
            res = mesh.process(np.ascontiguousarray(f))
            if res.multi_face_landmarks:
                h, w = f.shape[:2]
                out[i] = [(p.x * w, p.y * h, p.z * w) for p in res.multi_face_landmarks[0].landmark]
    return out


def fit_frame(
    ref: render.RefFace, observed: np.ndarray, x0: np.ndarray | None = None, iters: int = 3
) -> tuple[np.ndarray, float]:
    """(motion [16], rms landmark error in face heights) for one frame's [478, 2+] landmarks.

    Gauss-Newton with a finite-difference Jacobian and a bounded linear step (lsq_linear):
    deform is close to linear in every parameter, so a few steps from a warm start converge.
    scipy's least_squares on the same residual stalled at the bounds and took a second a frame.
    """
    from scipy.optimize import lsq_linear

    obs = np.asarray(observed, np.float64)[: render.N_MESH, :2]
    w = np.sqrt(_W)[:, None] / ref.height
    prior = PRIOR

    def residual(m):
        pts = render.deform(ref, m.astype(np.float32))[1][: render.N_MESH, :2]
        return np.concatenate([((pts - obs) * w).ravel(), prior * m])

    x = np.zeros(MOTION_DIM) if x0 is None else np.clip(np.asarray(x0, np.float64), LO, HI)
    r = residual(x)
    # One Jacobian per frame (the chord method): deform is near-linear, and the 16 extra
    # deforms are most of the cost. The bounded step is solved on J's 16x16 QR factor.
    jac = np.empty((len(r), MOTION_DIM))
    for k in range(MOTION_DIM):
        h = STEP if x[k] + STEP <= HI[k] else -STEP  # stay inside the bounds
        xk = x.copy()
        xk[k] += h
        jac[:, k] = (residual(xk) - r) / h
    q, rr = np.linalg.qr(jac)
    for _ in range(iters):
        step = lsq_linear(rr, -(q.T @ r), bounds=(LO - x, HI - x), method="bvls").x
        x_new = np.clip(x + step, LO, HI)
        r_new = residual(x_new)
        if r_new @ r_new >= r @ r:
            break
        x, r = x_new, r_new
    n = render.N_MESH * 2
    err = float(np.sqrt(np.mean((r[:n] / np.repeat(np.sqrt(_W), 2)) ** 2)))
    return x.astype(np.float32), err


def fit_landmarks(
    ref: render.RefFace, track: np.ndarray, log=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(motion [T, 16], valid [T], error [T]) for a landmark track; a frame without a face
    keeps the previous frame's motion and is marked invalid."""
    n = len(track)
    motion = np.zeros((n, MOTION_DIM), np.float32)
    valid = np.isfinite(track[:, :, :2]).all(axis=(1, 2))
    err = np.full(n, np.nan, np.float32)
    x = None
    t0 = time.time()
    for i in range(n):
        if valid[i]:
            x, err[i] = fit_frame(ref, track[i], x)
        motion[i] = x if x is not None else 0.0
        if log and i % 100 == 99:
            log(f"    {i + 1}/{n} frames, {time.time() - t0:.0f} s")
    motion[:, INDEX["jaw_open"]] = np.minimum(motion[:, INDEX["jaw_open"]] * JAW_GAIN, HI[0])
    return motion, valid, err


def crop_clip(frames: np.ndarray, size: int = RESOLUTION) -> tuple[np.ndarray, tuple]:
    """Every frame cut with the crop that the runtime makes of the first frame (a fixed box,
    as a photo is fixed), so the crops share the avatar's framing."""
    from ..runtime.avatar import crop_box, crop_resize, detect_face

    box = crop_box(frames[0].shape, detect_face(frames[0]))
    return np.stack([crop_resize(f, box, size) for f in frames]), box


def label_frames(crops: np.ndarray, log=None, reference: str = "first") -> dict:
    """Fit a clip's crops. Returns the arrays that are cached.

    reference "first": relative to the first crop (the avatar of `edgetalk eval --real`).
    "closed": relative to the frame with the most closed mouth. Training labels use it: with an
    open-mouthed first frame, every frame is "less open than the photo" (lip_press high, jaw 0),
    and the generator, which does not see the photo's mouth, would get contradicting targets.
    """
    track = mesh_track(crops)
    h = np.linalg.norm(track[:, 152, :2] - track[:, 10, :2], axis=1)
    opening = np.linalg.norm(track[:, 14, :2] - track[:, 13, :2], axis=1) / h
    if reference == "closed":
        r = int(np.nanargmin(np.where(np.isfinite(opening), opening, np.inf)))
    else:
        r = 0
    if not np.isfinite(track[r]).all():
        raise ValueError("no face landmarks in the reference frame")
    ref = render.prepare(crops[r], track[r], crops.shape[1])
    motion, valid, err = fit_landmarks(ref, track, log)
    return {
        "reference": np.array(r),
        "motion": motion,
        "valid": valid,
        "fit_error": err,
        "opening": opening.astype(np.float32),
        "landmarks": track[:, :, :2].astype(np.float32),
    }


def label_item(item, out_dir: Path, log=print) -> Path:
    """Labels of one catalog video, cached at out_dir/<id>.npz (with its speech)."""
    from .real_data import read_clip

    path = Path(out_dir) / f"{item.id}.npz"
    if path.exists():
        return path
    frames, pcm = read_clip(item)
    crops, box = crop_clip(frames)
    t0 = time.time()
    lab = label_frames(crops, log, reference="closed")
    lab.update(audio=pcm, crop_box=np.array(box, np.float32), held_out=np.array(item.held_out))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **lab)
    tmp.replace(path)
    e = np.nanmedian(lab["fit_error"])
    log(f"  {item.id}: {len(crops)} frames in {time.time() - t0:.0f} s, median fit error {e:.4f}")
    return path


def load_labels(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def main(argv=None) -> None:
    from .real_data import videos

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", required=True, help="real-data folder with catalog.json")
    ap.add_argument("--out", default="runs/real_labels")
    ap.add_argument("--split", default="all", choices=["train", "eval", "all"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    items = sorted(videos(args.real, args.split), key=lambda i: (i.held_out, i.duration_s or 0))
    for k, it in enumerate(items):
        print(f"[{k + 1}/{len(items)}] {it.id} ({it.duration_s} s)", flush=True)
        try:
            label_item(it, Path(args.out), log=lambda s: print(s, flush=True))
        except (ValueError, OSError) as e:
            print(f"  skipped {it.id}: {e}", flush=True)


if __name__ == "__main__":
    main()
