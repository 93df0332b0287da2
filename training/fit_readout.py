"""Fit the mouth readout (models/mouth_readout.py) to real video and write a checkpoint with it.

Ridge regression, one map per MOUTH parameter, from what the readout reads (the encoder's
log-mels, the gated running mean, PAST frames before and AHEAD after: `audio_probe.features`; and
the checkpoint's own-voice encoder features, so refit after retraining the encoder) to the motion
fitted to the training clips' faces (`fit_motion --split all`; held-out identities are never
read), and with --synthetic to espeak clips' motion too. The predictions are rescaled to the
labels' spread (ridge shrinks them; the jaw's to --jaw-spread times it, past the decoder's dead
zone), and the standardization, the scale and the mean are folded into the one Linear layer the
model runs.
Seconds on a CPU; no training of the network, whose weights are copied unchanged.

    python -m edgetalk.training.fit_readout --labels runs/real_labels --out runs/readout.safetensors

`--av-sync --real DIR` first removes each training clip's audio/video offset (training/av_sync.py):
web video is often 1-6 frames off, and an offset clip teaches a blurred map.

`--score` also says how well such a fit follows mouths it was not fitted on, at the label level
(the readout's mouth against the fitted motion, best lag within +-5 frames; no rendering):
the held-out identities' labels (read for this score only), an identity-grouped 5-fold
cross-validation over the training clips (with --real DIR, whose catalog names the identities),
and with --synthetic, espeak clips of held-out voices. MODEL_CARD.md ("How far the audio alone
goes") reads these numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from ..errors import EdgeTalkError, InputError
from ..models.config import SAMPLES_PER_FRAME
from ..models.constants import READOUT_NORM_S
from ..models.motion import INDEX, MOUTH


def readout_inputs(encoder, clips: list) -> list[np.ndarray]:
    """[(id, pcm, motion [T, 16])] -> per clip [T, F]: what the readout reads at each frame, the
    own voice's normalized log-mel context (`audio_probe.features`) and this encoder's own-voice
    features (a whole-clip pass, equal to streaming it)."""
    import torch

    from .audio_probe import features, log_mels

    out = []
    for _, a, m in clips:
        t = len(m)
        pcm = np.zeros((1, 2, t * SAMPLES_PER_FRAME), np.float32)
        x = a[: t * SAMPLES_PER_FRAME]
        pcm[0, 0, : len(x)] = x
        with torch.no_grad():
            own = encoder.encode_sequence(torch.from_numpy(pcm), torch.ones(1, t), True)[0]
        mel = features(log_mels(a, t), READOUT_NORM_S)
        out.append(np.concatenate([mel, own.double().numpy()], axis=1))
    return out


def fit_maps(
    x_sets: list,
    y_sets: list,
    lam: float,
    shares: list[float],
    match_spread: bool = True,
    jaw_spread: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression per MOUTH parameter. x_sets/y_sets: per data set, per clip [T, F] inputs
    and [T, 16] motion; each set weighs its share in all (not its frame count).
    -> the Linear's (weight [5, F], bias [5])."""
    ws_ = [
        np.full(sum(map(len, xs)), share / sum(map(len, xs)))
        for xs, share in zip(x_sets, shares, strict=True)
    ]
    x = np.concatenate([np.concatenate(xs) for xs in x_sets])
    motion = np.concatenate([np.concatenate(ys) for ys in y_sets]).astype(np.float64)
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
        if name == "jaw_open":
            gain *= jaw_spread
        weight.append(gain * w / sd)
        bias.append(y_mean - gain * float((mu / sd) @ w))
    return np.stack(weight), np.array(bias)


def label_score(weight: np.ndarray, bias: np.ndarray, xs: list, motions: list) -> list[float]:
    """Per clip: the best-lag correlation (within +-MAX_LAG) of the mouth signal of the labels
    with their mouth parameters replaced by this readout's (clamped to [0, 1] as the scheduler
    does), against the labels' own."""
    from . import metrics
    from .av_sync import predicted_mouth
    from .motion_proxy import MAX_LAG, mouth

    out = []
    for x, m in zip(xs, motions, strict=True):
        corr = metrics.lagged_corr(predicted_mouth(weight, bias, x, m), mouth(m), MAX_LAG)[1]
        out.append(float(corr) if np.isfinite(corr) else 0.0)
    return out


