"""Stage A2: the decoder's lip head alone learns where a photo's inner lips are.

Everything else is frozen, so the render does not change except where lip_press closes the
lips. The head's targets are the photo's landmarks, not a rendered frame, so a step is cheap
(~0.2 s for 16 photos on one core, against ~0.45 s for 8 in the render stage) and the head sees
many more photos per minute, each under strong augmentation: scale, shift, rotation, colour,
and photo damage (blur, low resolution, JPEG, noise; faces.degrade).

Why it is a stage of its own: trained jointly with the render, the head found a held-out laugh's
lips only roughly (presence 0.6, gap 6 of 10 pixels); trained alone, longer and on damaged
photos, it does better on photos it has not seen (the model card gives the figures).

    python -m edgetalk.training.train_lips --init runs/render/model.safetensors --out runs/lips
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import default_checkpoint, load_checkpoint
from . import faces, synth
from .loop import Run
from .open_mouths import open_mouth_refs
from .train_render import lip_loss, lip_targets


def lip_head_parameters(model) -> list[torch.nn.Parameter]:
    """The head's convolutions; lip_reach (how far the field reaches) is a render choice, left
    to the render stage's pixel loss."""
    dec = model.decoder
    return [p for m in (dec.lip_in, dec.lip_mid, dec.lip_out) for p in m.parameters()]


class PhotoSampler:
    """Training photos and their laughing variants, augmented, with the lip head's targets."""

    def __init__(self, size: int, seed: int, rotate: float, strength: float, damage: float):
        refs = [synth.reference(i, size) for i in faces.load_identities("train")]
        self.refs = refs + open_mouth_refs(refs)
        self.size, self.rotate, self.strength, self.damage = size, rotate, strength, damage
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(photos [n, 3, S, S] in [0, 1], targets [n, 3, S/4])."""
        rng, size = self.rng, self.size
        photos, targets = [], []
        for _ in range(n):
            ref = self.refs[int(rng.integers(len(self.refs)))]
            aug = faces.sample_augment(rng, self.strength, self.rotate)
            photos.append(faces.degrade(faces.apply_augment(ref.rgb, aug), rng, self.damage))
            points = faces.augment_points(ref.landmarks, aug, size)
            targets.append(lip_targets(points, size, size // 4))
        x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.from_numpy(np.stack(targets))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", type=Path, help="checkpoint to start from (default: embedded)")
    ap.add_argument("--out", default="runs/lips")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--steps", type=int, default=2500, help="schedule length (cosine LR)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rotate", type=float, default=15.0, help="largest rotation, degrees")
    ap.add_argument("--strength", type=float, default=1.0, help="augmentation strength")
    ap.add_argument("--damage", type=float, default=0.3, help="chance scale of photo damage")
    ap.add_argument(
        "--fresh", action="store_true", help="start the head from scratch, not from --init"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, _ = load_checkpoint(args.init or default_checkpoint(), allow_new=("decoder.lip",))
    model.requires_grad_(False)
    params = lip_head_parameters(model)
    if args.fresh:
        model.decoder.reset_lip_head()
    for p in params:
        p.requires_grad_(True)
    run = Run(args.out, model, params, args.lr, args.steps)
    size = model.cfg.render.resolution
    sampler = PhotoSampler(
        size, args.seed + run.step, np.radians(args.rotate), args.strength, args.damage
    )
    model.eval()  # nothing here behaves differently in training, but the frozen parts stay put
    deadline = time.time() + args.minutes * 60
    while time.time() < deadline and run.step < args.steps:
        t0 = time.time()
        photos, targets = sampler.sample(args.batch)
        t1 = time.time()
        with torch.no_grad():
            app = model.appearance(photos)["app_feat"]
        loss, px, ce, bce = lip_loss(model, app, targets, size)
        run.update(loss)
        if run.step % 50 == 0:
            run.log(
                loss=loss.item(),
                lip_px=px.item(),
                lip_ce=ce.item(),
                presence=bce.item(),
                data_s=t1 - t0,
                step_s=time.time() - t1,
            )
        if run.step % 500 == 0:
            run.save(stage="lips")
    run.save(stage="lips")


if __name__ == "__main__":
    main()
