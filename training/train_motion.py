"""Stage B: the audio encoder and generator learn speech -> motion with flow matching, on chunks.

Exactly the streaming arrangement: chunks of C frames, the first chunk as the sink, a rolling window
of W frames, RAPR positions (via `forward_parallel`'s block-causal layout, which the tests prove
equal to the static-cache stream). Student forcing: on a share of steps the context is the model's
own chunk-by-chunk rollout, not the ground truth, so it learns to recover from its own errors.

    python -m edgetalk.training.train_motion --out runs/motion --minutes 60

With `--real DIR` (and labels from `fit_motion`), a share of every batch is real speech paired
with the motion fitted to its video (never a held-out identity), and the audio of both kinds is
degraded as microphones, rooms and calls do (`augment.py`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import default_checkpoint, load_checkpoint, save_checkpoint
from ..models.config import SAMPLES_PER_FRAME
from ..models.motion import HEAD, INDEX, MOUTH
from ..runtime.scheduler import talk_listen_mask
from . import augment, faces, synth
from .fit_readout import without_readout
from .loop import Run
from .motion_proxy import quiet_frames

LOSS_WEIGHT = np.ones(16, np.float32)
LOSS_WEIGHT[[INDEX[k] for k in MOUTH]] = 4.0
_MOUTH_IDX = [INDEX[k] for k in MOUTH]


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
    """Windows of `frames` frames, each after `warm` frames of the audio before it (the clip's own,
    or silence where the clip starts): their tokens are dropped, they only set the audio encoder's
    running state (its log-mel mean), as a live stream's past does. Without them every window
    would start cold, which a stream does once, not every 2 s."""

    def __init__(
        self,
        data: dict,
        frames: int,
        seed: int,
        real=None,
        real_share: float = 0.0,
        strong=False,
        warm: int = 0,
    ):
        self.data, self.frames, self.warm = data, frames, warm
        self.rng = np.random.default_rng(seed)
        self.real, self.real_share, self.strong = real, real_share, strong

    def sample(self, batch: int, augment: bool = True):
        rng, t, w, spf = self.rng, self.frames, self.warm, SAMPLES_PER_FRAME
        if augment and w and rng.random() < 0.25:  # a quarter of batches: any shorter past
            w = int(rng.integers(0, w))
        n, total = self.data["motion"].shape[:2]
        own, partner, motion, mask = [], [], [], []
        for _ in range(batch):
            if augment and self.real is not None and rng.random() < self.real_share:
                a, b, m = self.real.one(w)
                mask.append(talk_listen_mask(a, None, w + t))
                own.append(a)
                partner.append(b)
                motion.append(m)
                continue
            k = int(rng.integers(n))
            s = int(rng.integers(0, total - t + 1))
            lo = max(0, s - w) * spf
            pad = (w * spf - (s * spf - lo), 0)  # silence before the clip's start
            a = np.pad(self.data["own"][k, lo : (s + t) * spf], pad)
            b = np.pad(self.data["partner"][k, lo : (s + t) * spf], pad)
            if augment and self.strong and abs(a).max() > 0:  # microphones, rooms, levels
                a = _cheap_degrade(a, rng)
                b *= np.float32(np.exp(rng.uniform(-1.0, 0.6)))
            elif augment:  # level and background noise vary in the wild
                a *= np.float32(np.exp(rng.uniform(-1.0, 0.6)))
                b *= np.float32(np.exp(rng.uniform(-1.0, 0.6)))
                a += rng.normal(0, 10 ** rng.uniform(-4, -2.3), a.shape).astype(np.float32)
            dyadic = bool(np.abs(b).max() > 0)
            mask.append(talk_listen_mask(a, b if dyadic else None, w + t))
            own.append(a)
            partner.append(b)
            motion.append(self.data["motion"][k, s : s + t])
        f = lambda x: torch.from_numpy(np.stack(x))  # noqa: E731
        pcm = torch.stack([f(own), f(partner)], dim=1)
        return pcm, f(mask), f(motion)


def load_real_pool(root: Path, labels: Path, variants: int, cache: Path, seed: int = 0) -> list:
    """[(audio variants [V+1, N], motion [T, 16])] for every training clip with labels.

    Variant 0 is the clean speech; the others went through `augment.degrade` once (codecs and
    reverb are too slow to run per step on one core), cached as .npz.
    """
    from .fit_motion import load_labels
    from .real_data import videos

    items = videos(root, "train")
    pool, missing = [], []
    for it in items:
        path = labels / f"{it.id}.npz"
        if not path.exists():
            missing.append(it.id)
            continue
        lab = load_labels(path)
        if bool(lab["held_out"]) or it.held_out:  # belt and braces: never train on held-out
            raise RuntimeError(f"{it.id} is held out but was offered for training")
        m = lab["motion"].astype(np.float32)
        # Light temporal smoothing: face-mesh jitter is not motion the model should learn.
        m = np.concatenate([m[:1], m, m[-1:]])
        m = 0.25 * m[:-2] + 0.5 * m[1:-1] + 0.25 * m[2:]
        pool.append((it.id, lab["audio"].astype(np.float32), m))
    if missing:
        print(f"  no labels for {len(missing)} clips: {', '.join(missing)}")
    key = cache / f"real_aug_{variants}_{len(pool)}.npz"
    if key.exists():
        with np.load(key, allow_pickle=False) as z:
            aug = {k: z[k] for k in z.files}
    else:
        rng = np.random.default_rng(seed)
        aug = {}
        for cid, a, _ in pool:
            aug[cid] = np.stack([augment.degrade(a, rng, strength=3.0) for _ in range(variants)])
        key.parent.mkdir(parents=True, exist_ok=True)
        np.savez(key, **aug)
    return [(np.concatenate([a[None], aug[cid]]), m) for cid, a, m in pool]


class RealSampler:
    """Windows of real speech and fitted motion, with speed changes (the motion follows)."""

    def __init__(self, pool: list, frames: int, seed: int, start_share: float = 0.0, warm: int = 0):
        self.pool, self.frames, self.start_share, self.warm = pool, frames, start_share, warm
        self.rng = np.random.default_rng(seed)
        lengths = np.array([len(m) for _, m in pool], np.float64)
        self.p = lengths / lengths.sum()
        # Ordinary windows start on a voiced frame: a window that starts in a pause would teach
        # "silence at a stream start = the labels' parted rest lips" (fitted relative to the most
        # closed frame, pauses sit ~0.2 above it), against the stream-start windows.
        self.voiced = [~quiet_frames(a[0])[: len(m)] for a, m in pool]

    def one(self, warm: int | None = None):
        rng, t, spf = self.rng, self.frames, SAMPLES_PER_FRAME
        warm = self.warm if warm is None else warm
        k = int(rng.choice(len(self.pool), p=self.p))
        audio, motion = self.pool[k]
        # A stream start: 0.3-1.2 s of near-silence before the clip's first frame, mouth at rest
        # (labels are relative to the closed-mouth frame), so silence at the start of a stream
        # means a closed mouth (real windows otherwise start with the motion under way).
        lead = int(rng.integers(8, 31)) if rng.random() < self.start_share else 0
        n = t - lead
        speed = float(rng.uniform(0.85, 1.15)) if rng.random() < 0.3 else 1.0
        span = min(int(round(n * speed)), len(motion))
        starts = np.flatnonzero(self.voiced[k][: len(motion) - span + 1])
        if lead:
            s = 0
        elif len(starts):
            s = int(rng.choice(starts))
        else:
            s = int(rng.integers(0, len(motion) - span + 1))
        src = audio[int(rng.integers(len(audio)))]
        a = src[s * spf : (s + span) * spf].copy()
        m = motion[s : s + span]
        if span != n:
            a, m = augment.stretch(a, m, span / n, n)
        if lead:
            rest = np.repeat(m[:1], lead, 0)
            rest[:, _MOUTH_IDX] = 0.0
            a = np.concatenate([self._room_tone(k, src, lead), a])
            m = np.concatenate([rest, m])
        if warm:  # the audio before the window (room tone before the clip's start)
            before = src[max(0, s - warm) * spf : s * spf] if not lead else src[:0]
            short = warm - len(before) // spf
            room = self._room_tone(k, src, short) if short else src[:0]
            a = np.concatenate([room, before, a])
        a = _cheap_degrade(a, rng)
        return a, np.zeros_like(a), m.astype(np.float32)

    def _room_tone(self, k: int, src: np.ndarray, frames: int) -> np.ndarray:
        """Near-silence: half the time the clip's own quiet frames (its room and mic noise: white
        noise alone taught a closed mouth only for white noise), else faint white noise."""
        rng, spf = self.rng, SAMPLES_PER_FRAME
        quiet = np.flatnonzero(~self.voiced[k][: len(src) // spf])
        if len(quiet) >= 4 and rng.random() < 0.5:
            idx = rng.choice(quiet, frames)
            return src[: len(self.voiced[k]) * spf].reshape(-1, spf)[idx].ravel().copy()
        return rng.normal(0, 10 ** (rng.uniform(-80, -50) / 20), frames * spf).astype(np.float32)


def _cheap_degrade(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-step augmentation cheap enough for every sample: colour, band, level, noise."""
    if rng.random() < 0.3:
        a = augment.mic_colour(a, rng)
    if rng.random() < 0.2:
        a = augment.band_limit(a, rng)
    peak = float(np.abs(a).max()) or 1.0
    a = a / peak * np.float32(rng.uniform(0.03, 0.95))
    a = a + rng.normal(0, 10 ** (rng.uniform(-75, -25) / 20), a.shape).astype(np.float32)
    return np.clip(a, -1, 1).astype(np.float32)