def identity_folds(ids: list[str], identity: dict, k: int = 5) -> list[list[int]]:
    """Clip indices in k folds, every identity whole in one fold (a voice is never on both sides)."""
    people = sorted({identity.get(i, i) for i in ids})
    return [
        [j for j, i in enumerate(ids) if identity.get(i, i) in people[f::k]]
        for f in range(min(k, len(people)))
    ]


def score(fit, whole, x_sets, y_sets, held_x, held_y, folds=None, espeak=None) -> dict:
    """fit(x_sets, y_sets) -> (weight, bias); whole: that fit on all of them. Mean label-level
    correlation: held out, per fold of the training clips (x_sets[0], refitted without the fold)
    when folds are given, and on espeak when given (xs, ys)."""
    out = {}
    if held_x:
        out["held_out"] = float(np.mean(label_score(*whole, held_x, held_y)))
    if espeak is not None:
        out["espeak"] = float(np.mean(label_score(*whole, *espeak)))
    if folds:
        per = []
        for fold, (w, b) in fold_fits(fit, x_sets, y_sets, folds):
            per += label_score(w, b, [x_sets[0][j] for j in fold], [y_sets[0][j] for j in fold])
        out["cv"] = float(np.mean(per))
    return out


def fold_fits(fit, x_sets: list, y_sets: list, folds: list[list[int]]):
    """Per fold of the real clips (x_sets[0]): (fold, fit without that fold's clips), every
    other set kept whole. What cross-validation and the A/V offset search (av_sync) score."""
    for fold in folds:
        keep = [j for j in range(len(x_sets[0])) if j not in fold]
        sub_x = [[x_sets[0][j] for j in keep], *x_sets[1:]]
        sub_y = [[y_sets[0][j] for j in keep], *y_sets[1:]]
        yield fold, fit(sub_x, sub_y)


def with_readout(base, weight: np.ndarray, bias: np.ndarray, mix: float):
    """The base model with a readout of these weights and this mix (nothing else moved)."""
    import torch

    from ..models.edgetalk import EdgeTalkModel

    cfg = dataclasses.replace(base.cfg, audio=dataclasses.replace(base.cfg.audio, readout_mix=mix))
    model = EdgeTalkModel(cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("audio.readout.") for k in missing):
        raise InputError(f"the checkpoint's weights do not fit this model ({missing[:3]})")
    lin = model.audio.readout.linear
    if tuple(lin.weight.shape) != weight.shape:
        raise InputError(
            f"the fitted features are {weight.shape[1]} wide, the model's readout takes "
            f"{lin.weight.shape[1]} (a different audio front end)"
        )
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight).float())
        lin.bias.copy_(torch.from_numpy(bias).float())
    return model.eval()


def without_readout(base):
    """The base model with its mouth readout removed (readout_mix 0, nothing else moved). The
    readout reads the encoder's features, so retraining the encoder leaves it stale: a training
    run starts without it, and fit_readout fits a new one afterwards."""
    from ..models.edgetalk import EdgeTalkModel

    cfg = dataclasses.replace(base.cfg, audio=dataclasses.replace(base.cfg.audio, readout_mix=0.0))
    model = EdgeTalkModel(cfg)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("audio.readout.")}
    model.load_state_dict(state)  # strict: only the readout may go
    return model


