"""Stage A: the appearance encoder and decoder learn to render a frame from a photo + motion.

Targets come from the synthetic renderer (mesh deformation + mouth interior) on the training
identities. Motions are drawn from the viseme model's clips plus random jitter, so the decoder
also sees combinations speech rarely makes. Reference and target share one augmentation; a
horizontal flip mirrors the motion too.

    python -m edgetalk.training.train_render --out runs/render --minutes 60
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.checkpoint import default_checkpoint, load_checkpoint
from ..models.decoder import lip_edges
from ..models.motion import INDEX
from . import faces, synth
from . import render as renderer
from .loop import Run
from .open_mouths import open_mouth_refs

MIRROR_NEG = [INDEX[k] for k in ("head_yaw", "head_roll", "head_tx")]
SHIFT = [INDEX["head_tx"], INDEX["head_ty"]]
BLINKS = (INDEX["blink_left"], INDEX["blink_right"])
MOUTH_GAIN = 6.0  # loss weight in the box around the mouth
LIP_WEIGHTS = (0.02, 0.05, 0.2)  # lip head: edge error in pixels, row cross-entropy, presence


def mirror_motion(m: np.ndarray) -> np.ndarray:
    m = m.copy()
    m[..., MIRROR_NEG] *= -1
    m[..., list(BLINKS)] = m[..., list(BLINKS[::-1])]
    return m


def rotate_motion(m: np.ndarray, angle: float) -> np.ndarray:
    """The motion as seen in a picture rotated by angle: the head's shift (image axes) turns
    with it. Roll is relative and stays; yaw and pitch stay too, which is exact only upright
    (a tilted photo mixes them slightly; the augmentation keeps tilts small)."""
    m = m.copy()
    cos, sin = np.cos(angle), np.sin(angle)
    tx, ty = m[..., SHIFT[0]].copy(), m[..., SHIFT[1]].copy()
    m[..., SHIFT[0]], m[..., SHIFT[1]] = cos * tx - sin * ty, sin * tx + cos * ty
    return m


def motion_pool(n_clips: int, seed: int) -> np.ndarray:
    """Per-frame motions from motion-only clips (speech, listening, idle)."""
    ident = faces.load_identities("train")[0]
    out = []
    for i in range(n_clips):
        c = synth.make_clip(seed + i, ident, size=64, seconds=6.0, dyadic=i % 2 == 1, render=False)
        out.append(c.motion)
    return np.concatenate(out)


class FrameSampler:
    def __init__(
        self,
        size: int,
        seed: int,
        pool: np.ndarray,
        closure_share: float = 0.0,
        open_share: float = 0.0,
        rotate: float = 0.0,
        transplant: bool = True,
    ):
        self.rotate = rotate
        self.ids = faces.load_identities("train")
        self.refs = [synth.reference(i, size) for i in self.ids]
        self.open_refs = open_mouth_refs(self.refs, transplant) if open_share > 0 else []
        self.open_share = open_share
        self.pool = pool
        self.scale = pool.std(axis=0) + 1e-3
        # Lip closures are rare frames but the hardest warp (lips over teeth); oversample them.
        self.closures = np.flatnonzero(pool[:, INDEX["lip_press"]] > 0.5)
        self.closure_share = closure_share
        self.rng = np.random.default_rng(seed)
        self.size = size

    def sample(self, n: int):
        rng = self.rng
        refs, targets, motions, weights, grids, painted, lips = [], [], [], [], [], [], []
        for _ in range(n):
            k = int(rng.integers(len(self.refs)))
            ref = self.refs[k]
            if self.open_refs and rng.random() < self.open_share:
                ref = self.open_refs[int(rng.integers(len(self.open_refs)))]
            if rng.random() < self.closure_share and len(self.closures):  # p/b/m closures
                m = self.pool[self.closures[int(rng.integers(len(self.closures)))]].copy()
            else:
                m = self.pool[int(rng.integers(len(self.pool)))].copy()
            if rng.random() < 0.5:  # off-distribution combinations
                m += rng.normal(0, 0.3, m.shape).astype(np.float32) * self.scale
                m[:10] = np.clip(m[:10], 0.0, 1.0)
            frame, lm, maps, mask = renderer.render_with_maps(ref, m)
            aug = faces.sample_augment(rng, 1.0, self.rotate)
            ref_img = faces.apply_augment(ref.rgb, aug)
            target = faces.apply_augment(frame, aug)
            grids.append(augment_map(maps, aug, self.size))
            painted.append(augment_mask(mask, aug, self.size))
            if aug.flip:
                m = mirror_motion(m)
            if aug.angle:
                m = rotate_motion(m, aug.angle)
            lm = faces.augment_points(lm, aug, self.size)
            ref_lm = faces.augment_points(ref.landmarks, aug, self.size)
            lips.append(lip_targets(ref_lm, self.size, self.size // 4))
            refs.append(ref_img)
            targets.append(target)
            motions.append(m)
            weights.append(mouth_weight(lm, self.size))
        to_t = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
        return (
            to_t(refs),
            to_t(targets),
            torch.from_numpy(np.stack(motions)),
            torch.stack(weights),
            torch.from_numpy(np.stack(grids)),
            torch.from_numpy(np.stack(painted))[:, None].float(),
            torch.from_numpy(np.stack(lips)),
        )


def lip_targets(lm: np.ndarray, size: int, columns: int = 64) -> np.ndarray:
    """[3, columns] float32 for the decoder's lip head: the photo's upper and lower inner-lip
    edge in each column (normalized y, interpolated along the mediapipe contours) and 1 where
    the column lies between the mouth corners."""
    xc = (np.arange(columns) + 0.5) * size / columns
    out = np.zeros((3, columns), np.float32)
    for row, idx in ((0, renderer.UI), (1, renderer.LI)):
        pts = lm[idx, :2]
        o = np.argsort(pts[:, 0])
        out[row] = np.interp(xc, pts[o, 0], pts[o, 1]) / size * 2 - 1
    corners = lm[[renderer.UI[0], renderer.UI[-1]], 0]
    out[2] = (xc >= corners.min()) & (xc <= corners.max())
    return out


def lip_loss(model, app_feat, target: torch.Tensor, size: int):
    """(weighted total, edge error in pixels, row cross-entropy, presence BCE) of the decoder's
    lip head over the mouth's columns (weights: LIP_WEIGHTS). The cross-entropy against a one-row-wide Gaussian at each edge trains
    the heatmaps directly; the soft-argmax error alone moved them slowly."""
    dec = model.decoder
    logits = dec.lip_logits(app_feat)
    up, low, present = lip_edges(logits, dec.rows)
    mask = target[:, 2]
    n = mask.sum().clamp(min=1)
    err = (up[:, 0, 0] - target[:, 0]).abs() + (low[:, 0, 0] - target[:, 1]).abs()
    edge_px = (err * mask).sum() / n * (size / 2)
    rows = dec.rows[0, 0, :, 0]  # [h]
    spacing = float(rows[1] - rows[0])
    ce = 0.0
    for ch in (0, 1):
        want = torch.exp(-0.5 * ((rows[None, :, None] - target[:, ch, None, :]) / spacing) ** 2)
        want = want / want.sum(dim=1, keepdim=True)  # [B, h, w]
        logp = torch.log_softmax(logits[:, ch], dim=1)
        ce = ce + (-(want * logp).sum(dim=1) * mask).sum() / n
    bce = F.binary_cross_entropy(present[:, 0, 0].clamp(1e-4, 1 - 1e-4), mask)
    total = sum(w * v for w, v in zip(LIP_WEIGHTS, (edge_px, ce, bce), strict=True))
    return total, edge_px, ce, bce


def augment_map(maps, aug, size: int) -> np.ndarray:
    """The renderer's backward map under the augmentation, as a grid_sample grid in [-1, 1].

    The augmented target at p shows the reference at map(A^-1 p), and the augmented reference at
    q shows the reference at A^-1 q, so the augmented map is A(map(A^-1 p))."""
    import cv2

    a = faces.augment_matrix(aug, size)
    mx = cv2.warpAffine(
        maps[0], a, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    my = cv2.warpAffine(
        maps[1], a, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    x = a[0, 0] * mx + a[0, 1] * my + a[0, 2]
    y = a[1, 0] * mx + a[1, 1] * my + a[1, 2]
    return np.stack([(x + 0.5) / size * 2 - 1, (y + 0.5) / size * 2 - 1], axis=-1).astype(
        np.float32
    )


def augment_mask(mask: np.ndarray, aug, size: int) -> np.ndarray:
    import cv2

    a = faces.augment_matrix(aug, size)
    return cv2.warpAffine(mask.astype(np.float32), a, (size, size), flags=cv2.INTER_LINEAR)


def mouth_weight(lm: np.ndarray, size: int) -> torch.Tensor:
    """Loss weight map: 1 everywhere, 6 in a box around the mouth and 3 around the eyes."""
    w = np.ones((size, size), np.float32)
    for idx, gain, pad in (
        ((61, 291, 0, 17, 13, 14), MOUTH_GAIN, 0.06),
        ((33, 133, 362, 263), 3.0, 0.05),
    ):
        pts = lm[list(idx)]
        x0, y0 = pts.min(0) - pad * size
        x1, y1 = pts.max(0) + pad * size
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(size, int(x1) + 1), min(size, int(y1) + 1)
        w[y0:y1, x0:x1] = np.maximum(w[y0:y1, x0:x1], gain)
    return torch.from_numpy(w)[None]


def render_loss(pred, target, weight):
    """Weighted L1 on pixels and on horizontal/vertical gradients (keeps edges, teeth, lids)."""
    l1 = ((pred - target).abs() * weight).mean()
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    grad = ((dx(pred) - dx(target)).abs() * weight[..., :, 1:]).mean() + (
        (dy(pred) - dy(target)).abs() * weight[..., 1:, :]
    ).mean()
    return l1 + 0.5 * grad


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a, b).item()
    return 10 * np.log10(1.0 / max(mse, 1e-10))


def _with_real(pairs, n, size, *synth):
    """The synthetic batch with n real self-reenactment pairs appended. Real pairs have no
    painted mask (zero: paint is allowed in the mouth box only, as for synthetic frames) and
    their correspondence weight is zero off the face and inside the open mouth."""
    items = [pairs.one(size) for _ in range(n)]
    img = lambda k: torch.from_numpy(np.stack([i[k] for i in items])).permute(0, 3, 1, 2) / 255.0  # noqa: E731
    arr = lambda k: torch.from_numpy(np.stack([i[k] for i in items]))  # noqa: E731
    real = (
        img("ref").float(),
        img("target").float(),
        arr("motion"),
        torch.stack([i["weight"] for i in items]),
        arr("grid"),
        torch.zeros(n, 1, size, size),
        arr("lips"),
        arr("grid_weight")[:, None],
    )
    return tuple(torch.cat([a, b]) for a, b in zip(synth, real, strict=True))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/render")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--steps", type=int, default=6000, help="schedule length (cosine LR)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--closure-share",
        type=float,
        default=0.0,
        help="share of samples drawn from lip-closure frames",
    )
    ap.add_argument(
        "--open-share",
        type=float,
        default=0.0,
        help="share of samples whose photo is a training face made to laugh (open_mouths.py)",
    )
    ap.add_argument(
        "--rotate",
        type=float,
        default=0.0,
        help="largest in-plane rotation of the augmentation, degrees (0: none)",
    )
    ap.add_argument(
        "--no-transplant",
        action="store_true",
        help="laughing photos only from widened toothy smiles, no transplanted teeth",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, help="checkpoint to start from (default: embedded)")
    ap.add_argument("--pool-clips", type=int, default=60)
    ap.add_argument(
        "--alpha-weight",
        type=float,
        default=0.1,
        help="weight of the painted-mouth mask's loss (the thin dark slit of a barely open mouth "
        "is paint, not warp: MODEL_CARD.md, the decoder's dead zone)",
    )
    ap.add_argument(
        "--real",
        type=Path,
        help="real-data folder (catalog.json): mix in self-reenactment pairs of training clips",
    )
    ap.add_argument("--real-crops", type=Path, default=Path("runs/real_crops"))
    ap.add_argument("--real-share", type=float, default=0.5, help="share of each batch")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # The lip head may be new to an older checkpoint: it starts untrained (closing nothing).
    model, _ = load_checkpoint(args.init or default_checkpoint(), allow_new=("decoder.lip",))
    size = model.cfg.render.resolution
    params = list(model.appearance.parameters()) + list(model.decoder.parameters())
    with torch.no_grad():  # the reference token is not trained in this recipe: keep it zero
        model.appearance.ref_head.weight.zero_()
        model.appearance.ref_head.bias.zero_()
    run = Run(args.out, model, [p for p in params if p.requires_grad], args.lr, args.steps)
    model.appearance.ref_head.requires_grad_(False)
    pairs, n_real = None, 0
    if args.real is not None:
        from .real_pairs import PairSampler, build_crops

        print("real pairs: crops and face meshes ...", flush=True)
        pairs = PairSampler(build_crops(args.real, args.real_crops), args.seed + run.step)
        n_real = int(round(args.batch * args.real_share))
    print("building the motion pool ...", flush=True)
    sampler = FrameSampler(
        size,
        args.seed + run.step,
        motion_pool(args.pool_clips, 10_000),
        args.closure_share,
        args.open_share,
        np.radians(args.rotate),
        not args.no_transplant,
    )
    model.train()
    deadline = time.time() + args.minutes * 60
    while time.time() < deadline and run.step < args.steps:
        t0 = time.time()
        ref, target, motion, weight, grid_gt, painted, lip_gt = sampler.sample(args.batch - n_real)
        grid_w = torch.ones(weight.shape)
        if n_real:
            ref, target, motion, weight, grid_gt, painted, lip_gt, grid_w = _with_real(
                pairs, n_real, size, ref, target, motion, weight, grid_gt, painted, lip_gt, grid_w
            )
        t1 = time.time()
        app = model.appearance(ref)["app_feat"]
        frames, grid, alpha = model.decoder.render_parts(app, ref, motion)
        pred = frames.permute(0, 3, 1, 2)
        # Pixels alone give only local gradients for a warp; the renderer's exact correspondence
        # (in pixels) and its painted-mouth mask teach the large jaw and lip moves directly.
        w = (weight * grid_w)[:, 0, :, :, None]
        flow_err = ((grid - grid_gt).abs() * (size / 2) * w).mean()
        # The painted-mouth mask says where the renderer painted, not where painting is the
        # only way: closing a smile's lips over its teeth is a warp to the renderer but a paint
        # job is just as right. Inside the mouth box an unpainted target pixel is left to the
        # pixel loss; everywhere else the mask holds (no paint on skin, eyes or background).
        free = (weight >= MOUTH_GAIN).float() * (1.0 - painted)
        alpha_err = (
            F.binary_cross_entropy(alpha.clamp(1e-4, 1 - 1e-4), painted, reduction="none")
            * (1.0 - free)
        ).mean()
        # The lip head is told where the photo's lips are (landmarks), not only through pixels.
        lip, lip_px, _, _ = lip_loss(model, app, lip_gt, size)
        loss = (
            render_loss(pred, target, weight)
            + 0.05 * flow_err
            + args.alpha_weight * alpha_err
            + lip
        )
        run.update(loss)
        if run.step % 25 == 0:
            run.log(
                loss=loss.item(),
                psnr=psnr(pred.detach(), target),
                flow_px=flow_err.item(),
                alpha=alpha_err.item(),
                lip_px=lip_px.item(),
                data_s=t1 - t0,
                step_s=time.time() - t1,
            )
        if run.step % 250 == 0:
            run.save(stage="render")
    run.save(stage="render")


if __name__ == "__main__":
    main()
