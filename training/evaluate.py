"""`edgetalk eval` protocol: held-out identities and voices, scored from pixels.

Every figure is reported for three videos of the same clip:
- ground truth: the synthetic renderer driven by the phoneme motion model;
- the model under test (a checkpoint or a bundle, through the streaming scheduler);
- a trivial baseline: the same renderer with the jaw driven by audio loudness alone.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..errors import EdgeTalkError
from ..models.config import FPS, SAMPLES_PER_FRAME
from ..models.io_spec import per_avatar_feed
from ..models.motion import INDEX
from ..runtime.backend import Backend
from ..runtime.scheduler import StreamScheduler
from . import metrics
from . import render as renderer
from .faces import load_identities
from .synth import make_clip, reference

CLOSED_BELOW = 0.03  # inner-lip gap under 3% of face height counts as closed lips


def stream_frames(
    backend: Backend, avatar: np.ndarray, own, partner=None, seed=0, keep=None, open_mouth="close"
):
    """Frames the model streams for the audio (pieces of 0.2 s, as a live source would), with
    the photo's mouth handled as `edgetalk run` does (rest_pose.py)."""
    from ..runtime.rest_pose import measure
    from ..runtime.threads import spare_cores

    # every frame is kept, so the decoder may overlap the next chunk (the same frames, sooner)
    overlap = spare_cores()
    rest = measure(avatar, open_mouth)
    sched = StreamScheduler(backend, avatar, seed=seed, mouth_rest=rest, overlap=overlap)
    n = math.ceil(len(own) / SAMPLES_PER_FRAME)
    out = []
    piece = 3200
    for i in range(0, len(own), piece):
        p = None if partner is None else partner[i : i + piece]
        out += [f for f in sched.push_audio(own[i : i + piece], p) if keep is None or keep(f.index)]
    out += [f for f in sched.flush() if keep is None or keep(f.index)]
    sched.close()
    return [f.rgb for f in out if f.index < n]


def loudness_motion(audio: np.ndarray, n: int) -> np.ndarray:
    """The baseline: jaw opening = frame loudness, scaled so the loudest 5% open fully."""
    rms = np.sqrt(np.mean(audio[: n * SAMPLES_PER_FRAME].reshape(n, -1) ** 2, axis=1))
    top = np.percentile(rms, 95) or 1.0
    m = np.zeros((n, 16), np.float32)
    m[:, INDEX["jaw_open"]] = np.clip(rms / top, 0, 1)
    return m


def render_motion(ref, motion: np.ndarray, frames=None) -> list[np.ndarray]:
    idx = range(len(motion)) if frames is None else frames
    return [renderer.render(ref, motion[i])[0] for i in idx]


def decoder_reconstruction(backend: Backend, avatar: np.ndarray, motion: np.ndarray):
    """The model's decoder alone, fed the ground-truth motion (isolates rendering quality)."""
    c = backend.cfg.chunk
    image = (avatar.astype(np.float32) / 255).transpose(2, 0, 1)[None].copy()
    app = backend.run("appearance", {"image": image})
    photo = backend.prepare_photo(per_avatar_feed(backend.io, image, app))
    out = []
    for s in range(0, len(motion) - c + 1, c):
        m = motion[s : s + c][None].astype(np.float32)
        fr = backend.run("decoder", {**photo, "motion": m})
        out += list((np.clip(fr["frames"], 0, 1) * 255 + 0.5).astype(np.uint8))
    return out


