"""`edgetalk soak`: stream for a long time, faster than real time into a null sink, and show that
nothing grows or drifts: process RSS (slope), the KV cache's size, audio/video alignment, and at
the end the face's identity and head position against the start.

    edgetalk soak --minutes 30 --json runs/soak.json      # outside CI
    edgetalk soak --minutes 2                              # the CI version (tests/test_soak.py)

The stream is a live `Session` (worker thread, bounded queues, the shared scheduler) fed in 40 ms
pieces of speech with pauses and an occasional barge-in, exactly as a TTS would feed it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from .. import cliargs
from ..models.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

SAMPLE_EVERY_S = 10.0  # stream seconds between RSS / cache / A-V samples
WARMUP_SHARE, WARMUP_MIN = 0.2, 0.75  # RSS slope ignores the first 20% or 45 s (warm-up)
IDENTITY_SPAN_S = 10.0  # identity is compared over the first and last 10 s
# The guarantee: RSS slope under 1 MB/min (a leak of one 256² frame per second is 12 MB/min). The
# allocator makes RSS wobble by about +-25 MB, so a short run can only resolve ~30 MB / minutes.
MAX_RSS_SLOPE_MB_PER_MIN, RSS_NOISE_MB = 1.0, 30.0
MIN_IDENTITY_RATIO = 0.95  # the training issue's target
DRIFT_SPEARMAN, DRIFT_FACE_HEIGHTS = 0.5, 0.05  # monotonic AND large: that is drift


def register(sub: argparse._SubParsersAction) -> None:
    from ..runtime.threads import add_threads_option

    p = sub.add_parser(
        "soak",
        help="long streaming soak: RSS slope, KV size, A/V alignment, identity and head drift",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--minutes",
        type=cliargs.float_in(0, 7 * 24 * 60, above=True),
        default=30.0,
        help="stream minutes (default 30)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="safetensors checkpoint (default: tiny)")
    src.add_argument("--bundle", type=Path, help="an exported bundle")
    p.add_argument("--backend", help="backend for --checkpoint (default torch)")
    p.add_argument("--avatar", type=Path, help="avatar photo (default: the embedded one)")
    p.add_argument("--chunk", type=cliargs.chunk, help="chunk size C (checkpoints only)")
    add_threads_option(p)
    p.add_argument("--json", type=cliargs.report_file, help="write the report here")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from ..runtime.threads import set_threads

    set_threads(args.threads)  # the backend soak opens takes them (torch and onnxruntime)
    report = soak(
        minutes=args.minutes,
        checkpoint=args.checkpoint,
        bundle=args.bundle,
        backend=args.backend,
        avatar=args.avatar,
        chunk=args.chunk,
        log=lambda s: print(s, flush=True),
    )
    print(summary(report))
    if args.json:
        cliargs.write_report(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if report["ok"] else 1


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 1e6
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e3
    return float("nan")


def speech_program(seconds: float, seed: int = 0):
    """Pieces of 40 ms: the embedded speech, pauses of 0.5-3 s, an interrupt about once a minute.
    Yields arrays or the string "interrupt"."""
    from ..runtime.audio_io import default_speech, read_audio

    speech = read_audio(default_speech()).pcm
    rng = np.random.default_rng(seed)
    piece = SAMPLE_RATE // 25
    total, n = int(seconds * SAMPLE_RATE), 0
    while n < total:
        seg = speech[: int(rng.integers(len(speech) // 2, len(speech) + 1))]
        seg = np.concatenate([seg, np.zeros(int(rng.uniform(0.5, 3.0) * SAMPLE_RATE), np.float32)])
        for s in range(0, len(seg), piece):
            if n >= total:
                return
            x = seg[s : s + piece][: total - n]
            n += len(x)
            yield x
        if rng.random() < 0.15:
            yield "interrupt"


def soak(
    minutes: float,
    checkpoint=None,
    bundle=None,
    backend=None,
    avatar=None,
    chunk=None,
    log=print,
) -> dict:
    from ..runtime.session import Session

    kwargs = {"chunk": chunk} if chunk else {}
    session = Session(
        avatar=avatar,
        checkpoint=checkpoint,
        bundle=bundle,
        backend=backend,
        realtime=False,
        **kwargs,
    )
    seconds = minutes * 60.0
    span = int(IDENTITY_SPAN_S * FPS)
    cache = session.scheduler.cache
    errors: list[BaseException] = []
    pushed = [0]  # all audio pushed
    consumed = [0]  # audio of the frames read so far
    lead_base = [0]  # pushed audio not counted in the lead (dropped by a barge-in)

    def feeder():
        try:
            for x in speech_program(seconds):
                # Stay about a second ahead of the video, as a live source would: a barge-in
                # then drops a second of speech, not a minute of queued audio.
                while pushed[0] - lead_base[0] - consumed[0] > SAMPLE_RATE and not errors:
                    time.sleep(0.002)
                if isinstance(x, str):
                    session.interrupt()
                    lead_base[0] = pushed[0] - consumed[0]
                else:
                    session.push_audio(x)
                    pushed[0] += len(x)
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            session.close()

    samples, first, last = [], [], deque(maxlen=span // 5)
    head = HeadTrack()  # loaded before the first RSS sample, measured as the stream goes
    every = max(1, int(min(SAMPLE_EVERY_S, seconds / 30) * FPS))  # 30 samples at least
    audio_out = 0
    worst_gap = 0
    t0 = time.perf_counter()
    thread = threading.Thread(target=feeder, name="edgetalk-soak-feed", daemon=True)
    session.start()
    thread.start()
    count = 0
    try:
        for f in session.frames():
            i = f.index
            audio_out += len(f.audio)
            consumed[0] = audio_out
            # A/V: every frame carries exactly its 40 ms of audio, and its timestamp is its index.
            worst_gap = max(worst_gap, abs(audio_out - (i + 1) * SAMPLES_PER_FRAME))
            if i % 5 == 0:
                (first if i < span else last).append(f.rgb)
            if i % FPS == 0:
                head.add(f.rgb)
            if i % every == 0:
                samples.append(
                    {
                        "stream_min": round(i / FPS / 60, 4),
                        "wall_s": round(time.perf_counter() - t0, 2),
                        "rss_mb": round(rss_mb(), 2),
                        "kv_bytes": int(cache.k.nbytes + cache.v.nbytes + cache.valid.nbytes),
                        "av_gap_samples": int(worst_gap),
                    }
                )
                if len(samples) % 6 == 1:
                    s = samples[-1]
                    log(
                        f"  {s['stream_min']:6.2f} min of stream in {s['wall_s']:7.1f} s: "
                        f"RSS {s['rss_mb']:.1f} MB, KV {s['kv_bytes']:,} B"
                    )
            count += 1
    finally:
        session.abort()
        thread.join(timeout=5.0)
    if errors:
        raise errors[0]
    wall = time.perf_counter() - t0
    stats = session.stats
    report = {
        "minutes": minutes,
        "frames": count,
        "wall_s": round(wall, 1),
        "speed_x_realtime": round(count / FPS / wall, 2) if wall else None,
        "backend": session.backend.describe(),
        "interruptions": stats.interruptions,
        "samples": samples,
        **rss_report(samples),
        "kv_bytes": sorted({s["kv_bytes"] for s in samples}),
        "av": {
            "audio_samples_in": pushed[0],
            "audio_samples_out": audio_out,
            "max_gap_samples": int(worst_gap),
            "frames_expected": -(-pushed[0] // SAMPLES_PER_FRAME)
            if stats.interruptions == 0
            else None,
        },
        "face": face_report(session.avatar, first, list(last), head),
    }
    report["checks"] = checks(report)
    report["ok"] = all(c["ok"] for c in report["checks"].values() if c["ok"] is not None)
    return report


def rss_report(samples: list[dict]) -> dict:
    """RSS slope in MB per stream minute after the warm-up: the Theil-Sen estimate (median of
    pairwise slopes), robust to the allocator's wobble; and the slope a run this long can resolve."""
    end = samples[-1]["stream_min"] if samples else 0.0
    skip = max(WARMUP_SHARE * end, WARMUP_MIN)
    pts = np.array([(s["stream_min"], s["rss_mb"]) for s in samples if s["stream_min"] >= skip])
    if len(pts) < 5:
        return {"rss_slope_mb_per_min": None, "rss_growth_mb": None, "rss_resolvable": None}
    t, r = pts.T
    i, j = np.triu_indices(len(t), 1)
    slope = float(np.median((r[j] - r[i]) / (t[j] - t[i])))
    span = float(t[-1] - t[0])
    return {
        "rss_slope_mb_per_min": round(slope, 3),
        "rss_resolvable": round(max(MAX_RSS_SLOPE_MB_PER_MIN, RSS_NOISE_MB / span), 2),
        "rss_growth_mb": round(float(np.median(r[-5:]) - np.median(r[:5])), 2),
        "rss_start_mb": round(float(np.median(r[:5])), 1),
        "rss_end_mb": round(float(np.median(r[-5:])), 1),
        "rss_window_min": [round(float(t[0]), 2), round(float(t[-1]), 2)],
    }


