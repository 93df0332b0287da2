"""The streaming chunk scheduler, shared by every backend.

It owns all state: the KV cache and its RAPR positions, the audio encoder's state, the audio not
yet consumed (including the lookahead), the previous motion, the noise stream and the
continuity of the shown motion across chunks (continuity.py). Audio arrives in pieces of any
size with no known total length; frames leave with presentation times.

Timeline: frame i shows audio samples [640 i, 640 (i + 1)) and is presented at i / 25 s. A chunk
of C frames starting at frame s needs audio up to the end of frame s + C + L.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..models.config import FPS, MAX_SEED, SAMPLES_PER_FRAME
from ..models.io_spec import per_avatar_feed
from ..models.motion import INDEX, MOUTH
from .backend import Backend
from .cache import KVCache
from .continuity import BoundaryBlend
from .rest_pose import KEEP, MouthRest

SILENCE_RMS = 3e-3  # about -50 dBFS: below this a frame counts as silent
MAX_QUEUED_SECONDS = 120.0  # cap on audio waiting to be consumed (live sources must not pile up)
TIMING_WINDOW = 4096  # per-module latency samples kept (bounded: memory stays flat)


@dataclass
class Frame:
    index: int
    pts: float  # presentation time in seconds
    rgb: np.ndarray  # [R, R, 3] uint8
    # The audio the frame shows, timeline samples [640 index, 640 (index + 1)) at 16 kHz: the
    # scheduler's frames always carry it (zeros where the end of a stream was padded).
    audio: np.ndarray | None = None  # own voice, [640] float32
    partner: np.ndarray | None = None  # the partner's voice, or None when none was ever pushed


class LatencyRing:
    """The last TIMING_WINDOW latencies of one module, in a preallocated buffer (flat memory)."""

    def __init__(self, size: int = TIMING_WINDOW):
        self.values = np.zeros(size, dtype=np.float64)
        self.count = 0

    def append(self, ms: float) -> None:
        self.values[self.count % self.values.shape[0]] = ms
        self.count += 1

    def recent(self) -> np.ndarray:
        return self.values[: min(self.count, self.values.shape[0])]

    def __len__(self) -> int:
        return min(self.count, self.values.shape[0])


@dataclass
class StreamStats:
    chunks: int = 0
    frames: int = 0
    module_ms: dict[str, LatencyRing] = field(
        default_factory=lambda: {
            m: LatencyRing() for m in ("appearance", "audio", "generator", "decoder")
        }
    )
    convert_ms: LatencyRing = field(default_factory=LatencyRing)
    dropped_audio_samples: int = 0  # discarded by interrupt()

    def percentiles(self) -> dict[str, dict[str, float]]:
        out = {}
        for m, ring in self.module_ms.items():
            if len(ring):
                a = ring.recent()
                out[m] = {
                    "p50": float(np.percentile(a, 50)),
                    "p95": float(np.percentile(a, 95)),
                    "calls": ring.count,
                }
        return out


def frame_rms(pcm: np.ndarray, frames: int) -> np.ndarray:
    return np.sqrt(np.mean(pcm[: frames * SAMPLES_PER_FRAME].reshape(frames, -1) ** 2, axis=1))


def talk_listen_mask(own: np.ndarray, partner: np.ndarray | None, frames: int) -> np.ndarray:
    """1 where the avatar speaks (or nobody does), 0 where only the partner speaks.

    Training data derives its mask with this same function, so the model sees the same signal.
    """
    if partner is None:
        return np.ones(frames, dtype=np.float32)
    own_rms, partner_rms = frame_rms(own, frames), frame_rms(partner, frames)
    listening = (partner_rms > SILENCE_RMS) & (partner_rms > 2.0 * own_rms)
    return (~listening).astype(np.float32)


MOUTH_INDEX = [INDEX[name] for name in MOUTH]  # where the mouth readout's outputs go
AUDIO_CHUNK_INPUTS = ("pcm", "talk_mask")  # the audio encoder's other inputs are its state


def to_uint8(frames: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Frames in [0, 1] as 8-bit levels, rounded half up (values outside are clipped), as
    (clip(frames, 0, 1) * 255 + 0.5).astype(uint8) gives them, computed in `scratch` (float32,
    the frames' shape, best in their memory order) and returned in a new array."""
    np.multiply(frames, 255.0, out=scratch)
    return _rounded_levels(scratch).astype(np.uint8)


def to_uint8_into(frames: np.ndarray, dest: np.ndarray) -> None:
    """to_uint8 of `frames` (float32, overwritten: it is the scratch) written into `dest`
    (uint8, the same shape): the same bytes."""
    np.multiply(frames, 255.0, out=frames)
    np.copyto(dest, _rounded_levels(frames), casting="unsafe")  # truncates, as astype does