def main(argv=None) -> int:
    from ..models.checkpoint import default_checkpoint, load_checkpoint, save_checkpoint
    from .audio_probe import load

    ap = argparse.ArgumentParser(
        prog="python -m edgetalk.training.fit_readout", description=__doc__
    )
    ap.add_argument("--labels", type=Path, default=Path("runs/real_labels"))
    ap.add_argument("--checkpoint", type=Path, help="the weights to add it to (default: shipped)")
    ap.add_argument("--out", type=Path, help="where to write the weights (optional with --score)")
    ap.add_argument(
        "--score",
        action="store_true",
        help="print the fit's label-level scores on clips it did not fit (held-out identities, "
        "identity-grouped cross-validation with --real, espeak's held-out voices with --synthetic)",
    )
    ap.add_argument("--real", type=Path, help="with --score: the real-data folder (catalog.json)")
    ap.add_argument("--lam", type=float, default=3e4, help="ridge penalty (standardized features)")
    ap.add_argument("--mix", type=float, default=1.0, help="AudioConfig.readout_mix, 0..1")
    ap.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="also fit N synthetic espeak clips (train voices, 6 s, cached in runs/): the readout "
        "must keep espeak's p/b/m closures too",
    )
    ap.add_argument(
        "--real-share",
        type=float,
        default=0.5,
        help="with --synthetic: the real clips' share of the fit's weight (0.5: both sets alike)",
    )
    ap.add_argument(
        "--jaw-spread",
        type=float,
        default=1.0,
        metavar="S",
        help="the jaw's predictions at S times the labels' spread (about their mean; 1: the "
        "labels' own). The decoder draws small jaw changes as no change (a closed-mouth photo "
        "parts its lips from jaw 0.2-0.4), so a conditional mean that hovers in that dead zone "
        "shows a still mouth; S is chosen on the training clips' pixels",
    )
    ap.add_argument(
        "--av-sync",
        action="store_true",
        help="first find each training clip's audio/video offset (the readout's mouth against "
        "the clip's, fitted without the clip's identity; training/av_sync.py) and fit the "
        "re-aligned pairs; needs --real DIR for the identities",
    )
    ap.add_argument(
        "--clip-norm",
        action="store_true",
        help="fit each real clip's mouth in its own units: every mouth parameter standardized per "
        "clip, then put back on the real clips' pooled mean and spread (people open their mouths "
        "differently wide, and each clip's labels are relative to its own reference frame)",
    )
    args = ap.parse_args(argv)
    try:
        if not 0 < args.mix <= 1:
            raise InputError(f"--mix must be in (0, 1], got {args.mix:g}")
        if not 0 < args.jaw_spread <= 4:
            raise InputError(f"--jaw-spread must be in (0, 4], got {args.jaw_spread:g}")
        if not 0 < args.real_share <= 1:
            raise InputError(f"--real-share must be in (0, 1], got {args.real_share:g}")
        if args.out is None and not args.score:
            raise InputError("give --out (where to write the weights), --score, or both")
        if args.av_sync and args.real is None:
            raise InputError(
                "--av-sync needs --real DIR: its catalog's identities keep each person out of "
                "the fit that finds their clips' offsets"
            )
        train, held_out = load(args.labels)
        print(f"{len(train)} training clips ({len(held_out)} held out, not fitted)")
        base, meta = load_checkpoint(args.checkpoint or default_checkpoint())
        base.eval()
        sets = [train]
        if args.synthetic:
            from .train_motion import build_motion_set

            cache = Path("runs") / f"readout_synth_{args.synthetic}.npz"
            syn = build_motion_set(cache, args.synthetic, seed=5150, split="train")
            sets.append(
                [
                    (f"s{i}", a, m)
                    for i, (a, m) in enumerate(zip(syn["own"], syn["motion"], strict=True))
                ]
            )
            print(f"{len(sets[1])} synthetic clips ({cache})")
        shares = [args.real_share, 1 - args.real_share][: len(sets)]
        x_sets = [readout_inputs(base.audio, clips) for clips in sets]
        y_sets = [[m for _, _, m in clips] for clips in sets]

        def fit(xs, ys):
            return fit_maps(xs, ys, args.lam, shares, jaw_spread=args.jaw_spread)

        offsets = None
        if args.av_sync:
            offsets = align(args.real, train, x_sets, y_sets, fit)
        if args.clip_norm:
            y_sets[0] = clip_normalized(y_sets[0])
        weight, bias = fit(x_sets, y_sets)
        if args.score:
            print_scores(args, base, fit, (weight, bias), x_sets, y_sets, train, held_out)
        if args.out is None:
            return 0
        model = with_readout(base, weight, bias, args.mix)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        what = f"ridge lam {args.lam:g} on {len(train)} clips of {args.labels.name}"
        if args.jaw_spread != 1:
            what += f", jaw spread x{args.jaw_spread:g}"
        if args.clip_norm:
            what += ", mouth standardized per clip"
        if offsets:
            what += ", A/V-aligned (" + ", ".join(f"{k} {v:+d}" for k, v in offsets.items()) + ")"
        if args.synthetic:
            what += f" (share {args.real_share:g}) and {args.synthetic} espeak clips"
        # the base's history and recipe stay with the weights (save_checkpoint writes the config)
        kept = {k: v for k, v in meta.items() if k not in ("format", "format_version", "config")}
        save_checkpoint(model, args.out, **{**kept, "readout": what})
        print(f"wrote {args.out} (readout_mix {args.mix:g})")
    except EdgeTalkError as e:
        sys.exit(f"error: {e}")
    return 0