def evaluate(
    backend: Backend,
    clips: int = 4,
    seconds: float = 8.0,
    long_minutes: float = 5.0,
    listen_clips: int = 2,
    seed: int = 0,
    log=print,
    open_mouth: str = "keep",  # the ground truth keeps the photo's mouth as its rest
) -> dict:
    res = backend.cfg.render.resolution
    ids = load_identities("eval")
    report: dict = {"identities": [i.name for i in ids], "resolution": res}
    t0 = time.time()

    # 1. Lip sync, closures and image quality on held-out monologues.
    acc = {
        k: {"open": [], "ref": [], "bil": [], "who": []}
        for k in ("gt", "model", "decoder", "baseline")
    }
    quality = {
        "model_psnr": [],
        "model_ssim": [],
        "decoder_psnr": [],
        "decoder_ssim": [],
        "baseline_psnr": [],
        "baseline_ssim": [],
    }
    voices = []
    for i in range(clips):
        ident = ids[i % len(ids)]
        clip = make_clip(seed + 7919 * i, ident, size=res, seconds=seconds, split="eval")
        voices.append(clip.voice)
        ref = reference(ident, res)
        n = clip.n_frames
        videos = {
            "gt": list(clip.frames),
            "model": stream_frames(
                backend, ref.rgb, clip.audio, seed=seed + i, open_mouth=open_mouth
            )[:n],
            "baseline": render_motion(ref, loudness_motion(clip.audio, n)),
        }
        recon = decoder_reconstruction(backend, ref.rgb, clip.motion)
        videos["decoder"] = recon  # rendering alone: the model's decoder on ground-truth motion
        for k, frames in videos.items():
            tr = metrics.FaceMeasurer().track(frames)
            acc[k]["open"].append(tr.opening)
            acc[k]["ref"].append(clip.mouth_open_gt[: len(frames)])
            acc[k]["bil"].append(clip.bilabial[: len(frames)])
            acc[k]["who"].append(ident.name)
        gt = np.stack(videos["gt"])
        for name, frames in (
            ("model", videos["model"]),
            ("decoder", recon),
            ("baseline", videos["baseline"]),
        ):
            f = np.stack(frames)
            quality[f"{name}_psnr"].append(metrics.psnr(f, gt[: len(f)]))
            quality[f"{name}_ssim"].append(metrics.ssim(f[::5], gt[: len(f)][::5]))
        log(f"  clip {i + 1}/{clips} ({ident.name}, {clip.voice}) done, {time.time() - t0:.0f} s")
    report["voices"] = voices
    lip = {}
    for k, a in acc.items():
        o, r, b = (np.concatenate(a[x]) for x in ("open", "ref", "bil"))
        lag, _ = metrics.av_offset(o, r)
        lip[k] = {
            "lip_sync_corr": metrics.pearson(o, r),
            "offset_frames": lag,
            "bilabial_closed": metrics.bilabial_closure(o, b, CLOSED_BELOW),
            "face_found": float(np.mean(np.isfinite(o))),
            "bilabial_by_identity": closures_by_identity(a),
        }
    report["lip_sync"] = lip
    report["image_quality"] = {k: float(np.mean(v)) for k, v in quality.items()}

    # 2. Listening: the partner speaks; compare with the partner muted.
    listen = {"with_partner": [], "partner_muted": [], "mouth_while_listening": []}
    for i in range(listen_clips):
        ident = ids[i % len(ids)]
        clip = make_clip(
            seed + 104729 + i,
            ident,
            size=res,
            seconds=seconds,
            dyadic=True,
            split="eval",
            render=False,
        )
        ref = reference(ident, res)
        mask = clip.listen_mask > 0.5
        if mask.sum() < 10:
            continue
        on = stream_frames(
            backend, ref.rgb, clip.audio, clip.partner_audio, seed=seed + i, open_mouth=open_mouth
        )
        off = stream_frames(
            backend,
            ref.rgb,
            clip.audio,
            np.zeros_like(clip.partner_audio),
            seed=seed + i,
            open_mouth=open_mouth,
        )
        tr_on, tr_off = metrics.FaceMeasurer().track(on), metrics.FaceMeasurer().track(off)
        m = mask[: len(on)]
        listen["with_partner"].append(metrics.landmark_motion(tr_on, m))
        listen["partner_muted"].append(metrics.landmark_motion(tr_off, m))
        listen["mouth_while_listening"].append(float(np.nanmean(tr_on.opening[m])))
    report["listening"] = {
        k: float(np.nanmean(v)) if v else float("nan") for k, v in listen.items()
    }
    if listen["with_partner"]:
        report["listening"]["ratio"] = report["listening"]["with_partner"] / max(
            report["listening"]["partner_muted"], 1e-12
        )
    log(f"  listening done, {time.time() - t0:.0f} s")

    # 3. Minutes of continuous streaming: identity and head drift.
    if long_minutes > 0:
        report["long_stream"] = long_stream(
            backend, ids[0], res, long_minutes, seed, log, open_mouth
        )
    report["seconds"] = time.time() - t0
    return report


def closures_by_identity(a: dict) -> dict[str, list[int]]:
    """{identity: [closed, measured]} bilabial closures: a low share usually has one photo as
    its cause (a wide laugh), which the pooled figure hides."""
    out: dict[str, list[int]] = {}
    for who, o, b in zip(a["who"], a["open"], a["bil"], strict=True):
        c, n = metrics.bilabial_counts(o, b, CLOSED_BELOW)
        tot = out.setdefault(who, [0, 0])
        tot[0] += c
        tot[1] += n
    return out


