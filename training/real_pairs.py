"""Self-reenactment pairs from real talking video, for the render stage.

A pair is two frames of one training clip: the source plays the photo, the target is what the
decoder must draw, and the motion is the target's face mesh fitted relative to the source
(`fit_motion.fit_frame`), exactly the motion the generator is trained to produce. The target's
real landmarks also give a dense correspondence (the same piecewise-affine backward map the
synthetic renderer supervises with), so the warp is taught directly and not only through pixels;
inside the target's open mouth there is no correspondence (teeth and tongue are new pixels), and
the pixel loss alone decides there. Sources are drawn open-mouthed more often than chance: real
open mouths that must close are what the synthetic data never showed.

    python -m edgetalk.training.real_pairs --real ../shared/data/real --out runs/real_crops
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..models.motion import INDEX
from . import render as renderer
from .fit_motion import HI, JAW_GAIN, crop_clip, fit_frame, mesh_track

MOUTH_PAD = 3  # px around the target's inner-lip polygon without correspondence


def build_crops(root: str | Path, out: str | Path, size: int = 256, log=print) -> list[Path]:
    """Crops (the runtime's fixed first-frame box) and 3-D face mesh tracks of every training
    clip, cached as out/<id>.npz (uint8 crops, float32 landmarks; no pickle)."""
    from .real_data import read_clip, videos

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in videos(root, "train"):
        if item.held_out:  # videos(..., "train") never yields one; refuse loudly if it did
            raise RuntimeError(f"{item.id} is held out")
        path = out / f"{item.id}.npz"
        if not path.exists():
            t0 = time.time()
            frames, _ = read_clip(item)
            crops, _ = crop_clip(frames, size)
            track = mesh_track(crops)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, crops=crops, landmarks=track)
            tmp.replace(path)
            log(f"  {item.id}: {len(crops)} frames in {time.time() - t0:.0f} s")
        paths.append(path)
    return paths


def mouth_mask(lm: np.ndarray, size: int, pad: int = MOUTH_PAD) -> np.ndarray:
    """[size, size] float32, 1 inside the inner-lip polygon (dilated by pad pixels)."""
    import cv2

    poly = np.concatenate([lm[renderer.UI, :2], lm[renderer.LI[::-1], :2]])
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    if pad:
        m = cv2.dilate(m, np.ones((2 * pad + 1, 2 * pad + 1), np.uint8))
    return m.astype(np.float32)


def face_mask(lm: np.ndarray, size: int) -> np.ndarray:
    """[size, size] float32, 1 inside the face oval: where the mesh correspondence is real.
    Outside it the renderer's rings only guess how hair and background follow the head."""
    import cv2

    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [np.round(lm[renderer.FACE_OVAL, :2] * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return m.astype(np.float32)


def pair_motion(ref: renderer.RefFace, target_lm: np.ndarray) -> np.ndarray:
    """The target's motion relative to the source, in the generator's label units."""
    m, _ = fit_frame(ref, target_lm, None, iters=6)
    m[INDEX["jaw_open"]] = min(m[INDEX["jaw_open"]] * JAW_GAIN, HI[INDEX["jaw_open"]])
    return m


def correspondence(ref: renderer.RefFace, motion: np.ndarray, target_lm: np.ndarray):
    """grid_sample grid [S, S, 2] in [-1, 1]: where each target pixel is in the source. The
    face's mesh points sit at the target's real landmarks; rings and border follow the fitted
    motion as the renderer moves them."""
    mesh, _ = renderer.deform(ref, motion)
    mesh = mesh.copy()
    mesh[: renderer.N_MESH, :2] = target_lm[: renderer.N_MESH, :2]
    mx, my = renderer._backward_map(ref, mesh)
    s = ref.rgb.shape[0]
    return np.stack([(mx + 0.5) / s * 2 - 1, (my + 0.5) / s * 2 - 1], axis=-1).astype(np.float32)


class PairSampler:
    """Pairs (source, target, motion, ...) from the cached crops, in the arrays FrameSampler
    gives, plus a per-pixel weight for the correspondence loss."""

    def __init__(self, paths: list[Path], seed: int, open_source: float = 0.4, flip: bool = True):
        self.clips = []
        for p in paths:
            with np.load(p, allow_pickle=False) as z:
                crops, lm = z["crops"], z["landmarks"]
            valid = np.isfinite(lm).all(axis=(1, 2))
            if valid.sum() < 10:
                continue
            op = np.full(len(lm), np.nan)
            op[valid] = [renderer.mouth_opening(f) for f in lm[valid]]
            wide = np.flatnonzero(valid & (op >= np.nanpercentile(op, 75)))
            self.clips.append((crops, lm, np.flatnonzero(valid), wide))
        if not self.clips:
            raise RuntimeError("no usable real clips for pairs")
        n = np.array([len(c[2]) for c in self.clips], np.float64)
        self.p = n / n.sum()
        self.rng = np.random.default_rng(seed)
        self.open_source, self.flip = open_source, flip

    def one(self, size: int):
        from .train_render import lip_targets, mirror_motion, mouth_weight

        rng = self.rng
        crops, lm, valid, wide = self.clips[int(rng.choice(len(self.clips), p=self.p))]
        pick = wide if rng.random() < self.open_source else valid
        s = int(pick[rng.integers(len(pick))])
        t = int(valid[rng.integers(len(valid))])
        ref = renderer.prepare(crops[s], lm[s], size)
        motion = pair_motion(ref, lm[t])
        grid = correspondence(ref, motion, lm[t])
        gw = face_mask(lm[t], size) * (1.0 - mouth_mask(lm[t], size))
        src, tgt = ref.rgb, crops[t]
        lm_s, lm_t = lm[s][:, :2].copy(), lm[t][:, :2].copy()
        if self.flip and rng.random() < 0.5:
            src, tgt = src[:, ::-1], tgt[:, ::-1]
            grid = grid[:, ::-1] * np.array([-1.0, 1.0], np.float32)
            gw = gw[:, ::-1]
            lm_s[:, 0], lm_t[:, 0] = size - lm_s[:, 0], size - lm_t[:, 0]
            motion = mirror_motion(motion)
        return {
            "ref": np.ascontiguousarray(src),
            "target": np.ascontiguousarray(tgt),
            "motion": motion.astype(np.float32),
            "weight": mouth_weight(lm_t, size),
            "grid": np.ascontiguousarray(grid),
            "grid_weight": np.ascontiguousarray(gw),
            "lips": lip_targets(lm_s, size, size // 4),
        }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", required=True, help="real-data folder with catalog.json")
    ap.add_argument("--out", default="runs/real_crops")
    args = ap.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)
    build_crops(args.real, args.out, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
