"""One configuration, timed: a throughput run (audio as fast as consumed) and a paced run (audio in
real time). Both drive the ordinary StreamScheduler into a NullSink; see schema.py for the exact
definitions of every number."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..models.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from ..runtime.backend import Backend
from ..runtime.scheduler import StreamScheduler
from ..runtime.sinks import NullSink
from .memory import PeakMemory

FRAME_S = 1.0 / FPS
STREAM_MODULES = ("audio", "generator", "decoder")
LATE_EPS_S = 1e-6

Clock = Callable[[], float]
Sleep = Callable[[float], None]


@dataclass
class Settings:
    seconds: float = 10.0
    repeats: int = 3
    piece_ms: float = 20.0
    warmup_seconds: float = 1.0
    seed: int = 0
    overlap: bool = False  # throughput streams overlap each chunk's decoder (as `edgetalk run`)

    def to_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "repeats": self.repeats,
            "piece_ms": self.piece_ms,
            "warmup_seconds": self.warmup_seconds,
            "seed": self.seed,
            "overlap": self.overlap,
        }


def bench_audio(seconds: float) -> np.ndarray:
    """The embedded example speech, looped or trimmed to a whole number of frames (>= 1)."""
    from ..runtime.audio_io import default_speech, read_audio

    speech = read_audio(default_speech()).pcm
    frames = max(1, int(round(seconds * FPS)))
    n = frames * SAMPLES_PER_FRAME
    reps = -(-n // speech.shape[0])
    return np.tile(speech, reps)[:n].astype(np.float32)


def first_frame_floor_ms(chunk: int, lookahead_samples: int) -> float:
    """The audio the first chunk needs: C*40 ms + the lookahead (60 ms: 960 samples)."""
    return chunk * FRAME_S * 1000.0 + lookahead_samples * 1000.0 / SAMPLE_RATE


def deadline_misses(arrivals: list[float]) -> tuple[float, float]:
    """(share of frames late, worst lateness in ms) for frames 0..n-1 arriving at `arrivals` (s).

    Frame i is due at arrivals[0] + i * 40 ms: a player that starts at the first frame.
    """
    if not arrivals:
        return 0.0, 0.0
    a = np.asarray(arrivals, dtype=np.float64)
    due = a[0] + np.arange(a.shape[0]) * FRAME_S
    late = a - due
    late[late <= LATE_EPS_S] = 0.0  # float rounding of equal times is not lateness
    return float(np.count_nonzero(late)) / a.shape[0], float(late.max() * 1000.0)


@dataclass
class ThroughputRun:
    frames: int
    wall_s: float

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def rtf(self) -> float:
        return self.wall_s / (self.frames * FRAME_S) if self.frames else 0.0


@dataclass
class PacedRun:
    frames: int
    arrivals: list[float]  # seconds after the first sample, one per frame, in frame order
    compute_s: float  # wall time spent inside the scheduler
    wall_s: float
    # the calls of the chunk that gave the first frame (ms): where FFD - floor went
    first_chunk_ms: dict[str, float] = field(default_factory=dict)

    @property
    def media_s(self) -> float:
        return self.frames * FRAME_S

    @property
    def ffd_ms(self) -> float:
        return self.arrivals[0] * 1000.0 if self.arrivals else float("nan")

    @property
    def rtf(self) -> float:
        return self.compute_s / self.media_s if self.frames else 0.0

    def misses(self) -> tuple[float, float]:
        return deadline_misses(self.arrivals)


OVERLAP_TURN = 4  # chunks per interleaved turn with overlap: 3 of 4 decoders overlapped


def throughput_run(
    sched: StreamScheduler,
    pcm: np.ndarray,
    clock: Clock = time.perf_counter,
    memory: PeakMemory | None = None,
) -> ThroughputRun:
    """Push audio chunk by chunk as fast as the scheduler consumes it; count frames per second."""
    sink = NullSink()
    step = sched.chunk * SAMPLES_PER_FRAME
    t0 = clock()
    for start in range(0, pcm.shape[0], step):
        for frame in sched.push_audio(pcm[start : start + step]):
            sink.write(frame)
        if memory is not None:
            memory.sample()
    for frame in sched.flush():
        sink.write(frame)
    return ThroughputRun(sink.frames, clock() - t0)


def interleaved_throughput(
    scheds: list[StreamScheduler],
    pcm: np.ndarray,
    clock: Clock = time.perf_counter,
    memory: PeakMemory | None = None,
    first: int = 0,
) -> list[ThroughputRun]:
    """throughput_run for several schedulers at once: the same stream, chunk by chunk, each
    scheduler in turn (who goes first rotates every chunk), each timed on its own. On a machine
    whose speed drifts by 2x over minutes (a shared VM, a laptop that throttles), every
    configuration then sees the same conditions within milliseconds of each other, so ratios
    between them hold where back-to-back runs, seconds apart, do not. They share one chunk size.

    Overlapping schedulers take OVERLAP_TURN chunks a turn and finish their last decoder within
    it (drain), so no decoder runs into another configuration's turn and time."""
    n = len(scheds)
    turn_chunks = OVERLAP_TURN if any(s.overlapping for s in scheds) else 1
    step = scheds[0].chunk * SAMPLES_PER_FRAME * turn_chunks
    if any(s.chunk != scheds[0].chunk for s in scheds):
        raise ValueError("interleaved schedulers must share one chunk size")
    sinks = [NullSink() for _ in scheds]
    spent = [0.0] * n

    def turn(j: int, call) -> None:
        for k in range(n):
            i = (first + j + k) % n
            t0 = clock()
            for frame in [*call(scheds[i]), *scheds[i].drain()]:
                sinks[i].write(frame)
            spent[i] += clock() - t0

    starts = range(0, pcm.shape[0], step)
    for j, start in enumerate(starts):
        turn(j, lambda s, start=start: s.push_audio(pcm[start : start + step]))
        if memory is not None:
            memory.sample()
    turn(len(starts), lambda s: s.flush())
    return [ThroughputRun(sink.frames, t) for sink, t in zip(sinks, spent, strict=True)]


