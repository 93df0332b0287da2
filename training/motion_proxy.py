"""A fast motion-level proxy for the real eval: does the generator's mouth follow real speech?

For each held-out real clip, the clip's own speech streams through the audio encoder and the
generator exactly as the runtime does (`StreamScheduler`, torch backend), but the decoder is not
run (rendering is the costly part), and the motion it would have shown is compared with the
motion fitted to the real video (`fit_motion`, relative to the most closed mouth, cached once).
Per clip: best-lag Pearson correlation of the mouth signal (jaw_open - 0.5 lip_press, smoothed
[1, 2, 1] / 4), the lag, and the range ratio (p90 - p10, generated over fitted). Where a clip
starts in silence, the generated mouth over its silent lead is reported too: fine-tuned
checkpoints opened the mouth there (a closed mouth is <= 0 in these units).

    python -m edgetalk.training.motion_proxy --checkpoint X [--checkpoint Y ...] --real DIR

`--condition quiet|phone|noisy` scores the same clips with their speech 20 dB down, band-limited
to a call's 300-3400 Hz, or under noise at -45 dBFS (the silent lead is still found on the clean
speech). Scores are averaged over a few noise seeds (`--seeds`, default 3; the table's sd is the spread
of the 10-clip mean between seeds). It does not replace `edgetalk eval --real` (pixels, the
decoder, identity), it only ranks generator checkpoints, in well under a minute each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeTalkError, InputError
from ..models.config import SAMPLES_PER_FRAME
from ..models.motion import INDEX
from . import metrics
from .augment import band_pass

MAX_LAG = 5  # frames either way, as the real eval
LEAD_FRAMES = 12  # the first 0.5 s: where a stream that starts in silence must keep the mouth shut
SILENT_DB = -35.0  # a frame counts as silence below this (RMS, dBFS) ...
SILENT_BELOW = 25.0  # ... and this far below the clip's p90 loudness
OPEN_AT_START = 0.1  # mouth signal above this in a silent lead = the mouth opened in silence
SHIPPED = "shipped"


def mouth(motion: np.ndarray) -> np.ndarray:
    """jaw_open - 0.5 lip_press per frame, smoothed [1, 2, 1] / 4 (edges repeated); raw units."""
    m = np.asarray(motion, np.float64)
    x = m[:, INDEX["jaw_open"]] - 0.5 * m[:, INDEX["lip_press"]]
    return np.convolve(np.pad(x, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")


def quiet_frames(pcm: np.ndarray) -> np.ndarray:
    """[T] bool: silent frames, SILENT_BELOW dB under the clip's loud frames (p90) and under
    SILENT_DB (recordings carry room noise: GRID's pauses sit at -45 to -50 dBFS)."""
    db = metrics.loudness_db(pcm, len(pcm) // SAMPLES_PER_FRAME)
    return db < min(np.percentile(db, 90) - SILENT_BELOW, SILENT_DB)


def silent_lead(pcm: np.ndarray, frames: int = LEAD_FRAMES) -> int:
    """How many of the first `frames` frames are silent before the first voiced one."""
    loud = ~quiet_frames(pcm)[:frames]
    return int(np.argmax(loud)) if loud.any() else len(loud)


def score_clip(generated: np.ndarray, fitted: np.ndarray, lead: int = 0) -> dict:
    """Proxy scores of one clip's generated motion [T, 16] against its fitted motion [T, 16]."""
    n = min(len(generated), len(fitted))
    if n < 2 * MAX_LAG + 3:
        raise InputError(f"{n} frames are too few to score (at least {2 * MAX_LAG + 3})")
    g, f = mouth(generated[:n]), mouth(fitted[:n])
    lag, corr = metrics.lagged_corr(g, f, MAX_LAG)
    out = {
        "frames": n,
        "corr": float(corr) if np.isfinite(corr) else 0.0,  # a flat mouth follows nothing
        "lag": int(lag),
        "range_ratio": metrics.range_ratio(g, f),
        "silent_lead": int(lead),
    }
    if lead >= 3:  # too short a pause says little
        out["lead_mouth"] = float(g[:lead].mean())
        out["lead_mouth_max"] = float(g[:lead].max())
        out["lead_fitted"] = float(f[:lead].mean())
        out["open_at_start"] = bool(out["lead_mouth"] > OPEN_AT_START)
    return out


def motion_backend(checkpoint: str | Path | None):
    """A torch backend whose decoder step only records the motion it would render."""
    from ..runtime.backend_torch import TorchBackend

    class MotionTap(TorchBackend):
        shown: list

        def run(self, module, inputs):
            if module == "decoder":
                self.shown.append(np.array(inputs["motion"][0]))
                c, r = inputs["motion"].shape[1], self.cfg.render.resolution
                return {"frames": np.zeros((c, r, r, 3), np.float32)}
            return super().run(module, inputs)

    be = MotionTap.from_checkpoint(checkpoint)
    be.shown = []
    return be


def stream_motion(backend, avatar: np.ndarray, pcm: np.ndarray, seed: int = 0) -> np.ndarray:
    """[T, 16] motion the scheduler hands the decoder for `pcm`, pushed in 0.2 s pieces as a
    live source does (T = frames the audio covers)."""
    from ..runtime.scheduler import StreamScheduler

    backend.shown = []
    sched = StreamScheduler(backend, avatar, seed=seed)
    for i in range(0, len(pcm), 3200):
        sched.push_audio(pcm[i : i + 3200])
    sched.flush()
    n = -(-len(pcm) // SAMPLES_PER_FRAME)
    return np.concatenate(backend.shown)[:n]


def clip_labels(root: str | Path, labels: Path, log=print) -> list[tuple[str, Path, dict]]:
    """(id, video path, labels) of every held-out clip; labels are fitted once and cached."""
    from .fit_motion import label_item, load_labels
    from .real_data import videos

    items = videos(root, "eval")
    if not items:
        raise InputError(f"{root}: no held-out talking clips in catalog.json")
    out = []
    for it in items:
        path = labels / f"{it.id}.npz"
        if not path.exists():
            log(f"  fitting labels of {it.id} (once, cached in {labels}) ...")
        out.append((it.id, it.file, load_labels(label_item(it, labels, log=log))))
    return out


def avatar_of(video: Path, size: int) -> np.ndarray:
    """The clip's first frame as the runtime crops a photo (centre crop if no face is found)."""
    from ..runtime.avatar import prepare_avatar
    from .real_data import read_frames

    frame = read_frames(video, 1)[0]
    try:
        return prepare_avatar(frame, size)
    except InputError:
        return prepare_avatar(frame, size, face_check=False)


def mean_over_seeds(scores: list[dict]) -> dict:
    """One clip's scores over several noise seeds: the flow sampler's noise moves a clip's
    correlation by ~0.1 and the 10-clip mean by ~0.05, so one seed cannot rank checkpoints."""
    out = {k: scores[0][k] for k in ("frames", "silent_lead")}
    out["corr"] = float(np.mean([s["corr"] for s in scores]))
    out["lag"] = int(np.round(np.median([s["lag"] for s in scores])))
    out["range_ratio"] = float(np.nanmean([s["range_ratio"] for s in scores]))
    if "lead_mouth" in scores[0]:
        out["lead_mouth"] = float(np.mean([s["lead_mouth"] for s in scores]))
        out["lead_mouth_max"] = float(np.max([s["lead_mouth_max"] for s in scores]))
        out["lead_fitted"] = scores[0]["lead_fitted"]
        out["open_at_start"] = bool(out["lead_mouth"] > OPEN_AT_START)
    return out


# The held-out speech as a user's setup may deliver it: the mouth should not care.
CONDITIONS = {
    "clean": lambda pcm, rng: pcm,
    "quiet": lambda pcm, rng: pcm * np.float32(0.1),  # 20 dB down: a far or quiet microphone
    "phone": lambda pcm, rng: band_pass(pcm, 300, 3400),  # a call
    "noisy": lambda pcm, rng: pcm + rng.normal(0, 10 ** (-45 / 20), pcm.shape).astype(np.float32),
}


def evaluate(
    checkpoint: str | None, clips: list, seeds: tuple[int, ...] = (0,), condition: str = "clean"
) -> dict:
    path = None if checkpoint in (None, SHIPPED) else Path(checkpoint)
    if path is not None and not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    backend = motion_backend(path)
    res = backend.cfg.render.resolution
    t0 = time.time()
    rows = []
    degrade = CONDITIONS[condition]
    for k, (cid, video, lab) in enumerate(clips):
        clean = lab["audio"].astype(np.float32)
        pcm = degrade(clean, np.random.default_rng(k))
        avatar, lead = avatar_of(video, res), silent_lead(clean)
        per_seed = [
            score_clip(stream_motion(backend, avatar, pcm, s), lab["motion"], lead) for s in seeds
        ]
        rows.append(
            {"id": cid, **mean_over_seeds(per_seed), "corr_seeds": [s["corr"] for s in per_seed]}
        )
    leads = [r for r in rows if "lead_mouth" in r]
    by_seed = np.mean([r["corr_seeds"] for r in rows], axis=0) if rows else np.zeros(1)
    return {
        "checkpoint": str(path) if path else SHIPPED,
        "condition": condition,
        "seeds": list(seeds),
        "seconds": round(time.time() - t0, 1),
        "corr": float(np.mean([r["corr"] for r in rows])),
        "corr_seed_sd": float(np.std(by_seed)),
        "max_abs_lag": int(max(abs(r["lag"]) for r in rows)),
        "range_ratio": float(np.nanmean([r["range_ratio"] for r in rows])),
        "lead_mouth": float(np.mean([r["lead_mouth"] for r in leads])) if leads else None,
        "open_at_start": sum(r["open_at_start"] for r in leads),
        "silent_start_clips": len(leads),
        "clips": rows,
    }


def table(results: list[dict]) -> str:
    lines = [
        f"{'checkpoint':<48} {'speech':>6} {'corr':>6} {'sd':>5} {'|lag|':>5} {'range':>6} "
        f"{'lead mouth':>10} {'open@start':>10} {'s':>5}"
    ]
    for r in results:
        lead = "-" if r["lead_mouth"] is None else f"{r['lead_mouth']:+.3f}"
        lines.append(
            f"{r['checkpoint'][-48:]:<48} {r.get('condition', 'clean'):>6} {r['corr']:6.3f} "
            f"{r['corr_seed_sd']:5.3f} "
            f"{r['max_abs_lag']:5d} "
            f"{r['range_ratio']:6.2f} {lead:>10} "
            f"{r['open_at_start']:>4}/{r['silent_start_clips']:<5} {r['seconds']:5.0f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint",
        action="append",
        help=f"safetensors checkpoint (repeatable; '{SHIPPED}' or none = the shipped weights)",
    )
    ap.add_argument("--real", required=True, help="real-data folder with catalog.json")
    ap.add_argument("--labels", type=Path, default=Path("runs/real_labels_eval"))
    ap.add_argument("--json", type=Path, help="write every per-clip score here")
    ap.add_argument("--per-clip", action="store_true", help="print each clip's scores")
    ap.add_argument("--seeds", type=int, default=3, help="noise seeds per clip (scores averaged)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--condition",
        action="append",
        choices=list(CONDITIONS),
        help="the held-out speech 20 dB quieter, phone-band, or with noise at -45 dBFS "
        "(repeatable; default clean)",
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        clips = clip_labels(args.real, args.labels)
        results = []
        runs = [(ck, c) for ck in args.checkpoint or [SHIPPED] for c in args.condition or ["clean"]]
        for ck, condition in runs:
            results.append(evaluate(ck, clips, tuple(range(args.seeds)), condition))
            r = results[-1]
            if args.per_clip:
                for c in r["clips"]:
                    lead = (
                        f" lead {c['silent_lead']} mouth {c['lead_mouth']:+.3f}"
                        if ("lead_mouth" in c)
                        else ""
                    )
                    print(
                        f"  {c['id']:<28} corr {c['corr']:+.3f} lag {c['lag']:+d} "
                        f"range {c['range_ratio']:.2f}{lead}"
                    )
            print(table([r]).splitlines()[1], flush=True)
    except EdgeTalkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
