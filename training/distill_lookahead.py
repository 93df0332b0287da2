"""Distil the shipped 80 ms audio encoder into a 60 ms one (`lookahead_samples` = 960).

Teacher: a checkpoint whose encoder looks ahead two whole frames (the `tiny` shipped before).
Student: the same model with the part-frame encoder (models/audio_encoder.py), every shared weight
copied; `part_in` starts as the least-squares map from a frame's first two mels to its features
(so the stand-in frame approximates x[t+2]). Only the audio encoder trains, to give the teacher's
tokens; generator, decoder and appearance are copied unchanged. Data: real speech from a real-data
folder (never a held-out identity) and espeak speech from training voices, with gain, noise and
codec damage (training/augment.py). Held-out speech (held-out identities, eval voices) measures the
token match before and after.

    nice -n 10 python -m edgetalk.training.distill_lookahead --out runs/lookahead60 --steps 3000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import default_checkpoint, load_checkpoint
from ..models.config import SAMPLES_PER_FRAME
from ..models.edgetalk import EdgeTalkModel
from . import augment, real_data, speech
from .loop import Run

LOOKAHEAD_SAMPLES = 960  # 60 ms
LICENSES = ("MIT", "Apache-2.0", "CC-BY-4.0")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run folder (resumes from it)")
    p.add_argument("--teacher", type=Path, help="80 ms checkpoint (default: the shipped tiny)")
    p.add_argument("--real", type=Path, default=Path("../shared/data/real"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of this call")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=40, help="frames per training crop")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--train",
        choices=("head", "all"),
        default="head",
        help="head: part_in, lookahead_conv and mix only (the whole-frame path stays the "
        "teacher's); all: the whole audio encoder",
    )
    p.add_argument("--synth", type=int, default=120, help="espeak utterances in the pool")
    p.add_argument(
        "--motion-data",
        type=Path,
        default=Path("runs/data/motion_train_900.npz"),
        help="synthetic speech + motion clips of the motion stage (train_motion builds them); "
        "the frozen generator's flow loss through the student's tokens (absent: tokens only)",
    )
    p.add_argument("--motion-weight", type=float, default=1.0)
    p.add_argument("--motion-batch", type=int, default=8)
    p.add_argument("--motion-frames", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- data ---------------------------------------------------------------------------------------
def _real(root: Path, split: str) -> tuple[list[np.ndarray], list[str]]:
    items = real_data.videos(root, split)
    if split == "train":
        items += real_data.speech_only(root)
    items = [i for i in items if i.license in LICENSES]
    return [real_data.read_speech(i.audio) for i in items], sorted({i.id for i in items})


def _synth(n: int, split: str, seed: int) -> list[np.ndarray]:
    if not n or not speech.available():
        return []
    rng = np.random.default_rng(seed)
    return [
        speech.random_utterance(rng, speech.random_voice(rng, split)).audio.astype(np.float32)
        for _ in range(n)
    ]


def pools(args) -> tuple[dict, dict]:
    """(train, held-out) audio, cached in the run folder so a resume does not re-synthesize."""
    cache = args.out / "pool.npz"
    if cache.exists():
        z = np.load(cache)
        meta = json.loads(str(z["meta"]))
        split = lambda k: [z[f"{k}_{i}"] for i in range(meta[k])]  # noqa: E731
        return (
            {"clips": split("train"), "ids": meta["train_ids"]},
            {"real": split("held_real"), "synth": split("held_synth"), "ids": meta["held_ids"]},
        )
    train, train_ids = _real(args.real, "train")
    train += _synth(args.synth, "train", args.seed)
    held_real, held_ids = _real(args.real, "eval")
    held_synth = _synth(max(8, args.synth // 8), "eval", args.seed + 1)
    arrays = {f"train_{i}": a for i, a in enumerate(train)}
    arrays |= {f"held_real_{i}": a for i, a in enumerate(held_real)}
    arrays |= {f"held_synth_{i}": a for i, a in enumerate(held_synth)}
    meta = {
        "train": len(train),
        "held_real": len(held_real),
        "held_synth": len(held_synth),
        "train_ids": train_ids,
        "held_ids": held_ids,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, meta=json.dumps(meta), **arrays)
    return (
        {"clips": train, "ids": train_ids},
        {"real": held_real, "synth": held_synth, "ids": held_ids},
    )


def batch(clips: list[np.ndarray], b: int, t: int, rng: np.random.Generator):
    """Random crops: own voice (damaged half the time), partner voice or silence, a talk mask."""
    n = t * SAMPLES_PER_FRAME

    def crop() -> np.ndarray:
        x = clips[int(rng.integers(len(clips)))]
        if len(x) < n:
            x = np.pad(x, (0, n - len(x)))
        s = int(rng.integers(len(x) - n + 1))
        return x[s : s + n].astype(np.float32)

    pcm = np.zeros((b, 2, n), np.float32)
    mask = np.ones((b, t), np.float32)
    for i in range(b):
        own = crop()
        pcm[i, 0] = augment.degrade(own, rng) if rng.random() < 0.5 else own
        if rng.random() < 0.3:
            pcm[i, 1] = crop() * rng.uniform(0.1, 1.0)
            cut = int(rng.integers(t))
            mask[i, cut:] = 0.0  # the avatar stops talking and listens
    return torch.from_numpy(pcm), torch.from_numpy(mask)


def motion_loss(teacher, student, pcm, mask, motion, g: torch.Generator) -> torch.Tensor:
    """The motion stage's flow loss with the generator frozen (teacher-forced context), plus the
    same velocity with the teacher's tokens as a second target: the encoder learns what the
    generator needs from it (p/b/m closures come from a few frames of audio) and stays near the
    teacher where the ground truth cannot say."""
    from .train_motion import LOSS_WEIGHT, chunk_times

    gen = student.generator
    b, t = mask.shape
    ref = torch.zeros(b, student.cfg.motion_dim)
    x1 = gen.normalize(motion)
    x0 = torch.randn(x1.shape, generator=g)
    sigma = torch.rand(b, 1, 1, generator=g) * 0.3
    clean = gen.denormalize(x1 + sigma * torch.randn(x1.shape, generator=g))
    tt = chunk_times(b, t, student.cfg.chunk, student.cfg.generator.steps, g)
    xt = (1 - tt[..., None]) * x0 + tt[..., None] * x1
    weight = torch.from_numpy(LOSS_WEIGHT)
    with torch.no_grad():
        v_teacher = teacher.generator.forward_parallel(
            teacher.audio.encode_sequence(pcm, mask), mask, ref, clean, xt, tt
        )
    v = gen.forward_parallel(student.audio.encode_sequence(pcm, mask), mask, ref, clean, xt, tt)
    truth = (((v - (x1 - x0)) ** 2) * weight).mean()
    return truth + (((v - v_teacher) ** 2) * weight).mean()


# ---- models -------------------------------------------------------------------------------------
def student_from(teacher: EdgeTalkModel) -> EdgeTalkModel:
    """The teacher's model with the 60 ms encoder: every shared tensor copied."""
    cfg = teacher.cfg
    audio = dataclasses.replace(cfg.audio, lookahead_samples=LOOKAHEAD_SAMPLES)
    cfg = dataclasses.replace(cfg, audio=audio).validate()
    student = EdgeTalkModel(cfg)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("audio.part_in.") for k in missing):
        raise SystemExit(f"teacher does not fit the student ({missing[:3]}, {unexpected[:3]})")
    return student