def _rounded_levels(scaled: np.ndarray) -> np.ndarray:
    """Levels x 255 (in place) to the values whose truncation rounds them half up in 0..255."""
    np.add(scaled, 0.5, out=scaled)
    return np.clip(scaled, 0.0, 255.5, out=scaled)  # 255.5 truncates to 255, as 1.0 does


class StreamScheduler:
    def __init__(
        self,
        backend: Backend,
        avatar: np.ndarray,  # [R, R, 3] uint8, already prepared
        seed: int = 0,
        clock: Callable[[], float] = time.perf_counter,
        mouth_rest: MouthRest = KEEP,  # the photo's open mouth, closed at rest (rest_pose.py)
        overlap: bool = False,
    ):
        """`overlap`: the decoder of chunk k runs on a worker thread while the caller computes
        chunk k+1's audio and motion, so frames come back one chunk later (push_audio returns
        the previous chunk's; flush returns the rest). For rendering as fast as possible with
        threads to spare (`edgetalk run` from a file); a live stream, whose next chunk's audio
        has not arrived yet, would only be delayed. Only backends whose modules may run at the
        same time from two threads take it (Backend.concurrent_modules); others run in turn."""
        cfg = backend.cfg
        res = cfg.render.resolution
        if avatar.shape != (res, res, 3) or avatar.dtype != np.uint8:
            raise InputError(
                f"avatar must be a {res}x{res}x3 uint8 image, got {avatar.dtype}{avatar.shape}"
            )
        if (
            isinstance(seed, bool)
            or not isinstance(seed, int | np.integer)
            or not 0 <= seed <= MAX_SEED
        ):
            raise InputError(f"seed must be a whole number in 0..{MAX_SEED}, got {seed!r}")
        self.backend = backend
        self.cfg = cfg
        self.chunk = cfg.chunk
        self.lookahead_samples = cfg.lookahead_samples
        self.seed = seed
        self.clock = clock
        self.mouth_rest = mouth_rest
        self.stats = StreamStats()
        # the frames' 8-bit conversion works in this buffer: three fresh 3-MB arrays a chunk
        # (clip, scale, round) cost a quarter of the conversion's time at C=4
        self._levels = np.empty(0, np.float32)
        self.image = (avatar.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
        # every decoder input but the motion: the photo and what the appearance stage made of
        # it, with what the backend derives from them once (Backend.prepare_photo), all timed
        # as the appearance stage
        t0 = self.clock()
        app = self.backend.run("appearance", {"image": self.image})
        self.photo = per_avatar_feed(backend.io, self.image, app)
        # the generator's: the reference motion (and its token's pass, where the backend
        # derives it once)
        self.reference = {"ref_motion": app["ref_motion"]}
        prepare = getattr(backend, "prepare_photo", None)  # duck-typed wrappers have none
        if prepare is not None:
            self.photo = prepare(self.photo)
            self.reference = prepare(self.reference, "generator")
        self.stats.module_ms["appearance"].append((self.clock() - t0) * 1000.0)
        # the backend decides where K/V live; a duck-typed wrapper without new_cache gets numpy
        make_cache = getattr(backend, "new_cache", None)
        self.cache = make_cache(cfg) if make_cache else KVCache(cfg)
        self.blend = BoundaryBlend(cfg.chunk)
        self._pending: Future | None = None  # the chunk on the worker (overlap)
        self._overlap: ThreadPoolExecutor | None = None
        if overlap and backend.concurrent_modules:
            self._overlap = ThreadPoolExecutor(1, thread_name_prefix="edgetalk-decode")
            self._overlap.submit(int)  # its one thread starts now, not on the first backlog
            weakref.finalize(self, self._overlap.shutdown, wait=False)
        self.reset()

    @property
    def overlapping(self) -> bool:
        return self._overlap is not None

    @property
    def pending(self) -> bool:
        """A chunk's decoder is running on the worker (overlap): drain() returns its frames."""
        return self._pending is not None

    def drain(self) -> list[Frame]:
        """The frames of the chunk whose decoder is on the worker, once it is done; [] when none.
        A live stream calls it whenever the next chunk's audio is not in hand, so overlap
        never holds frames back while audio is awaited (runtime/session.py)."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else []

    def close(self) -> None:
        """Let the overlap worker go (it also goes with the scheduler)."""
        self._pending = None
        if self._overlap is not None:
            self._overlap.shutdown(wait=True)
            self._overlap = None

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new stream with the same avatar (same seed, so the same noise sequence)."""
        self.drain()  # a chunk still on the worker belongs to the old stream
        # The audio encoder's streaming state: every input but the chunk's own (pcm_state,
        # conv_state, and mel_state where the encoder normalizes), each returned as NAME_out.
        audio_io = self.backend.io["audio"]
        self.audio_state = {
            t.name: np.zeros(t.shape, dtype=np.float32)
            for t in audio_io.inputs
            if t.name not in AUDIO_CHUNK_INPUTS
        }
        self.cache.reset()
        self.blend.reset()
        self.rng = np.random.default_rng(self.seed)
        self.prev_motion = np.zeros((1, self.cfg.motion_dim), dtype=np.float32)
        self.own = np.zeros(0, dtype=np.float32)  # audio not yet consumed, starting at next_frame
        self.partner = np.zeros(0, dtype=np.float32)
        self.partner_seen = False
        self.next_frame = 0
        self.samples_in = 0  # samples received on the own-voice timeline since the stream began
        self.last_motion: np.ndarray | None = None  # the chunk's motion as shown [C, P]

    @property
    def queued_seconds(self) -> float:
        return self.own.shape[0] / (FPS * SAMPLES_PER_FRAME)

    # ---- input -------------------------------------------------------------------------------
    def push_audio(self, own: np.ndarray, partner: np.ndarray | None = None) -> list[Frame]:
        """Queue 16 kHz mono float32 audio (any length) and return every frame it completes."""
        own = _as_pcm(own, "audio")
        if partner is not None:
            partner = _as_pcm(partner, "partner audio")
            if partner.shape != own.shape:
                raise InputError(
                    f"partner audio piece has {partner.shape[0]} samples, own voice {own.shape[0]}; "
                    "push them in equal pieces"
                )
            self.partner_seen = True
        else:
            partner = np.zeros_like(own)
        queued = self.own.shape[0] + own.shape[0]
        if queued > MAX_QUEUED_SECONDS * FPS * SAMPLES_PER_FRAME:
            raise InputError(
                f"more than {MAX_QUEUED_SECONDS:.0f} s of audio queued; push at most that much ahead "
                "of what the scheduler has consumed"
            )
        self.own = np.concatenate([self.own, own])
        self.partner = np.concatenate([self.partner, partner])
        self.samples_in += own.shape[0]
        frames: list[Frame] = []
        need = self.cfg.chunk_samples  # the chunk and the lookahead after it
        while self.own.shape[0] >= need:
            frames.extend(self._step())
        return frames

    def push_silence(self, seconds: float) -> list[Frame]:
        """Keep the avatar alive (idle motion, closed mouth) while no audio arrives."""
        n = int(round(seconds * FPS * SAMPLES_PER_FRAME))
        return self.push_audio(
            np.zeros(n, np.float32), np.zeros(n, np.float32) if self.partner_seen else None
        )

    def flush(self) -> list[Frame]:
        """End of stream: render every frame the received audio covers, the partial chunk too.

        The last frame carries the samples received, zero-padded to its 640."""
        total = math.ceil(self.samples_in / SAMPLES_PER_FRAME)
        frames: list[Frame] = []
        need = self.cfg.chunk_samples  # the chunk and the lookahead after it
        while self.next_frame < total:
            pad = max(0, need - self.own.shape[0])
            self.own = np.concatenate([self.own, np.zeros(pad, np.float32)])
            self.partner = np.concatenate([self.partner, np.zeros(pad, np.float32)])
            frames.extend(f for f in self._step() if f.index < total)
        frames.extend(f for f in self.drain() if f.index < total)
        # Lookahead padding belongs to no frame; drop it so the stream can go on cleanly.
        self.own = self.own[:0]
        self.partner = self.partner[:0]
        self.samples_in = self.next_frame * SAMPLES_PER_FRAME
        return frames

    def interrupt(self) -> int:
        """Drop every queued sample (barge-in). The avatar continues from its current motion.

        Returns the number of samples dropped. Frames already returned are the caller's to drop.
        """
        self.drain()  # with overlap, a chunk not yet returned: dropped like the audio
        dropped = self.own.shape[0]
        self.own = self.own[:0]
        self.partner = self.partner[:0]
        self.samples_in = self.next_frame * SAMPLES_PER_FRAME
        self.stats.dropped_audio_samples += dropped
        return dropped

    # ---- one chunk ---------------------------------------------------------------------------
    def _run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = self.clock()
        out = self.backend.run(module, inputs)
        self.stats.module_ms[module].append((self.clock() - t0) * 1000.0)
        return out

    def _step(self) -> list[Frame]:
        job = self._motion_chunk()
        if self._overlap is None:
            return self._render(*job)
        # The decoder of this chunk runs on the worker while the caller goes on to the next
        # chunk's audio and generator; the previous chunk's frames are returned now.
        done = self.drain()
        self._pending = self._overlap.submit(self._render, *job)
        return done

    def _motion_chunk(self):
        """Audio, generator and the shown motion of the next chunk; every stream state advances
        here, on the caller's thread. -> what _render needs."""
        c, spf = self.chunk, SAMPLES_PER_FRAME
        n = self.cfg.chunk_samples
        own, partner = self.own[:n], self.partner[:n]
        mask = talk_listen_mask(own, partner if self.partner_seen else None, c)[None]
        audio = self._run(
            "audio",
            {
                "pcm": np.stack([own, partner])[None],
                "talk_mask": mask,
                **self.audio_state,
            },
        )
        self.audio_state = {name: audio[f"{name}_out"] for name in self.audio_state}
        cache_pos, query_pos = self.cache.positions(self.next_frame)
        noise = self.rng.standard_normal((1, c, self.cfg.motion_dim)).astype(np.float32)
        gen = self._run(
            "generator",
            {
                "audio_tokens": audio["audio_tokens"],
                "talk_mask": mask,
                **self.reference,
                "prev_motion": self.prev_motion,
                "noise": noise,
                "k_cache": self.cache.k,
                "v_cache": self.cache.v,
                "cache_valid": self.cache.valid,
                "cache_pos": cache_pos,
                "query_pos": query_pos,
            },
        )
        self.cache.write(gen["new_k"], gen["new_v"], self.next_frame)
        # The generator's own motion stays its context (prev_motion, cache); the decoder shows it
        # made continuous across the chunk boundary (continuity.py: the judder fix).
        self.prev_motion = np.ascontiguousarray(gen["motion"][:, -1])
        motion = self.blend(gen["motion"][0])[None]
        if "mouth" in audio:  # the mouth readout leads the shown mouth in speech
            motion = motion.copy()  # never the blend's own state
            shown = motion[0][:, MOUTH_INDEX]
            w = self.cfg.audio.readout_mix * audio["mouth_weight"][0][:, None]  # [C, 1]
            # a linear map can leave the range the decoder was trained on ([0, 1]: 0 = as in
            # the photo); past it the mouth bases extrapolate (lips pushed through each other)
            readout = np.clip(audio["mouth"][0], 0.0, 1.0)
            motion[0][:, MOUTH_INDEX] = shown + w * (readout - shown)
        motion = self.mouth_rest.apply(motion)  # onto the photo's own mouth; a copy if it moves
        self.last_motion = motion[0]
        start = self.next_frame
        # Copied, so that frames kept by a caller do not pin the whole queued audio.
        shown = own[: c * spf].reshape(c, spf).copy()
        shown_p = partner[: c * spf].reshape(c, spf).copy() if self.partner_seen else [None] * c
        self.own, self.partner = self.own[c * spf :], self.partner[c * spf :]
        self.next_frame += c
        self.stats.chunks += 1
        self.stats.frames += c
        return motion, start, shown, shown_p

    def _render(self, motion, start: int, shown, shown_p) -> list[Frame]:
        """The decoder and the 8-bit conversion of one chunk: no stream state is read or written
        here but the conversion buffer, so with overlap it runs on the worker thread."""
        inputs = {**self.photo, "motion": motion}
        levels = getattr(self.backend, "decode_levels", None)  # duck-typed wrappers have none
        t0 = self.clock()
        rgb = levels(inputs) if levels is not None else None
        if rgb is not None:
            # the backend converted each frame as it rendered it: the conversion is in the
            # decoder's time, and none is left to time apart
            self.stats.module_ms["decoder"].append((self.clock() - t0) * 1000.0)
            self.stats.convert_ms.append(0.0)
        else:
            frames = self._run("decoder", inputs)["frames"]
            t0 = self.clock()
            if self._levels.shape != frames.shape or self._levels.strides != frames.strides:
                # the frames' own memory order (torch's are channels-last views): numpy then
                # runs each pass in one sweep; a C-ordered buffer made torch's conversion 40%
                # slower
                self._levels = np.empty_like(frames, dtype=np.float32)
            rgb = to_uint8(frames, self._levels)
            self.stats.convert_ms.append((self.clock() - t0) * 1000.0)
        c = len(shown)
        return [Frame(start + i, (start + i) / FPS, rgb[i], shown[i], shown_p[i]) for i in range(c)]


def _as_pcm(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise InputError(f"{what} must be mono 1-D samples, got shape {x.shape}")
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"{what} contains NaN or Inf samples")
    return x