class HeadTrack:
    """Face centre and height, one frame per second, measured as the stream goes (keeping the
    frames themselves would be the soak's own memory leak)."""

    def __init__(self):
        from ..errors import EdgeTalkError

        self.rows: list[tuple[float, float, float, float]] = []
        self.note = None
        try:
            from ..training.metrics import FaceMeasurer

            self.measurer = FaceMeasurer()
        except (EdgeTalkError, ImportError) as e:
            self.measurer, self.note = None, f"head drift not measured: {e}"

    def add(self, rgb: np.ndarray) -> None:
        if self.measurer is not None:
            t = self.measurer.track([rgb])
            self.rows.append((t.opening[0], *t.center[0], t.height[0]))

    def track(self):
        from ..training.metrics import FaceTrack

        a = np.array(self.rows, np.float32).reshape(-1, 4)
        return FaceTrack(a[:, 0], a[:, 1:3], a[:, 3], np.zeros((len(a), 0, 2), np.float32))


def face_report(avatar: np.ndarray, first: list, last: list, head: HeadTrack) -> dict:
    """Identity (dlib embedding vs the avatar) over the first and last 10 s, and head position
    and scale drift (face mesh, one frame per second). Needs the `eval` extra; says so if not."""
    from ..errors import EdgeTalkError

    out: dict = {}
    try:
        from ..training import metrics
    except ImportError as e:
        return {"note": f"identity and head drift not measured ({e}); pip install 'edgetalk[eval]'"}
    try:
        emb = metrics.IdentityEmbedder()
        start = emb.similarity(avatar, first)
        end = emb.similarity(avatar, last)
        out.update(identity_start=start, identity_end=end, identity_ratio=end / start)
    except (EdgeTalkError, ImportError) as e:
        out["identity_note"] = f"identity not measured: {e}"
    if head.measurer is None:
        out["drift_note"] = head.note
    else:
        out.update(metrics.drift(head.track(), fps=1.0))
    return out


