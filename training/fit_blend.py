"""Fit the boundary blend's velocity gain per chunk size on real training clips.

    python -m edgetalk.training.fit_blend --real ../shared/data/real --chunks 2,3,4,6,8

`runtime/continuity.py` offsets each chunk's motion so that its first frame continues the last
shown velocity times a gain. Too high a gain overshoots at chunk starts (judder ratio > 1), too
low stalls there (< 1), and the right gain differs by chunk size. This prints, per chunk size
and candidate gain, the pixel judder ratio of the clips (mean, smallest, largest) and the gain
whose mean is closest to 1.0: what `VELOCITY_GAINS` holds. Re-fit it when the generator changes.

Each clip streams once per chunk size through the real scheduler while a recording backend keeps
the audio encoder's and generator's outputs (the decoder is skipped). It then replays through a
fresh scheduler for every gain: the replaying backend returns the recorded outputs and runs only
the decoder. The blend never feeds back into the generator (its context is the raw motion), so a
replay shows exactly the frames a stream with that gain would. Held-out identities are never
used here: they judge the result (`edgetalk eval --real DIR --chunk C`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeTalkError, InputError
from ..models.config import SAMPLES_PER_FRAME
from ..runtime.continuity import BoundaryBlend, velocity_gain
from .judder import judder_ratio


class _Recorder:
    """A backend that keeps the audio and generator outputs and skips the decoder."""

    def __init__(self, backend):
        self.inner, self.cfg, self.io = backend, backend.cfg, backend.io
        self.calls: list[tuple[str, dict]] = []

    def run(self, module, inputs):
        if module == "decoder":
            c, r = inputs["motion"].shape[1], self.cfg.render.resolution
            return {"frames": np.zeros((c, r, r, 3), np.float32)}
        out = self.inner.run(module, inputs)
        if module in ("audio", "generator"):
            self.calls.append((module, out))
        return out


class _Replay:
    """A backend that hands back recorded audio and generator outputs, in order, and runs the
    appearance stage and the decoder for real."""

    def __init__(self, backend, calls):
        self.inner, self.cfg, self.io = backend, backend.cfg, backend.io
        self.calls = list(calls)

    def run(self, module, inputs):
        if module in ("audio", "generator"):
            name, out = self.calls.pop(0)
            if name != module:
                raise RuntimeError(f"replay out of step: recorded {name}, asked for {module}")
            return out
        return self.inner.run(module, inputs)


def _stream(backend, avatar, rest, pcm, seed, gain=None) -> list[np.ndarray]:
    from ..runtime.scheduler import StreamScheduler

    sched = StreamScheduler(backend, avatar, seed=seed, mouth_rest=rest)
    if gain is not None:
        sched.blend = BoundaryBlend(sched.chunk, gain=gain)
    frames = sched.push_audio(pcm) + sched.flush()
    return [f.rgb for f in frames]


def clip_judder(backend, photo, pcm, gains, seed=0, open_mouth="close") -> dict[float, float]:
    """Pixel judder ratio of one clip (first frame as the photo, its own speech) per gain."""
    from ..runtime.avatar import prepare_avatar
    from ..runtime.rest_pose import measure

    res = backend.cfg.render.resolution
    try:
        avatar = prepare_avatar(photo, res)
    except InputError:  # the detector refuses this face: the centre crop, as eval --real does
        avatar = prepare_avatar(photo, res, face_check=False)
    rest = measure(avatar, open_mouth)
    rec = _Recorder(backend)
    _stream(rec, avatar, rest, pcm, seed)
    n = len(pcm) // SAMPLES_PER_FRAME  # whole frames, as eval --real scores
    out = {}
    for g in gains:
        frames = _stream(_Replay(backend, rec.calls), avatar, rest, pcm, seed, gain=g)[:n]
        out[g] = judder_ratio(np.stack(frames), backend.cfg.chunk)
    return out


def best_gain(ratios: dict[float, list[float]]) -> float:
    """The gain whose mean ratio is closest to 1.0 (in log terms: a 0.8 stall is as far off as
    a 1.25 step)."""
    return min(ratios, key=lambda g: abs(np.log(np.mean(ratios[g]))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgetalk.training.fit_blend", description=__doc__)
    p.add_argument("--real", type=Path, required=True, help="the real clips (catalog.json)")
    p.add_argument("--checkpoint", type=Path, help="weights (default: the embedded ones)")
    p.add_argument("--chunks", default="2,3,4,6,8", help="chunk sizes, comma-separated")
    p.add_argument("--gains", default="0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4")
    p.add_argument("--every", type=int, default=3, help="every Nth training clip (default 3)")
    p.add_argument("--seconds", type=float, help="at most this much of each clip")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
        gains = [float(g) for g in args.gains.split(",")]
        if min(chunks) < 2 or min(gains) <= 0 or args.every < 1:
            raise ValueError
    except ValueError:
        print("error: --chunks takes sizes >= 2, --gains positive numbers", file=sys.stderr)
        return 2
    try:
        return _fit(args, chunks, gains)
    except EdgeTalkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _fit(args, chunks, gains) -> int:
    from ..runtime.loader import open_backend
    from .real_data import read_clip, videos

    items = videos(args.real, "train")[:: args.every]
    if not items:
        raise InputError(f"{args.real}: no training clips in catalog.json")
    clips = [read_clip(item, args.seconds) for item in items]
    print(f"{len(items)} training clips: {', '.join(i.id for i in items)}")
    for chunk in chunks:
        backend = open_backend(checkpoint=args.checkpoint, chunk=chunk, threads=args.threads)
        t0 = time.time()
        ratios: dict[float, list[float]] = {g: [] for g in gains}
        for frames, pcm in clips:
            for g, r in clip_judder(backend, frames[0], pcm, gains).items():
                ratios[g].append(r)
        for g in gains:
            r = np.array(ratios[g])
            print(
                f"chunk {chunk} gain {g:.2f}: judder mean {r.mean():.3f}, "
                f"smallest {r.min():.3f}, largest {r.max():.3f}"
            )
        print(
            f"chunk {chunk}: best gain {best_gain(ratios):.2f} "
            f"(shipped {velocity_gain(chunk):.2f}; {time.time() - t0:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
