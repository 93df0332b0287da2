"""`edgetalk eval --real DIR`: scores on real people (DESIGN.md, "Scores on real people").

For each held-out real clip the avatar is the clip's first frame (cropped by the runtime, as a
user's photo is), driven by the clip's own speech through a `Session`, exactly as `edgetalk run`
streams. The result is compared with the real video, from pixels: mediapipe's mouth opening of
the generated and the real frames (the real ones cut with the same crop), loudness, judder and
dlib identity. Rows: the model, the previous weights (when comparing), a loudness-driven jaw
rendered by the same decoder, the decoder on the motion fitted to the real frames (rendering
alone), and the real video itself where a score applies to it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeTalkError, InputError
from ..models.config import FPS, SAMPLES_PER_FRAME
from ..runtime.backend import Backend
from . import metrics
from .evaluate import decoder_reconstruction, loudness_motion
from .judder import judder_ratio
from .real_data import RealItem, read_clip, videos

MAX_LAG = 5  # frames either way for the best-lag correlation
ID_SPAN = 2 * FPS  # identity is averaged over the first and last 2 s (every 5th frame)
SYSTEMS = ("model", "previous", "loudness", "fitted", "real")
RANGE_BAND = (0.7, 1.4)  # the mouth range ratio a clip should fall in (issue 14)
JUDDER_MAX = 1.15  # the largest judder ratio a clip may show, at every chunk size (issue 14)


def stream_session(
    backend: Backend,
    photo: np.ndarray,
    pcm: np.ndarray,
    seed: int = 0,
    keep=None,
    open_mouth: str = "close",
):
    """Frames of `edgetalk run`'s path: a Session (no pacing) on the full first frame as photo.
    keep(index) selects which frames to hold (long streams). Returns [(index, rgb)]."""
    from ..runtime.session import Session

    opts = dict(avatar=photo, backend=backend, seed=seed, realtime=False, open_mouth=open_mouth)
    try:
        sess = Session(**opts)
    except InputError:  # the detector refuses this face: crop the centre, as --no-face-check
        sess = Session(**opts, face_check=False)
    err: list[BaseException] = []

    def feed():
        try:
            for i in range(0, len(pcm), 3200):  # 0.2 s pieces, as a live source pushes
                sess.push_audio(pcm[i : i + 3200])
        except BaseException as e:  # surfaced below
            err.append(e)
        finally:
            sess.close()

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    n = len(pcm) // SAMPLES_PER_FRAME
    out = [
        (f.index, f.rgb) for f in sess.frames() if f.index < n and (keep is None or keep(f.index))
    ]
    t.join()
    sess.abort()
    if err:
        raise err[0]
    return out, sess.avatar


def _identity(emb, photo: np.ndarray, frames: list[np.ndarray]) -> float:
    """Mean dlib embedding distance (Euclidean; 0.6 is dlib's same-person threshold)."""
    if emb is None:
        return float("nan")
    ref = emb.embed(photo)
    if ref is None:
        return float("nan")
    d = [np.linalg.norm(e - ref) for e in map(emb.embed, frames) if e is not None]
    return float(np.mean(d)) if d else float("nan")


def score(opening: np.ndarray, real: dict, frames=None, chunk: int = 4, emb=None, photo=None):
    """Every per-clip score of one video against the real clip."""
    g, r = metrics.mouth_signal(opening), real["signal"]
    lag, corr = metrics.lagged_corr(g, r, MAX_LAG)
    chance = metrics.chance_corr(g, r, FPS, MAX_LAG)
    out = {
        "corr": corr,
        "lag": lag,
        "chance_mean": float(np.mean(chance)) if chance.size else float("nan"),
        "chance_p95": float(np.percentile(chance, 95)) if chance.size else float("nan"),
        "range_ratio": metrics.range_ratio(opening, real["opening"]),
        "loudness_corr": metrics.lagged_corr(g, real["loudness"], MAX_LAG)[1],
        "face_found": float(np.mean(np.isfinite(opening))),
        "pause_open": pause_opening(opening, real["loudness"]),
    }
    out["above_chance"] = bool(corr > out["chance_p95"])
    if frames is not None:
        out["judder"] = judder_ratio(np.stack(frames), chunk)
        if photo is not None:
            out["id_start"] = _identity(emb, photo, frames[:ID_SPAN:5])
            out["id_end"] = _identity(emb, photo, frames[-ID_SPAN::5])
    return out


def pause_opening(opening: np.ndarray, loudness: np.ndarray, share: float = 0.2) -> float:
    """Mean mouth opening (face heights) over the clip's quietest frames: where a real mouth
    rests, and where a photo taken mid-word used to stay open (runtime/rest_pose.py)."""
    n = min(len(opening), len(loudness))
    if n == 0:
        return float("nan")
    quiet = loudness[:n] <= np.percentile(loudness[:n], 100 * share)
    vals = np.asarray(opening[:n], np.float64)[quiet]
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def _fitted_motion(crops: np.ndarray) -> tuple[np.ndarray, float]:
    from .fit_motion import label_frames

    lab = label_frames(crops)
    return lab["motion"], float(np.nanmedian(lab["fit_error"]))


def evaluate_real(
    backend: Backend,
    root: str | Path,
    previous: Backend | None = None,
    clips: int | None = None,
    max_seconds: float | None = None,
    long_minutes: float = 5.0,
    split: str = "eval",
    fitted: bool = True,
    seed: int = 0,
    log=print,
    open_mouth: str = "close",
) -> dict:
    from .fit_motion import crop_clip

    items: list[RealItem] = videos(root, split)
    if not items:
        raise InputError(
            f"{root}: no {'held-out ' if split == 'eval' else ''}talking clips in catalog.json"
        )
    items = items[:clips] if clips else items
    res, chunk = backend.cfg.render.resolution, backend.cfg.chunk
    try:
        emb = metrics.IdentityEmbedder()
    except EdgeTalkError as e:
        log(f"  identity not measured: {e}")
        emb = None
    report: dict = {
        "clips": [],
        "chunk": chunk,
        "resolution": res,
        "split": split,
        "open_mouth": open_mouth,
    }
    t0 = time.time()
    for item in items:
        frames, pcm = read_clip(item, max_seconds)
        n = len(frames)
        crops, _ = crop_clip(frames, res)
        real_open = metrics.FaceMeasurer().track(crops).opening
        real = {
            "opening": real_open,
            "signal": metrics.mouth_signal(real_open),
            "loudness": metrics.loudness_db(pcm, n),
        }
        clip = {"id": item.id, "identity": item.identity, "frames": n, "seconds": n / FPS}
        videos_: dict[str, list[np.ndarray]] = {}
        photo = None
        for name, be in (("model", backend), ("previous", previous)):
            if be is None:
                continue
            out, photo = stream_session(be, frames[0], pcm, seed=seed, open_mouth=open_mouth)
            videos_[name] = [f for _, f in out][:n]
        videos_["loudness"] = decoder_reconstruction(
            backend, photo, _pad(loudness_motion(pcm, n), chunk)
        )[:n]
        if fitted:
            motion, fit_err = _fitted_motion(crops)
            clip["fit_error"] = fit_err
            rec = decoder_reconstruction(backend, photo, _pad(motion, chunk))[:n]
            videos_["fitted"] = rec
            clip["fitted_psnr"] = metrics.psnr(np.stack(rec)[1:], crops[1 : len(rec)])
        for name, vid in videos_.items():
            op = metrics.FaceMeasurer().track(vid).opening
            clip[name] = score(op, real, vid, chunk, emb, photo)
        clip["real"] = score(real_open, real, list(crops), chunk)
        clip["real"].pop("id_start", None)
        report["clips"].append(clip)
        m = clip["model"]
        log(
            f"  {item.id}: corr {m['corr']:.2f} (lag {m['lag']:+d}, chance {m['chance_p95']:.2f}), "
            f"range {m['range_ratio']:.2f}, {time.time() - t0:.0f} s"
        )
    report["mean"] = _means(report["clips"])
    if long_minutes > 0:
        report["long_stream"] = long_stream(
            backend, items[0], long_minutes, emb, seed, log, open_mouth
        )
    report["seconds"] = time.time() - t0
    return report


def _pad(motion: np.ndarray, chunk: int) -> np.ndarray:
    """Whole chunks for the decoder (decoder_reconstruction renders chunk by chunk)."""
    extra = (-len(motion)) % chunk
    return np.concatenate([motion, np.repeat(motion[-1:], extra, 0)]) if extra else motion


def _means(clips: list[dict]) -> dict:
    out = {}
    for name in SYSTEMS:
        rows = [c[name] for c in clips if name in c]
        if not rows:
            continue
        agg = {}
        for k in rows[0]:
            vals = np.array([r.get(k, np.nan) for r in rows], np.float64)
            if k == "above_chance":
                agg["above_chance"] = f"{int(vals.sum())}/{len(vals)}"
            elif k == "lag":
                agg["max_abs_lag"] = int(np.nanmax(np.abs(vals)))
                agg["lag"] = float(np.nanmean(vals))
                # a clip at chance has no lag to speak of: its peak within +-5 frames is noise
                sure = np.array([bool(r.get("above_chance")) for r in rows])
                lags = np.abs(vals[sure])
                agg["max_abs_lag_above_chance"] = int(np.nanmax(lags)) if lags.size else None
            elif k == "range_ratio":
                # one clip whose real mouth barely moves can carry the mean far out of the band;
                # the median and the count inside the band say how the clips fare
                agg[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
                fin = vals[np.isfinite(vals)]
                agg["range_median"] = float(np.median(fin)) if fin.size else float("nan")
                inside = (fin >= RANGE_BAND[0]) & (fin <= RANGE_BAND[1])
                agg["range_in_band"] = f"{int(inside.sum())}/{len(vals)}"
            elif k == "judder":
                # the target holds for every clip, not on average: one clip that steps at the
                # chunk rate is seen as much as ten that do not
                fin = vals[np.isfinite(vals)]
                agg[k] = float(np.mean(fin)) if fin.size else float("nan")
                agg["judder_max"] = float(np.max(fin)) if fin.size else float("nan")
                agg["judder_in_band"] = f"{int((fin <= JUDDER_MAX).sum())}/{len(vals)}"
            else:
                agg[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        out[name] = agg
    return out


def long_stream(
    backend: Backend, item: RealItem, minutes: float, emb, seed: int, log, open_mouth="close"
) -> dict:
    """The clip's speech looped for `minutes` through one Session: identity at the end."""
    frames, pcm = read_clip(item)
    need = int(minutes * 60 * FPS)
    reps = int(np.ceil(need * SAMPLES_PER_FRAME / len(pcm)))
    audio = np.tile(pcm, reps)[: need * SAMPLES_PER_FRAME]
    keep = set(range(0, ID_SPAN, 5)) | set(range(need - ID_SPAN, need, 5))
    t = time.time()
    out, photo = stream_session(backend, frames[0], audio, seed, keep.__contains__, open_mouth)
    log(f"  {minutes:.1f} min stream on {item.id} rendered in {time.time() - t:.0f} s")
    got = dict(out)
    first = [got[i] for i in sorted(keep) if i < ID_SPAN and i in got]
    last = [got[i] for i in sorted(keep) if i >= need - ID_SPAN and i in got]
    return {
        "clip": item.id,
        "minutes": minutes,
        "id_start": _identity(emb, photo, first),
        "id_end": _identity(emb, photo, last),
    }


def format_real_report(r: dict) -> str:
    cols = [s for s in SYSTEMS if s in r["mean"]]
    head = {
        "model": "model",
        "previous": "previous weights",
        "loudness": "loudness jaw (same decoder)",
        "fitted": "decoder on fitted motion",
        "real": "real video",
    }
    lines = [
        "| metric (mean of held-out clips) | " + " | ".join(head[c] for c in cols) + " | target |",
        "|---|" + "---|" * (len(cols) + 1),
    ]

    def row(label, key, fmt, target=""):
        vals = [r["mean"][c].get(key) for c in cols]
        cells = [
            "—" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt(v) for v in vals
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")

    f2 = "{:.2f}".format
    row("corr with the real mouth (best lag ±5)", "corr", f2, "≥ 0.6")
    row("chance level (p95 of shifts ≥ 1 s)", "chance_p95", f2)
    row("clips above chance", "above_chance", str, "all")
    row("largest |lag| (frames)", "max_abs_lag", str, "≤ 1")
    row("largest |lag| of the clips above chance", "max_abs_lag_above_chance", str, "≤ 1")
    band = f"{RANGE_BAND[0]:g}–{RANGE_BAND[1]:g}"
    row("mouth range ratio (p90−p10, gen/real)", "range_ratio", f2, band)
    row("mouth range ratio, median of clips", "range_median", f2, band)
    row(f"clips with a range ratio in {band}", "range_in_band", str, "all")
    row("corr with loudness", "loudness_corr", f2)
    row("mouth opening in pauses (quietest 20%)", "pause_open", "{:.3f}".format)
    row("judder ratio", "judder", f2, f"≤ {JUDDER_MAX:g}")
    row("judder ratio, largest clip", "judder_max", f2, f"≤ {JUDDER_MAX:g}")
    row(f"clips with judder ≤ {JUDDER_MAX:g}", "judder_in_band", str, "all")
    row("identity distance, first 2 s", "id_start", "{:.3f}".format)
    row("identity distance, last 2 s", "id_end", "{:.3f}".format)
    ls = r.get("long_stream")
    if ls:
        lines.append(
            f"\nidentity distance over a {ls['minutes']:.0f}-minute stream ({ls['clip']}): "
            f"start {ls['id_start']:.3f}, end {ls['id_end']:.3f} (target ≤ 0.5)"
        )
    lines.append(
        "\nper clip (model / "
        + ("previous / " if "previous" in cols else "")
        + "loudness; corr, lag, chance, range):"
    )
    for c in r["clips"]:
        parts = []
        for s in ("model", "previous", "loudness"):
            if s in c:
                x = c[s]
                parts.append(
                    f"{x['corr']:.2f} {x['lag']:+d} {x['chance_p95']:.2f} {x['range_ratio']:.2f}"
                )
        fit = (
            f"; fitted {c['fitted']['corr']:.2f}, {c['fitted_psnr']:.1f} dB"
            if "fitted" in c
            else ""
        )
        lines.append(f"- {c['id']} ({c['seconds']:.1f} s): " + " / ".join(parts) + fit)
    return "\n".join(lines)