def paced_run(
    sched: StreamScheduler,
    pcm: np.ndarray,
    piece_ms: float = 20.0,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    memory: PeakMemory | None = None,
) -> PacedRun:
    """Audio arrives in real time from wall time 0: each piece is pushed at the instant its last
    sample would have arrived (or at once, if compute is behind). The scheduler runs inline."""
    sink = NullSink()
    piece = max(1, int(round(piece_ms * SAMPLE_RATE / 1000.0)))
    arrivals: list[float] = []
    compute = 0.0
    first: dict[str, float] = {}

    def deliver(frames) -> None:
        for frame in frames:
            sink.write(frame)
            arrivals.append(clock() - t0)
            if len(arrivals) == 1:  # the chunk just run gave it: each module's last call
                first.update(first_chunk_calls(sched))

    t0 = clock()
    for start in range(0, pcm.shape[0], piece):
        end = min(start + piece, pcm.shape[0])
        wait = end / SAMPLE_RATE - (clock() - t0)
        if wait > 0:
            sleep(wait)
        a = clock()
        frames = sched.push_audio(pcm[start:end])
        compute += clock() - a
        deliver(frames)
        if memory is not None:
            memory.sample()
    a = clock()
    frames = sched.flush()
    compute += clock() - a
    deliver(frames)
    return PacedRun(sink.frames, arrivals, compute, clock() - t0, first)


def first_chunk_calls(sched: StreamScheduler) -> dict[str, float]:
    """Each streaming module's and the conversion's latest call (ms), as the scheduler timed
    them."""
    out = {m: float(sched.stats.module_ms[m].recent()[-1]) for m in STREAM_MODULES}
    out["convert"] = float(sched.stats.convert_ms.recent()[-1])
    return out


@dataclass
class Timings:
    """Raw per-call latencies gathered over several scheduler runs."""

    ms: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {m: [] for m in ("appearance", *STREAM_MODULES, "convert")}
    )

    def add(self, sched: StreamScheduler) -> None:
        for name, ring in sched.stats.module_ms.items():
            self.ms.setdefault(name, []).append(ring.recent().copy())
        self.ms["convert"].append(sched.stats.convert_ms.recent().copy())

    def summary(self, chunk: int) -> dict[str, dict]:
        out = {}
        for name, parts in self.ms.items():
            a = np.concatenate(parts) if parts else np.zeros(0)
            per_call_frames = 1 if name == "appearance" else chunk
            if a.size:
                p50, p95 = float(np.percentile(a, 50)), float(np.percentile(a, 95))
            else:
                p50 = p95 = 0.0
            out[name] = {
                "p50_ms": round(p50, 4),
                "p95_ms": round(p95, 4),
                "calls": int(a.size),
                "per_frame_p50_ms": round(p50 / per_call_frames, 4),
            }
        return out


def _stat(values: list[float], digits: int = 4) -> tuple[float, dict]:
    v = [float(x) for x in values]
    return round(float(np.median(v)), digits), {
        "min": round(min(v), digits),
        "max": round(max(v), digits),
        "values": [round(x, digits) for x in v],
    }


