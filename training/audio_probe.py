"""A linear probe: how much of the real mouth can the audio features explain on unseen speakers?

Ridge regression from a few frames of log-mel (the audio encoder's own front end, 4 mel hops per
video frame) to the mouth signal of the motion fitted to real video (`motion_proxy.mouth`),
trained on the training clips' labels and scored on the held-out identities with the proxy's
score (best-lag correlation within +-5 frames). No network, no sampling noise, seconds to run: it
tells what the features carry before a model is trained on them. It is how the running log-mel
mean (`AudioConfig.mel_norm_s`) was chosen: on raw log-mels the probe reaches about the trained
generator's score, on normalized ones far more.

    python -m edgetalk.training.audio_probe --labels runs/real_labels

Labels come from `python -m edgetalk.training.fit_motion --real DIR --split all`.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import EdgeTalkError, InputError
from ..models.config import SAMPLE_RATE, ModelConfig
from ..models.constants import READOUT_AHEAD as AHEAD  # noqa: E402  (the readout's context)
from ..models.constants import READOUT_PAST as PAST  # noqa: E402
from . import metrics
from .motion_proxy import MAX_LAG, mouth


def log_mels(pcm: np.ndarray, frames: int) -> np.ndarray:
    """[frames, 4 * n_mels]: the encoder's own log-mel front end (`AudioEncoder.log_mel`, from a
    zero history), 4 hops per frame (zero-padded)."""
    import torch

    enc = _encoder()
    x = np.pad(pcm.astype(np.float32), (enc.pcm_context, 0))
    with torch.no_grad():
        mel = enc.log_mel(torch.from_numpy(x)[None])[0].double().numpy()
    per = enc.mels_per_frame
    mel = np.pad(mel, ((0, max(0, frames * per - len(mel))), (0, 0)))[: frames * per]
    return mel.reshape(frames, -1)


@lru_cache(maxsize=1)
def _encoder():
    from ..models.audio_encoder import AudioEncoder

    return AudioEncoder(ModelConfig())


def normalized(mel: np.ndarray, seconds: float, hop: int = 160, per: int = 4) -> np.ndarray:
    """The encoder's own normalization (`normalize_mels`: gated running mean, from a cold start)
    of [frames, per*M] log-mels, per mel hop."""
    import torch

    from ..models.audio_encoder import normalize_mels

    m = torch.from_numpy(mel.reshape(len(mel) * per, -1)).float()[None]
    d = math.exp(-hop / SAMPLE_RATE / seconds)
    out, _ = normalize_mels(m, torch.zeros(1, m.shape[2] + 1), m.shape[1], d)
    return out[0].double().numpy().reshape(mel.shape)


def features(mel: np.ndarray, norm_s: float) -> np.ndarray:
    """Context of PAST frames before and AHEAD after each frame, optionally mean-normalized."""
    if norm_s:
        mel = normalized(mel, norm_s)
    padded = np.pad(mel, ((PAST, AHEAD), (0, 0)), mode="edge")
    n = len(mel)
    return np.concatenate([padded[i : i + n] for i in range(PAST + AHEAD + 1)], axis=1)


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    w = np.linalg.solve(xs.T @ xs + lam * np.eye(x.shape[1]), xs.T @ (y - y.mean()))
    return lambda z: ((z - mu) / sd) @ w


def smooth(x: np.ndarray) -> np.ndarray:
    return np.convolve(np.pad(x, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")


def probe(train: list, held_out: list, norm_s: float, lam: float) -> dict:
    """train/held_out: [(id, pcm, motion [T, 16])]. Mean held-out best-lag correlation."""
    feats = {cid: features(log_mels(a, len(m)), norm_s) for cid, a, m in train + held_out}
    predict = fit_ridge(
        np.concatenate([feats[cid] for cid, _, _ in train]),
        np.concatenate([mouth(m) for _, _, m in train]),
        lam,
    )
    rows = {}
    for cid, _, m in held_out:
        lag, corr = metrics.lagged_corr(smooth(predict(feats[cid])), mouth(m), MAX_LAG)
        rows[cid] = (float(corr) if np.isfinite(corr) else 0.0, int(lag))
    return {"corr": float(np.mean([c for c, _ in rows.values()])), "clips": rows}


def load(labels: Path) -> tuple[list, list]:
    from .fit_motion import load_labels

    train, held_out = [], []
    for path in sorted(labels.glob("*.npz")):
        lab = load_labels(path)
        item = (path.stem, lab["audio"].astype(np.float32), lab["motion"])
        (held_out if bool(lab["held_out"]) else train).append(item)
    if not train or not held_out:
        raise InputError(
            f"{labels}: needs fitted labels of training and held-out clips "
            "(python -m edgetalk.training.fit_motion --real DIR --split all)"
        )
    return train, held_out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m edgetalk.training.audio_probe", description=__doc__
    )
    ap.add_argument("--labels", type=Path, default=Path("runs/real_labels"))
    ap.add_argument("--norm", type=float, nargs="+", default=[0.0, 0.5, 2.0, 10.0])
    ap.add_argument("--lam", type=float, nargs="+", default=[1e3, 1e4, 3e4])
    ap.add_argument("--per-clip", action="store_true")
    args = ap.parse_args(argv)
    try:
        train, held_out = load(args.labels)
        print(f"{len(train)} training clips, {len(held_out)} held out")
        print(
            f"{'mel_norm_s':>10} "
            + " ".join(f"{'lam ' + format(lam, 'g'):>10}" for lam in args.lam)
        )
        for norm in args.norm:
            res = [probe(train, held_out, norm, lam) for lam in args.lam]
            print(f"{norm:>10g} " + " ".join(f"{r['corr']:>10.3f}" for r in res), flush=True)
            if args.per_clip:
                best = max(res, key=lambda r: r["corr"])
                for cid, (c, lag) in best["clips"].items():
                    print(f"    {cid:<28} {c:+.3f} lag {lag:+d}")
    except EdgeTalkError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