def clip_normalized(motions: list[np.ndarray]) -> list[np.ndarray]:
    """Each clip's MOUTH parameters standardized over the clip, then mapped onto the pooled mean
    and spread of all of them, so the fit's scale (and the readout's output range) is kept.
    What a speaker does relative to their own range is what the audio can tell; how wide they
    open at all, and where their reference frame sat, it cannot."""
    cols = [INDEX[n] for n in MOUTH]
    pooled = np.concatenate([np.asarray(m, np.float64)[:, cols] for m in motions])
    mu, sd = pooled.mean(0), pooled.std(0)
    out = []
    for m in motions:
        m = np.array(m, np.float64)
        own = m[:, cols]
        m[:, cols] = (own - own.mean(0)) / np.maximum(own.std(0), 1e-6) * sd + mu
        out.append(m)
    return out


def align(real: Path, train: list, x_sets: list, y_sets: list, fit) -> dict[str, int]:
    """Re-pair each real training clip's voice and mouth at its A/V offset (training/av_sync.py),
    in place in x_sets[0] / y_sets[0]. -> {clip id: offset in frames} of the clips moved."""
    from . import av_sync
    from .real_data import videos

    ids = [cid for cid, _, _ in train]
    identity = {i.id: i.identity for i in videos(real, "train")}
    if len({identity.get(i, i) for i in ids}) < 2:
        raise InputError(
            "--av-sync needs training clips of at least two people: each clip's offset is found "
            "by a fit on the other people's clips"
        )
    lags = av_sync.anchored(
        ids, av_sync.clip_offsets(fit, x_sets, y_sets, identity_folds(ids, identity))
    )
    pairs = [av_sync.shift(x, y, lag) for x, y, lag in zip(x_sets[0], y_sets[0], lags, strict=True)]
    x_sets[0], y_sets[0] = [x for x, _ in pairs], [y for _, y in pairs]
    moved = {i: lag for i, lag in zip(ids, lags, strict=True) if lag}
    print(
        f"A/V offsets (frames, voice late > 0; GRID's median is 0): {len(moved)} of {len(ids)} "
        "clips moved" + (": " + ", ".join(f"{k} {v:+d}" for k, v in moved.items()) if moved else "")
    )
    return moved


def print_scores(args, base, fit, whole, x_sets, y_sets, train, held_out) -> None:
    folds = espeak = None
    if args.real is not None:
        from .real_data import videos

        identity = {i.id: i.identity for i in videos(args.real, "train")}
        folds = identity_folds([cid for cid, _, _ in train], identity)
    if args.synthetic:
        from .train_motion import build_motion_set

        cache = Path("runs") / "readout_synth_eval40.npz"  # held-out voices (split "eval")
        syn = build_motion_set(cache, 40, seed=9090, split="eval")
        clips = [
            (f"e{i}", a, m) for i, (a, m) in enumerate(zip(syn["own"], syn["motion"], strict=True))
        ]
        espeak = (readout_inputs(base.audio, clips), [m for _, _, m in clips])
    held_x = readout_inputs(base.audio, held_out)
    got = score(fit, whole, x_sets, y_sets, held_x, [m for _, _, m in held_out], folds, espeak)
    names = {"held_out": "held-out identities", "cv": "5-fold CV by identity", "espeak": "espeak"}
    print(
        "label-level corr: "
        + ", ".join(f"{names[k]} {v:.3f}" for k, v in got.items())
        + ("" if folds else " (CV needs --real DIR)"),
        flush=True,
    )


if __name__ == "__main__":
    main()
