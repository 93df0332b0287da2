"""Fit the mouth readout (models/mouth_readout.py) to real video and write a checkpoint with it.

Ridge regression, one map per MOUTH parameter, from the readout's own features (the encoder's
log-mels, the gated running mean, PAST frames before and AHEAD after: `audio_probe.features`) to
the motion fitted to the training clips' faces (`fit_motion --split all`; held-out identities are
never read). The predictions are rescaled to the labels' spread (ridge shrinks them), and the
standardization, the scale and the mean are folded into the one Linear layer the model runs.
Seconds on a CPU; no training of the network, whose weights are copied unchanged.

    python -m edgetalk.training.fit_readout --labels runs/real_labels --out runs/readout.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from ..errors import EdgeTalkError, InputError
from ..models.constants import READOUT_NORM_S
from ..models.motion import INDEX, MOUTH


def fit_maps(
    train: list, lam: float, match_spread: bool = True, extra: list | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """train: [(id, pcm, motion [T, 16])] -> the Linear's (weight [5, F], bias [5]). `extra`
    (the synthetic espeak clips) is fitted too, weighted so that both sets count alike."""
    from .audio_probe import features, log_mels

    sets = [train] + ([extra] if extra else [])
    xs_, ys_, ws_ = [], [], []
    for clips in sets:
        x = np.concatenate([features(log_mels(a, len(m)), READOUT_NORM_S) for _, a, m in clips])
        xs_.append(x)
        ys_.append(np.concatenate([m for _, _, m in clips]).astype(np.float64))
        ws_.append(np.full(len(x), 1.0 / len(x)))
    x, motion = np.concatenate(xs_), np.concatenate(ys_)
    sw = np.concatenate(ws_)
    sw = sw / sw.mean()  # sample weights, mean 1
    mu = (sw[:, None] * x).sum(0) / sw.sum()
    sd = np.sqrt((sw[:, None] * (x - mu) ** 2).sum(0) / sw.sum()) + 1e-6
    xs = (x - mu) / sd
    gram = (xs * sw[:, None]).T @ xs + lam * np.eye(x.shape[1])
    weight, bias = [], []
    for name in MOUTH:
        y = motion[:, INDEX[name]]
        y_mean = float((sw * y).sum() / sw.sum())
        w = np.linalg.solve(gram, (xs * sw[:, None]).T @ (y - y_mean))
        pred = xs @ w
        y_sd = np.sqrt((sw * (y - y_mean) ** 2).sum() / sw.sum())
        p_sd = np.sqrt((sw * (pred - (sw * pred).sum() / sw.sum()) ** 2).sum() / sw.sum())
        gain = y_sd / (p_sd + 1e-12) if match_spread else 1.0
        weight.append(gain * w / sd)
        bias.append(y_mean - gain * float((mu / sd) @ w))
    return np.stack(weight), np.array(bias)


def with_readout(checkpoint: Path | None, weight: np.ndarray, bias: np.ndarray, mix: float):
    """The checkpoint's model with a readout of these weights and this mix (nothing else moved)."""
    import torch

    from ..models.checkpoint import default_checkpoint, load_checkpoint
    from ..models.edgetalk import EdgeTalkModel

    base, _ = load_checkpoint(checkpoint or default_checkpoint())
    cfg = dataclasses.replace(base.cfg, audio=dataclasses.replace(base.cfg.audio, readout_mix=mix))
    model = EdgeTalkModel(cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("audio.readout.") for k in missing):
        raise InputError(f"{checkpoint}: its weights do not fit this model ({missing[:3]})")
    lin = model.audio.readout.linear
    if tuple(lin.weight.shape) != weight.shape:
        raise InputError(
            f"the labels' features are {weight.shape[1]} wide, the model's readout takes "
            f"{lin.weight.shape[1]} (a different audio front end)"
        )
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight).float())
        lin.bias.copy_(torch.from_numpy(bias).float())
    return model.eval()


def main(argv=None) -> int:
    from ..models.checkpoint import save_checkpoint
    from .audio_probe import load

    ap = argparse.ArgumentParser(
        prog="python -m edgetalk.training.fit_readout", description=__doc__
    )
    ap.add_argument("--labels", type=Path, default=Path("runs/real_labels"))
    ap.add_argument("--checkpoint", type=Path, help="the weights to add it to (default: shipped)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lam", type=float, default=3e4, help="ridge penalty (standardized features)")
    ap.add_argument("--mix", type=float, default=1.0, help="AudioConfig.readout_mix, 0..1")
    ap.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="also fit N synthetic espeak clips (train voices, 6 s, cached in runs/), weighted as "
        "much as the real set: the readout must keep espeak's p/b/m closures too",
    )
    args = ap.parse_args(argv)
    try:
        if not 0 < args.mix <= 1:
            raise InputError(f"--mix must be in (0, 1], got {args.mix:g}")
        train, held_out = load(args.labels)
        print(f"{len(train)} training clips ({len(held_out)} held out, not read)")
        extra = None
        if args.synthetic:
            from .train_motion import build_motion_set

            cache = Path("runs") / f"readout_synth_{args.synthetic}.npz"
            syn = build_motion_set(cache, args.synthetic, seed=5150, split="train")
            extra = [
                (f"s{i}", a, m)
                for i, (a, m) in enumerate(zip(syn["own"], syn["motion"], strict=True))
            ]
            print(f"{len(extra)} synthetic clips ({cache})")
        weight, bias = fit_maps(train, args.lam, extra=extra)
        model = with_readout(args.checkpoint, weight, bias, args.mix)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            model,
            args.out,
            readout=f"ridge lam {args.lam:g} on {len(train)} clips of {args.labels.name}",
        )
        print(f"wrote {args.out} (readout_mix {args.mix:g})")
    except EdgeTalkError as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    main()