def long_stream(backend, ident, res, minutes, seed, log, open_mouth="close") -> dict:
    need = int(minutes * 60 * FPS)
    audio, motion = [], []
    k = 0
    while sum(len(m) for m in motion) < need:
        c = make_clip(seed + 31337 + k, ident, size=64, seconds=10.0, split="eval", render=False)
        audio.append(c.audio)
        motion.append(c.motion)
        k += 1
    audio = np.concatenate(audio)[: need * SAMPLES_PER_FRAME]
    motion = np.concatenate(motion)[:need]
    ref = reference(ident, res)
    step = FPS  # one frame per second for drift
    span = min(10 * FPS, need // 2)  # identity is compared over the first and last 10 s
    first = set(range(0, span, 5))
    last = set(range(need - span, need, 5))
    sampled = sorted(set(range(0, need, step)) | first | last)
    keep = set(sampled)
    t = time.time()
    frames = stream_frames(
        backend, ref.rgb, audio, seed=seed, keep=keep.__contains__, open_mouth=open_mouth
    )
    log(f"  {minutes:.1f} min stream rendered in {time.time() - t:.0f} s")
    by_index = dict(zip(sampled, frames, strict=True))
    out = {}
    try:
        emb = metrics.IdentityEmbedder()
    except EdgeTalkError as e:
        log(f"  identity not measured: {e}")
        emb = None
    gt_frames = dict(zip(sampled, render_motion(ref, motion, sampled), strict=True))
    for name, src in (("model", by_index), ("gt", gt_frames)):
        start = end = float("nan")
        if emb is not None:
            start = emb.similarity(ref.rgb, [src[i] for i in sorted(first)])
            end = emb.similarity(ref.rgb, [src[i] for i in sorted(last)])
        track = metrics.FaceMeasurer().track([src[i] for i in range(0, need, step)])
        out[name] = {
            "identity_start": start,
            "identity_end": end,
            "identity_ratio": end / start if start else float("nan"),
            **metrics.drift(track, fps=1.0),
        }
    out["minutes"] = minutes
    return out


def format_report(r: dict) -> str:
    lines = [
        "| metric | ground truth | model | decoder on GT motion | loudness baseline | target |",
        "|---|---|---|---|---|---|",
    ]
    lip = r["lip_sync"]

    def row(name, key, fmt, target):
        lines.append(
            f"| {name} | "
            + " | ".join(fmt(lip[k][key]) for k in ("gt", "model", "decoder", "baseline"))
            + f" | {target} |"
        )

    row("lip-sync corr (pixels vs phonemes)", "lip_sync_corr", "{:.3f}".format, "≥ 0.7")
    row("A/V offset (frames)", "offset_frames", "{:+d}".format, "|offset| ≤ 1")
    row("bilabial closures shown closed", "bilabial_closed", "{:.0%}".format, "≥ 80%")
    row(
        "bilabial closures closed, per face",
        "bilabial_by_identity",
        lambda d: ", ".join(f"{k} {c}/{n}" for k, (c, n) in d.items()),
        "",
    )
    row("frames with a face found", "face_found", "{:.0%}".format, "")
    q = r["image_quality"]
    lines.append(
        f"| PSNR vs ground truth (dB) | — | {q['model_psnr']:.2f} | {q['decoder_psnr']:.2f} | "
        f"{q['baseline_psnr']:.2f} | |"
    )
    lines.append(
        f"| SSIM vs ground truth | — | {q['model_ssim']:.3f} | {q['decoder_ssim']:.3f} | "
        f"{q['baseline_ssim']:.3f} | |"
    )
    li = r["listening"]
    if "ratio" in li:
        lines.append(
            f"| listening motion, partner on / muted | — | {li['with_partner']:.2e} / "
            f"{li['partner_muted']:.2e} (×{li['ratio']:.2f}); mouth {li['mouth_while_listening']:.3f} | — | — | > 1 |"
        )
    ls = r.get("long_stream")
    if ls:
        for key, label in (
            ("identity_start", "identity cos, first 10 s"),
            ("identity_end", f"identity cos, last 10 s of {ls['minutes']:.0f} min"),
            ("identity_ratio", "identity end / start"),
        ):
            lines.append(
                f"| {label} | {ls['gt'][key]:.3f} | {ls['model'][key]:.3f} | — | — | "
                f"{'≥ 0.95' if key == 'identity_ratio' else ''} |"
            )
        for axis in ("x", "y", "scale"):
            g, m = ls["gt"], ls["model"]
            lines.append(
                f"| head {axis} drift over {ls['minutes']:.0f} min (face heights; Spearman) | "
                f"{g.get(axis + '_total_drift', float('nan')):+.3f}; {g.get(axis + '_spearman', float('nan')):+.2f} | "
                f"{m.get(axis + '_total_drift', float('nan')):+.3f}; {m.get(axis + '_spearman', float('nan')):+.2f} | — | — | no monotonic drift |"
            )
    return "\n".join(lines)