def measure(
    backend: Backend,
    avatar: np.ndarray,
    pcm: np.ndarray,
    settings: Settings,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Warm up, then R throughput runs and R paced runs. Returns the measured record fields."""
    return measure_group([backend], avatar, pcm, settings, clock, sleep, log)[0]


def measure_group(
    backends: list[Backend],
    avatar: np.ndarray,
    pcm: np.ndarray,
    settings: Settings,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """measure() for backends of one chunk size, their throughput runs interleaved chunk by
    chunk (interleaved_throughput). The paced runs (FFD) are real time and stay one backend
    at a time. With several backends, peak RSS is of all of them held together."""
    cfg = backends[0].cfg
    memory = PeakMemory().start()
    timings = [Timings() for _ in backends]

    def scheduler(backend: Backend, overlap: bool = False) -> StreamScheduler:
        s = StreamScheduler(backend, avatar, seed=settings.seed, clock=clock, overlap=overlap)
        memory.sample()
        return s

    # Warm-up (excluded): at least two chunks' worth past the lookahead.
    look_frames = -(-cfg.lookahead_samples // SAMPLES_PER_FRAME)
    warm_frames = max(int(round(settings.warmup_seconds * FPS)), 2 * cfg.chunk + look_frames)
    warm = np.tile(pcm, -(-warm_frames * SAMPLES_PER_FRAME // pcm.shape[0]))
    for backend in backends:
        warm_sched = scheduler(backend, settings.overlap)
        throughput_run(warm_sched, warm[: warm_frames * SAMPLES_PER_FRAME], clock, memory)
        warm_sched.close()

    runs: list[list[ThroughputRun]] = [[] for _ in backends]
    for rep in range(settings.repeats):
        # Throughput only: a paced (live) stream has no next chunk in hand to overlap with.
        scheds = [scheduler(b, settings.overlap) for b in backends]
        if len(scheds) == 1:
            done = [throughput_run(scheds[0], pcm, clock, memory)]
        else:
            done = interleaved_throughput(scheds, pcm, clock, memory, first=rep)
        for i, (sched, run) in enumerate(zip(scheds, done, strict=True)):
            runs[i].append(run)
            timings[i].add(sched)
            sched.close()
    if log:
        fps = ", ".join(f"{np.median([r.fps for r in rs]):.1f}" for rs in runs)
        how = " (interleaved)" if len(backends) > 1 else ""
        how += " (decoder overlapped)" if settings.overlap else ""
        log(f"throughput {fps} fps{how}")

    paced: list[list[PacedRun]] = [
        [
            paced_run(scheduler(b), pcm, settings.piece_ms, clock, sleep, memory)
            for _ in range(settings.repeats)
        ]
        for b in backends
    ]
    return [
        _record(b.cfg, r, p, t, memory, len(backends))
        for b, r, p, t in zip(backends, runs, paced, timings, strict=True)
    ]


def _record(
    cfg,
    runs: list[ThroughputRun],
    paced: list[PacedRun],
    timings: Timings,
    memory: PeakMemory,
    interleaved: int,
) -> dict:
    fps, fps_spread = _stat([r.fps for r in runs], 3)
    rtf_tp, _ = _stat([r.rtf for r in runs])
    ffd, ffd_spread = _stat([p.ffd_ms for p in paced], 3)
    rtf, rtf_spread = _stat([p.rtf for p in paced])
    misses = [p.misses() for p in paced]
    miss, miss_spread = _stat([m[0] for m in misses])
    late, _ = _stat([m[1] for m in misses], 3)
    # the first frame's chunk, per part (median over the paced runs); "other" is what FFD holds
    # beyond the floor and these calls: the scheduler's own code and the pacing's wake-up
    first = {
        k: round(float(np.median([p.first_chunk_ms[k] for p in paced])), 4)
        for k in paced[0].first_chunk_ms
    }
    if first:
        floor = first_frame_floor_ms(cfg.chunk, cfg.lookahead_samples)
        first["other"] = round(ffd - floor - sum(first.values()), 4)
    return {
        "chunk": cfg.chunk,
        "lookahead_ms": cfg.lookahead_ms,
        "resolution": cfg.render.resolution,
        "steps": cfg.generator.steps,
        "window": cfg.generator.window,
        "model": cfg.name,
        "frames": runs[0].frames,
        "media_seconds": round(runs[0].frames * FRAME_S, 4),
        "fps": fps,
        "first_frame_delay_ms": ffd,
        "first_frame_floor_ms": round(first_frame_floor_ms(cfg.chunk, cfg.lookahead_samples), 3),
        "rtf": rtf,
        "rtf_throughput": rtf_tp,
        "deadline_miss_rate": miss,
        "max_late_ms": late,
        "spread": {
            "fps": fps_spread,
            "first_frame_delay_ms": ffd_spread,
            "rtf": rtf_spread,
            "deadline_miss_rate": miss_spread,
        },
        "modules": timings.summary(cfg.chunk),
        "first_chunk_ms": first,
        "peak_rss_mb": memory.peak_rss_mb(),
        "gpu_peak_mb": memory.gpu_peak_mb(),
        "interleaved_with": interleaved - 1,
    }
