"""Stage B: the audio encoder and generator learn speech -> motion with flow matching, on chunks.

Exactly the streaming arrangement: chunks of C frames, the first chunk as the sink, a rolling window
of W frames, RAPR positions (via `forward_parallel`'s block-causal layout, which the tests prove
equal to the static-cache stream). Student forcing: on a share of steps the context is the model's
own chunk-by-chunk rollout, not the ground truth, so it learns to recover from its own errors.

    python -m edgetalk.training.train_motion --out runs/motion --minutes 60
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import default_checkpoint, load_checkpoint
from ..models.config import SAMPLES_PER_FRAME
from ..models.motion import INDEX, MOUTH
from ..runtime.scheduler import talk_listen_mask
from . import faces, synth
from .loop import Run

LOSS_WEIGHT = np.ones(16, np.float32)
LOSS_WEIGHT[[INDEX[k] for k in MOUTH]] = 4.0


def build_motion_set(path: Path, n_clips: int, seed: int, split: str, seconds: float = 6.0):
    """Audio + motion clips (no pixels), cached as an .npz without pickle."""
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    ident = faces.load_identities("train")[0]
    own, partner, motion = [], [], []
    t0 = time.time()
    for i in range(n_clips):
        c = synth.make_clip(
            seed + i, ident, size=64, seconds=seconds, dyadic=i % 3 == 2, split=split, render=False
        )
        own.append(c.audio)
        partner.append(c.partner_audio)
        motion.append(c.motion)
        if i % 100 == 99:
            print(f"  {i + 1}/{n_clips} clips, {time.time() - t0:.0f} s", flush=True)
    data = {"own": np.stack(own), "partner": np.stack(partner), "motion": np.stack(motion)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


class WindowSampler:
    def __init__(self, data: dict, frames: int, seed: int):
        self.data, self.frames = data, frames
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int, augment: bool = True):
        rng, t = self.rng, self.frames
        n, total = self.data["motion"].shape[:2]
        own, partner, motion, mask = [], [], [], []
        for _ in range(batch):
            k = int(rng.integers(n))
            s = int(rng.integers(0, total - t + 1))
            a = self.data["own"][k, s * SAMPLES_PER_FRAME : (s + t) * SAMPLES_PER_FRAME].copy()
            b = self.data["partner"][k, s * SAMPLES_PER_FRAME : (s + t) * SAMPLES_PER_FRAME].copy()
            if augment:  # level and background noise vary in the wild
                a *= np.float32(np.exp(rng.uniform(-1.0, 0.6)))
                b *= np.float32(np.exp(rng.uniform(-1.0, 0.6)))
                a += rng.normal(0, 10 ** rng.uniform(-4, -2.3), a.shape).astype(np.float32)
            dyadic = bool(np.abs(b).max() > 0)
            mask.append(talk_listen_mask(a, b if dyadic else None, t))
            own.append(a)
            partner.append(b)
            motion.append(self.data["motion"][k, s : s + t])
        f = lambda x: torch.from_numpy(np.stack(x))  # noqa: E731
        pcm = torch.stack([f(own), f(partner)], dim=1)
        return pcm, f(mask), f(motion)


def chunk_times(b: int, frames: int, chunk: int, steps: int, rng: torch.Generator):
    """Flow time per chunk: mostly the sampler's own grid points, sometimes anywhere in [0, 1)."""
    k = frames // chunk
    grid = torch.randint(0, steps, (b, k), generator=rng).float() / steps
    free = torch.rand(b, k, generator=rng)
    t = torch.where(torch.rand(b, k, generator=rng) < 0.7, grid, free)
    return t.repeat_interleave(chunk, dim=1)