def with_mel_norm(model, seconds: float):
    """The same weights in a model whose audio encoder normalizes its mels (or stops doing so)."""
    import dataclasses

    from ..models.edgetalk import EdgeTalkModel

    cfg = model.cfg
    cfg = dataclasses.replace(
        cfg, audio=dataclasses.replace(cfg.audio, mel_norm_s=float(seconds))
    ).validate()
    out = EdgeTalkModel(cfg)
    out.load_state_dict(model.state_dict())
    return out


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
    ap.add_argument("--real", type=Path, help="real-data folder (catalog.json): mix in real speech")
    ap.add_argument("--labels", type=Path, default=Path("runs/real_labels"))
    ap.add_argument("--real-share", type=float, default=0.4, help="share of real windows")
    ap.add_argument("--real-variants", type=int, default=3, help="degraded copies per real clip")
    ap.add_argument(
        "--start-share",
        type=float,
        default=0.2,
        help="share of real windows that begin as a stream starts: silence, mouth at rest",
    )
    ap.add_argument(
        "--head-weight",
        type=float,
        default=1.0,
        help="loss weight of head pose (real heads move ~5x the synthetic std; 0.2 keeps the "
        "mouth in charge)",
    )
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--snapshot-every", type=int, default=0, help="keep step_N.safetensors")
    ap.add_argument("--keep-norm", action="store_true", help="keep the init's motion normalization")
    ap.add_argument(
        "--mouth-aux",
        type=float,
        default=0.0,
        help="weight of a linear mouth readout from the audio tokens (training only; 0 = off)",
    )
    ap.add_argument(
        "--warm-frames",
        type=int,
        help="audio frames heard before each window, to set the encoder's running state "
        "(default: 25 with mel normalization, else 0)",
    )
    ap.add_argument(
        "--mel-norm-s",
        type=float,
        help="the audio encoder's running log-mel mean, time constant in seconds (0 = off; "
        "default: the init's). Turning it on for an init trained without it fine-tunes the "
        "encoder to normalized mels (the module has no weights of its own)",
    )
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
    if model.cfg.audio.readout_mix:
        model = without_readout(model)
        print(
            "the init's mouth readout is dropped (it reads the encoder this run retrains); "
            "fit a new one afterwards: python -m edgetalk.training.fit_readout",
            flush=True,
        )
    if args.mel_norm_s is not None and args.mel_norm_s != model.cfg.audio.mel_norm_s:
        model = with_mel_norm(model, args.mel_norm_s)
    cfg = model.cfg
    # an encoder with a running state hears some audio before each window (see WindowSampler)
    warm = args.warm_frames if args.warm_frames is not None else (25 if cfg.audio.mel_norm_s else 0)
    gen = model.generator
    real = None
    if args.real is not None:
        print("loading real speech and fitted motion ...", flush=True)
        pool = load_real_pool(args.real, args.labels, args.real_variants, data_dir, args.seed)
        print(f"  {len(pool)} real clips, {sum(len(m) for _, m in pool) / 25:.0f} s", flush=True)
        real = RealSampler(pool, args.frames, args.seed + 77, args.start_share, warm)
    with torch.no_grad():
        if not args.keep_norm:
            flat = torch.from_numpy(train["motion"].reshape(-1, cfg.motion_dim))
            gen.motion_mean.copy_(flat.mean(0))
            gen.motion_std.copy_(flat.std(0).clamp(min=0.02))
        model.appearance.ref_head.weight.zero_()
        model.appearance.ref_head.bias.zero_()
    params = list(model.audio.parameters()) + list(gen.parameters())
    # A linear mouth readout on the audio tokens (training only, never saved): it asks the tokens
    # to carry the mouth linearly, which a linear probe finds in normalized log-mels (0.52 on the
    # held-out clips) and the generator alone does not (0.32; see audio_probe.py).
    readout = torch.nn.Linear(cfg.audio.token_dim, 1) if args.mouth_aux else None
    if readout is not None:
        params += list(readout.parameters())
    run = Run(args.out, model, params, args.lr, args.steps)
    sampler = WindowSampler(
        train,
        args.frames,
        args.seed + run.step,
        real,
        args.real_share,
        strong=real is not None,
        warm=warm,
    )
    val_sampler = WindowSampler(val, args.frames, 1234, warm=warm)
    val_batch = val_sampler.sample(32, augment=False)
    g = torch.Generator().manual_seed(args.seed + run.step)
    w = LOSS_WEIGHT.copy()
    w[[INDEX[k] for k in HEAD]] *= args.head_weight
    weight = torch.from_numpy(w)
    c, steps = cfg.chunk, cfg.generator.steps

    def flow_loss(pcm, mask, motion, student: bool):
        tokens = model.audio.encode_sequence(pcm, mask)
        w = mask.shape[1] - motion.shape[1]  # warm-up frames: they set the encoder's state only
        tokens, mask = tokens[:, w:], mask[:, w:]
        b, t = mask.shape
        ref = torch.zeros(b, cfg.motion_dim)
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
        loss = (((v - (x1 - x0)) ** 2) * weight).mean()
        if readout is not None:
            mouth = motion[..., INDEX["jaw_open"]] - 0.5 * motion[..., INDEX["lip_press"]]
            loss = loss + args.mouth_aux * ((readout(tokens)[..., 0] - mouth) ** 2).mean()
        return loss

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
        if run.step % args.save_every == 0:
            run.save(stage="motion")
        if args.snapshot_every and run.step % args.snapshot_every == 0:
            save_checkpoint(model, Path(args.out) / f"step_{run.step}.safetensors", stage="motion")
    run.save(stage="motion")


if __name__ == "__main__":
    main()