def checks(r: dict) -> dict:
    face = r["face"]
    slope = r["rss_slope_mb_per_min"]
    out = {
        "rss_flat": {
            "ok": None if slope is None else slope < r["rss_resolvable"],
            "what": f"RSS slope {slope} MB/min < {r['rss_resolvable']} (what this run resolves; "
            f"the guarantee is {MAX_RSS_SLOPE_MB_PER_MIN} over 30 min)",
        },
        "kv_constant": {"ok": len(r["kv_bytes"]) == 1, "what": f"KV bytes {r['kv_bytes']}"},
        "av_aligned": {
            "ok": r["av"]["max_gap_samples"] == 0,
            "what": f"audio vs frames gap {r['av']['max_gap_samples']} samples",
        },
    }
    ratio = face.get("identity_ratio")
    out["identity"] = {
        "ok": None if ratio is None or not np.isfinite(ratio) else ratio >= MIN_IDENTITY_RATIO,
        "what": f"identity end/start {ratio} >= {MIN_IDENTITY_RATIO}",
    }
    drifting = [
        axis
        for axis in ("x", "y", "scale")
        if f"{axis}_spearman" in face
        and abs(face[f"{axis}_spearman"]) >= DRIFT_SPEARMAN
        and abs(face[f"{axis}_total_drift"]) >= DRIFT_FACE_HEIGHTS
    ]
    out["no_drift"] = {
        "ok": None if "x_spearman" not in face else not drifting,
        "what": f"monotonic head drift in {drifting or 'none'}",
    }
    return out


def summary(r: dict) -> str:
    face = r["face"]
    lines = [
        f"soak: {r['minutes']:.1f} min of stream ({r['frames']} frames) in {r['wall_s']:.0f} s "
        f"({r['speed_x_realtime']}x real time) on {r['backend']}; {r['interruptions']} barge-ins",
        f"  RSS {r.get('rss_start_mb')} -> {r.get('rss_end_mb')} MB over stream minutes "
        f"{r.get('rss_window_min')}, slope {r['rss_slope_mb_per_min']} MB/min; KV cache "
        f"{r['kv_bytes']} bytes",
        f"  A/V: {r['av']['audio_samples_out']} samples out for {r['frames']} frames, "
        f"max gap {r['av']['max_gap_samples']} samples",
    ]
    if "identity_ratio" in face:
        lines.append(
            f"  identity {face['identity_start']:.3f} -> {face['identity_end']:.3f} "
            f"(ratio {face['identity_ratio']:.3f})"
        )
    if "x_spearman" in face:
        lines.append(
            "  head drift (face heights; Spearman): "
            + ", ".join(
                f"{a} {face[f'{a}_total_drift']:+.3f}; {face[f'{a}_spearman']:+.2f}"
                for a in ("x", "y", "scale")
            )
        )
    for k in ("note", "identity_note", "drift_note"):
        if k in face:
            lines.append(f"  note: {face[k]}")
    for name, c in r["checks"].items():
        mark = {True: "ok", False: "FAIL", None: "not measured"}[c["ok"]]
        lines.append(f"  [{mark}] {name}: {c['what']}")
    return "\n".join(lines)
