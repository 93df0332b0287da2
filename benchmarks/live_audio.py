"""How late a live Session hands out each 40 ms of audio, with busy processes beside it.

    python -m edgetalk.benchmarks.live_audio --seconds 20 --load 2            # frames(gaps=True)
    python -m edgetalk.benchmarks.live_audio --seconds 20 --load 2 --carry    # frames()
    python -m edgetalk.benchmarks.live_audio --seconds 20 --load 2 --pause 10 # then a quiet room

The embedded example speech is pushed in real time in 40 ms pieces, as a microphone or a paced
TTS delivers it, into a realtime Session (the one `serve` and the agent integrations use). For
every 40 ms span of audio it hands out, the lateness is the hand-out time minus the span's
presentation time (`LiveFrame.due`): what a sink that plays audio on its own clock sees. `bench`
measures speed and first-frame delay; this measures what a busy machine does to the sound.
With --pause, the busy processes stop when the speech ends and the microphone then hears a quiet
room: how much of a delay raised under load comes back in the pause.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .. import cliargs
from ..errors import EdgeTalkError
from ..models.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from .load import BusyLoad
from .measure import bench_audio

SPF = SAMPLES_PER_FRAME


def span_lateness(frame, now: float) -> list[float]:
    """Seconds late of each 40 ms span in `frame` (handed out at `now`). A gap's spans start at
    its index; a shown frame with carried audio ends with its own span."""
    n = frame.audio.shape[0] // SPF
    if frame.rgb is None:
        return [now - (frame.due + j / FPS) for j in range(n)]
    return [now - (frame.due - (n - 1 - j) / FPS) for j in range(n)]


def run(seconds: float, load: int, gaps: bool, pause: float = 0.0, **session_kw) -> dict:
    from ..runtime.session import Session

    speech = bench_audio(seconds)
    audio = np.concatenate([speech, np.zeros(int(pause * SAMPLE_RATE), np.float32)])
    late: list[float] = []
    shown = 0
    busy = BusyLoad(load)
    with busy, Session(realtime=True, **session_kw) as s:

        def feed() -> None:
            t0 = time.monotonic()
            for i in range(0, audio.shape[0], SPF):
                if i == speech.shape[0]:
                    busy.stop()  # the pause: the neighbours are gone too
                s.push_audio(audio[i : i + SPF])
                time.sleep(max(0.0, t0 + (i + SPF) / SAMPLE_RATE - time.monotonic()))
            s.close()

        threading.Thread(target=feed, name="edgetalk-feed", daemon=True).start()
        for f in s.frames(gaps=gaps):
            if f.due is None:
                continue
            shown += f.rgb is not None
            late.extend(span_lateness(f, time.monotonic()))
        st = s.stats
    ms = np.array(late) * 1000.0
    pct = {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 95, 99)} if ms.size else {}
    return {
        "mode": "gaps" if gaps else "carry",
        "load": load,
        "seconds": seconds,
        "pause": pause,
        "chunk": st.chunk,
        "frames_shown": shown,
        "frames_dropped": st.dropped,
        "skipped": st.skipped,
        "audio_ahead": st.audio_ahead,
        "delay_raised_ms": st.latency_raised_s * 1000.0,
        "delay_lowered_ms": st.latency_lowered_s * 1000.0,
        "trimmed": st.trimmed,
        "late_bound_ms": st.chunk / FPS * 1000.0,
        "audio_late_ms": {**pct, "max": float(ms.max()) if ms.size else 0.0},
        "spans_over_100ms": float(np.mean(ms > 100.0)) if ms.size else 0.0,
    }


def line(r: dict) -> str:
    a = r["audio_late_ms"]
    return (
        f"{r['mode']}, load {r['load']}: {r['frames_shown']} frames shown, {r['frames_dropped']} "
        f"dropped ({r['skipped']} skipped, {r['audio_ahead']} audio ahead of the worker), delay "
        f"raised {r['delay_raised_ms']:.0f} ms ({r['delay_lowered_ms']:.0f} ms taken back in "
        f"pauses, {r['trimmed']} quiet frames dropped); audio late p50 {a.get('p50', 0):.0f} / p95 "
        f"{a.get('p95', 0):.0f} / p99 {a.get('p99', 0):.0f} / max {a['max']:.0f} ms "
        f"(late bound {r['late_bound_ms']:.0f} ms)"
    )


def main(argv: list[str] | None = None) -> int:
    from ..runtime.threads import add_threads_option, set_threads

    p = argparse.ArgumentParser(
        prog="python -m edgetalk.benchmarks.live_audio", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seconds", type=cliargs.float_in(1.0, 3600.0), default=20.0)
    p.add_argument("--load", type=cliargs.int_in(0, 64), default=0, help="busy processes beside")
    p.add_argument("--carry", action="store_true", help="frames() instead of frames(gaps=True)")
    p.add_argument(
        "--pause",
        type=cliargs.float_in(0.0, 3600.0),
        default=0.0,
        help="seconds of a quiet room after the speech, without the busy processes",
    )
    p.add_argument("--chunk", type=cliargs.chunk, default=None)
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--json", type=cliargs.report_file, default=None, metavar="OUT.json")
    add_threads_option(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    try:
        r = run(
            args.seconds,
            args.load,
            not args.carry,
            args.pause,
            bundle=args.bundle,
            checkpoint=args.checkpoint,
            chunk=args.chunk,
        )
    except EdgeTalkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(line(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