@torch.no_grad()
def rollout(gen, tokens, mask, ref, frames: int, chunk: int, steps: int, noise) -> torch.Tensor:
    """The model's own chunk-by-chunk samples (raw motion units), as streaming produces them.
    Chunk k only needs the prefix up to itself, so each pass runs on that prefix."""
    own = torch.zeros_like(noise)
    x = noise.clone()
    for k in range(frames // chunk):
        end = (k + 1) * chunk
        sl = slice(k * chunk, end)
        for n in range(steps):
            t = torch.full(mask[:, :end].shape, n / steps)
            v = gen.forward_parallel(
                tokens[:, :end], mask[:, :end], ref, own[:, :end], x[:, :end], t
            )
            x[:, sl] = x[:, sl] + v[:, sl] / steps
        own[:, sl] = gen.denormalize(x[:, sl])
    return own


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/motion")
    ap.add_argument("--data", default="runs/data")
    ap.add_argument("--clips", type=int, default=900)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--student", type=float, default=0.1, help="share of student-forced steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, help="checkpoint to start from (default: embedded)")
    ap.add_argument("--val-clips", type=int, default=60)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data)
    print("building motion data ...", flush=True)
    train = build_motion_set(data_dir / f"motion_train_{args.clips}.npz", args.clips, 0, "train")
    val = build_motion_set(
        data_dir / f"motion_eval_{args.val_clips}.npz", args.val_clips, 500_000, "eval"
    )

    model, _ = load_checkpoint(args.init or default_checkpoint())
    cfg = model.cfg
    gen = model.generator
    with torch.no_grad():
        flat = torch.from_numpy(train["motion"].reshape(-1, cfg.motion_dim))
        gen.motion_mean.copy_(flat.mean(0))
        gen.motion_std.copy_(flat.std(0).clamp(min=0.02))
        model.appearance.ref_head.weight.zero_()
        model.appearance.ref_head.bias.zero_()
    params = list(model.audio.parameters()) + list(gen.parameters())
    run = Run(args.out, model, params, args.lr, args.steps)
    sampler = WindowSampler(train, args.frames, args.seed + run.step)
    val_sampler = WindowSampler(val, args.frames, 1234)
    val_batch = val_sampler.sample(32, augment=False)
    g = torch.Generator().manual_seed(args.seed + run.step)
    weight = torch.from_numpy(LOSS_WEIGHT)
    c, steps = cfg.chunk, cfg.generator.steps

    def flow_loss(pcm, mask, motion, student: bool):
        b, t = mask.shape
        ref = torch.zeros(b, cfg.motion_dim)
        tokens = model.audio.encode_sequence(pcm, mask)
        x1 = gen.normalize(motion)
        x0 = torch.randn(x1.shape, generator=g)
        if student:  # the model's own past, on half the batch (rollouts are the costly part)
            h = b // 2
            own = rollout(
                gen,
                tokens[:h].detach(),
                mask[:h],
                ref[:h],
                t,
                c,
                steps,
                torch.randn(x1[:h].shape, generator=g),
            )
            clean = torch.cat([own, motion[h:]])
        else:  # cheap stand-in for own errors: jitter the context in the normalized space
            sigma = torch.rand(b, 1, 1, generator=g) * 0.3
            clean = gen.denormalize(x1 + sigma * torch.randn(x1.shape, generator=g))
        tt = chunk_times(b, t, c, steps, g)
        xt = (1 - tt[..., None]) * x0 + tt[..., None] * x1
        v = gen.forward_parallel(tokens, mask, ref, clean, xt, tt)
        return (((v - (x1 - x0)) ** 2) * weight).mean()

    model.train()
    deadline = time.time() + args.minutes * 60
    while time.time() < deadline and run.step < args.steps:
        t0 = time.time()
        pcm, mask, motion = sampler.sample(args.batch)
        student = run.step > 300 and np.random.default_rng(run.step).random() < args.student
        loss = flow_loss(pcm, mask, motion, student)
        run.update(loss)
        if run.step % 50 == 0:
            with torch.no_grad():
                model.eval()
                val_loss = flow_loss(*val_batch, student=False).item()
                model.train()
            run.log(loss=loss.item(), val=val_loss, step_s=time.time() - t0, student=int(student))
        if run.step % 250 == 0:
            run.save(stage="motion")
    run.save(stage="motion")


if __name__ == "__main__":
    main()