@torch.no_grad()
def init_part_in(student: EdgeTalkModel, clips: list[np.ndarray]) -> float:
    """Least squares from a frame's first r mels to frame_in of all its mels; returns R^2."""
    enc = student.audio
    h, r = enc.frame_in.out_features, enc.part
    xs, ys = [], []
    for x in clips[:200]:
        pcm = torch.from_numpy(np.concatenate([np.zeros(enc.pcm_context, np.float32), x]))[None]
        frames = enc._whole_frames(enc.log_mel(pcm))[0]  # [T, 4*mels]
        xs.append(frames[:, : r * enc.cfg.audio.n_mels])
        ys.append(enc.frame_in(frames))
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    ridge = 1e-3 * torch.eye(x1.shape[1], dtype=x.dtype) * len(x)
    w = torch.linalg.solve(x1.T @ x1 + ridge, x1.T @ y)  # [r*mels + 1, H]
    enc.part_in.weight.copy_(w[:-1].T.float())
    enc.part_in.bias.copy_(w[-1].float())
    resid = y - x1 @ w
    assert resid.shape[1] == h
    return float(1 - resid.pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@torch.no_grad()
def token_match(teacher: EdgeTalkModel, student: EdgeTalkModel, clips: list[np.ndarray]) -> dict:
    """Teacher vs student tokens over whole clips (own voice, talking): mean cosine, MSE, and
    MSE relative to the teacher tokens' variance."""
    cos, se, var, n = 0.0, 0.0, 0.0, 0
    for x in clips:
        t = len(x) // SAMPLES_PER_FRAME
        if t < 2:
            continue
        pcm = torch.zeros(1, 2, t * SAMPLES_PER_FRAME)
        pcm[0, 0] = torch.from_numpy(x[: t * SAMPLES_PER_FRAME])
        mask = torch.ones(1, t)
        a = teacher.audio.encode_sequence(pcm, mask)[0]
        b = student.audio.encode_sequence(pcm, mask)[0]
        cos += torch.nn.functional.cosine_similarity(a, b, dim=1).sum().item()
        se += (a - b).pow(2).mean(1).sum().item()
        var += (a - a.mean(0)).pow(2).mean(1).sum().item()
        n += t
    n = max(n, 1)
    return {"cosine": cos / n, "mse": se / n, "rel_mse": se / max(var, 1e-12), "frames": n}


def held_out_report(teacher, student, held) -> dict:
    return {k: token_match(teacher, student, held[k]) for k in ("real", "synth")}


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    teacher_path = args.teacher or default_checkpoint()
    teacher, meta = load_checkpoint(teacher_path)
    if teacher.audio.part or teacher.cfg.lookahead_samples != 2 * SAMPLES_PER_FRAME:
        raise SystemExit(
            f"{teacher_path} has a {teacher.cfg.lookahead_ms:g} ms lookahead; the teacher is the "
            "80 ms (two whole frames) model: pass --teacher with the old weights"
        )
    teacher.requires_grad_(False)
    train, held = pools(args)
    print(
        f"pool: {len(train['clips'])} training clips, held out {len(held['real'])} real + "
        f"{len(held['synth'])} synthetic",
        flush=True,
    )

    student = student_from(teacher)
    fresh = not (args.out / "model.safetensors").exists()
    if fresh:
        r2 = init_part_in(student, train["clips"])
        before = held_out_report(teacher, student, held)
        (args.out / "before.json").write_text(json.dumps({"part_in_r2": r2, **before}, indent=1))
        print(f"init: part_in R^2 {r2:.3f}; held out {json.dumps(before)}", flush=True)
    student.requires_grad_(False)
    enc = student.audio
    parts = [enc] if args.train == "all" else [enc.part_in, enc.lookahead_conv, enc.mix]
    params = [p for m in parts for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    run = Run(args.out, student, params, args.lr, args.steps)
    student.train()
    teacher.eval()
    rng = np.random.default_rng(args.seed + run.step)
    g = torch.Generator().manual_seed(args.seed + run.step)
    sampler = None
    if args.motion_data and args.motion_data.exists() and args.motion_weight > 0:
        from .train_motion import WindowSampler

        with np.load(args.motion_data, allow_pickle=False) as z:
            sampler = WindowSampler({k: z[k] for k in z.files}, args.motion_frames, args.seed)
        sampler.rng = np.random.default_rng(args.seed + run.step)
    deadline = time.time() + args.minutes * 60
    info = _info(meta, args, train["ids"])
    while run.step < args.steps and time.time() < deadline:
        pcm, mask = batch(train["clips"], args.batch, args.frames, rng)
        with torch.no_grad():
            want = teacher.audio.encode_sequence(pcm, mask)
        got = student.audio.encode_sequence(pcm, mask)
        tok = (got - want).pow(2).mean() / want.var().clamp_min(1e-6)
        mot = torch.zeros(())
        if sampler is not None:
            mot = motion_loss(teacher, student, *sampler.sample(args.motion_batch), g)
        loss = tok + args.motion_weight * mot
        run.update(loss)
        if run.step % 50 == 0:
            run.log(loss=loss.item(), tokens=tok.item(), motion=mot.item())
        if run.step % 250 == 0:
            run.save(**info)
    run.save(**info)
    student.eval()
    after = held_out_report(teacher, student, held)
    (args.out / "after.json").write_text(json.dumps({"step": run.step, **after}, indent=1))
    print(f"step {run.step}: held out {json.dumps(after)}", flush=True)


def _info(meta: dict, args, ids: list[str]) -> dict:
    """The teacher's metadata with this stage added (the recipe line travels with the weights)."""
    keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "config")}
    return keep | {
        "recipe": keep.get("recipe", "") + " + training/distill_lookahead.py (60 ms lookahead)",
        "lookahead_stage": (
            f"60 ms audio encoder distilled from the 80 ms one: {args.steps} steps, batch "
            f"{args.batch} x {args.frames} frames, lr {args.lr}, trained: {args.train}, seed "
            f"{args.seed}; real speech "
            f"({len(ids)} items, MIT/Apache-2.0/CC-BY-4.0, no held-out identity) + "
            f"{args.synth} espeak utterances, augment.degrade on half; motion loss x"
            f"{args.motion_weight} (frozen generator, flow to ground truth + to the teacher's "
            f"velocity) on {args.motion_batch} x {args.motion_frames}-frame windows of "
            f"{args.motion_data.name if args.motion_data else '-'}"
        ),
    }


if __name__ == "__main__":
    main()
