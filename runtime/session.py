"""A live session: push audio from any thread, read frames from another, interrupt at any time.

    with Session(avatar="me.jpg") as s:          # threads: yours push, yours read, one worker
        s.push_audio(tts_chunk)                   # float32 or int16, 16 kHz mono (or sample_rate=)
        for t, rgb in s.frames(): ...             # (seconds, HxWx3 uint8), paced in real time

Threads and queues (all bounded):
- The caller pushes audio into the input queue (`push_audio`, `push_partner`). The input queue holds
  at most MAX_INPUT_SECONDS; a push beyond that waits (backpressure) and an interrupt releases it.
  Unpaired partner audio (`push_partner`) is capped at MAX_PARTNER_SECONDS (oldest dropped).
- One worker thread owns the StreamScheduler. It takes at most one chunk of audio at a time, so
  an interrupt cuts in within one chunk of compute. In realtime mode, when the audio timeline falls
  more than a chunk behind the wall clock (or no audio has come for a chunk), it feeds silence up
  to the wall clock, so the avatar keeps idling: a stream never needs its length up front.
- Rendered frames wait in the output queue (MAX_QUEUED_FRAMES, plus the chunk being added) until
  `frames()` takes them; beyond that the worker waits.

One A/V timeline: the frames the session hands out (or drops as late) are numbered 0, 1, 2, ...
with pts = index / 25, and every frame carries the audio of its 640-sample span (`frame.audio`,
including inserted silence), so a sink that writes each frame and then its audio stays in sync
however long the stream runs. Frames discarded by an interrupt never reach the timeline.

Real time: frame i is presented at t0 + i / 25, where t0 is when the first frame was delivered.
`frames()` waits for that moment. A frame more than one chunk past it is late, and the late policy
decides: "drop" skips it (its audio moves to the next delivered frame, the timeline advances) and
the worker skips rendering audio whose frames would already be late, so it catches up; "mark"
delivers it with `late=True`. Both are counted in `stats`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

MAX_INPUT_SECONDS = 60.0  # audio waiting for the worker; push_audio waits beyond this
MAX_PARTNER_SECONDS = 5.0  # unpaired partner audio waiting; the oldest is dropped beyond this
MAX_QUEUED_FRAMES = 50  # rendered frames (2 s) waiting for frames(); the worker waits beyond this
PUSH_PIECE_SECONDS = 1.0  # long pushes are queued in pieces of this size
TICK_S = 0.01  # worker/reader poll period while idle
LATE_POLICIES = ("drop", "mark")


class SessionClosed(InputError):
    """Audio was pushed into a session whose input is closed."""


class LiveFrame(tuple):
    """`(timestamp_seconds, rgb)`, with `index`, `late`, `audio` (the own-voice samples of this
    frame's span, plus those of frames dropped just before it) and `partner_audio` (or None)."""

    def __new__(cls, index, rgb, late=False, audio=None, partner_audio=None):
        self = super().__new__(cls, (index / FPS, rgb))
        self.index = index
        self.late = late
        self.audio = audio if audio is not None else np.zeros(SAMPLES_PER_FRAME, np.float32)
        self.partner_audio = partner_audio
        return self

    @property
    def t(self) -> float:
        return self[0]

    @property
    def rgb(self) -> np.ndarray:
        return self[1]


@dataclasses.dataclass
class SessionStats:
    frames: int = 0  # delivered by frames()
    late: int = 0  # delivered late ("mark")
    dropped: int = 0  # on the timeline but not delivered ("drop"): late frames + skipped ones
    skipped: int = 0  # of `dropped`: audio the worker did not render, to catch up
    interruptions: int = 0
    interrupted_frames: int = 0  # rendered but discarded by interrupt() (never on the timeline)
    interrupted_audio_s: float = 0.0  # queued audio discarded by interrupt()
    silence_s: float = 0.0  # silence fed while no audio came (realtime idling)
    partner_dropped_s: float = 0.0
    first_frame_delay_s: float | None = None  # first audio on the timeline -> first frame out
    floor_s: float = 0.0  # (C + L) * 40 ms: the audio the first chunk needs
    wall_s: float = 0.0  # from the start of the stream to now (or its end)
    chunk: int = 0
    realtime: bool = True
    late_policy: str = "drop"

    @property
    def timeline_frames(self) -> int:
        return self.frames + self.dropped

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(fps=self.fps, timeline_frames=self.timeline_frames)
        return d

    def summary(self) -> str:
        ffd = (
            "n/a"
            if self.first_frame_delay_s is None
            else f"{self.first_frame_delay_s * 1000:.0f} ms (floor {self.floor_s * 1000:.0f} ms)"
        )
        lines = [
            f"frames {self.frames} in {self.wall_s:.2f} s ({self.fps:.1f} FPS), "
            f"timeline {self.timeline_frames / FPS:.2f} s, first-frame delay {ffd}",
            f"late policy {self.late_policy}: {self.late} late, {self.dropped} dropped "
            f"({self.skipped} skipped to catch up); interruptions {self.interruptions} "
            f"({self.interrupted_frames} frames, {self.interrupted_audio_s:.2f} s audio discarded); "
            f"silence fed {self.silence_s:.2f} s",
        ]
        if self.partner_dropped_s:
            lines.append(f"partner audio dropped (backlog): {self.partner_dropped_s:.2f} s")
        return "\n".join(lines)


@dataclasses.dataclass
class _Out:
    index: int  # timeline index of the (first) frame
    rgb: np.ndarray | None  # None: `n` frames skipped by the worker to catch up
    audio: np.ndarray
    partner: np.ndarray | None
    n: int = 1


class Session:
    def __init__(
        self,
        avatar: str | Path | np.ndarray | None = None,
        bundle: str | Path | None = None,
        checkpoint: str | Path | None = None,
        backend=None,  # a backend name, or an already opened Backend
        seed: int = 0,
        face_check: bool = True,
        realtime: bool = True,
        late_policy: str = "drop",
        chunk: int | None = None,
        max_queued_frames: int = MAX_QUEUED_FRAMES,
        clock=time.monotonic,
    ):
        from .avatar import prepare_avatar
        from .backend import Backend
        from .scheduler import StreamScheduler

        if late_policy not in LATE_POLICIES:
            raise InputError(f"late policy must be one of {LATE_POLICIES}, got {late_policy!r}")
        if isinstance(backend, Backend):
            if bundle is not None or checkpoint is not None:
                raise InputError("give an opened backend or a bundle/checkpoint, not both")
            self.backend = backend
        else:
            from .loader import open_backend

            self.backend = open_backend(
                bundle=bundle, checkpoint=checkpoint, backend=backend, chunk=chunk
            )
        self.resolution = self.backend.cfg.render.resolution
        self.avatar = prepare_avatar(avatar, self.resolution, face_check=face_check)
        self.scheduler = StreamScheduler(self.backend, self.avatar, seed=seed)
        self.realtime = realtime
        self.late_policy = late_policy
        self.chunk = self.scheduler.chunk
        self.chunk_s = self.chunk / FPS
        self.max_queued_frames = max(1, int(max_queued_frames))
        self.clock = clock
        self._stats = SessionStats(
            floor_s=(self.chunk + self.scheduler.lookahead) / FPS,
            chunk=self.chunk,
            realtime=realtime,
            late_policy=late_policy,
        )
        self._cond = threading.Condition()
        # input side
        self._in: deque[tuple[np.ndarray, np.ndarray | None]] = deque()
        self._in_samples = 0
        self._partner: deque[np.ndarray] = deque()
        self._partner_samples = 0
        self._resamplers: dict[tuple[str, int], object] = {}
        self._last_push: float | None = None
        # worker side (the mirror is the audio the scheduler has queued, frame-aligned at its start)
        self._m_own = np.zeros(0, np.float32)
        self._m_partner = np.zeros(0, np.float32)
        self._sched_interrupt = False
        self._tl_next = 0  # next timeline index to hand out
        self._compute_s = 0.0  # recent compute time of one chunk (moving average)
        self._epoch = 0
        # output side
        self._out: deque[_Out] = deque()
        self._carry: list[np.ndarray] = []
        self._carry_partner: list[np.ndarray] = []
        self._t0: float | None = None
        # lifecycle
        self._origin: float | None = None
        self._end: float | None = None
        self._thread: threading.Thread | None = None
        self._input_closed = False
        self._done = False
        self._aborted = False
        self._error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the stream (also done by the first push_audio or frames()). In realtime mode the
        timeline starts now: the avatar idles until audio arrives."""
        with self._cond:
            if self._thread is not None:
                return
            if self.realtime:
                self._origin = self._last_push = self.clock()
            self._thread = threading.Thread(
                target=self._worker, name="edgetalk-session", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """End of input: the queued audio and the partial last chunk are rendered, then frames()
        ends. Idempotent; returns at once (read frames() to get the rest)."""
        self.start()
        with self._cond:
            if self._input_closed:
                return
            for (which, _), rs in self._resamplers.items():
                if which == "own":
                    self._enqueue_locked(rs.flush(), None)
            self._input_closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Stop now: discard queued audio and frames and end the worker. Idempotent."""
        with self._cond:
            self._aborted = self._input_closed = True
            self._in.clear()
            self._in_samples = 0
            self._out.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10.0)
        with self._cond:
            if self._end is None:
                self._end = self.clock()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        """Leaving the block ends the session; frames not read by then are discarded."""
        self.close()
        self.abort()

    @property
    def stats(self) -> SessionStats:
        with self._cond:
            s = dataclasses.replace(self._stats)
            if self._origin is not None:
                s.wall_s = (self._end or self.clock()) - self._origin
        return s

    @property
    def done(self) -> bool:
        return self._done

    # ---- input -----------------------------------------------------------------------------------
    def push_audio(
        self,
        pcm: np.ndarray,
        partner: np.ndarray | None = None,
        sample_rate: int = SAMPLE_RATE,
        block: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Queue own-voice audio (and optionally the partner's, same length), any piece size.

        float32 in [-1, 1] or int16; mono, or [samples, channels] (downmixed). Other rates are
        resampled continuously across pieces. Waits while MAX_INPUT_SECONDS are queued (or raises
        InputError when block=False or after `timeout`); an interrupt() during the wait discards
        the rest of this piece.
        """
        self.start()
        own = self._convert(pcm, sample_rate, "own", "audio")
        par = None
        if partner is not None:
            par = self._convert(partner, sample_rate, "partner-paired", "partner audio")
            if par.shape[0] != own.shape[0]:  # resampler edges can differ by a sample or two
                if abs(par.shape[0] - own.shape[0]) > 2 and sample_rate == SAMPLE_RATE:
                    raise InputError(
                        f"partner audio piece has {par.shape[0]} samples, own voice "
                        f"{own.shape[0]}; push them in equal pieces"
                    )
                par = np.pad(par, (0, max(0, own.shape[0] - par.shape[0])))[: own.shape[0]]
        cap = int(MAX_INPUT_SECONDS * SAMPLE_RATE)
        step = int(PUSH_PIECE_SECONDS * SAMPLE_RATE)
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            if self._input_closed:
                raise SessionClosed("the session is closed; no more audio can be pushed")
            epoch = self._epoch
            for i in range(0, own.shape[0], step):
                n = min(step, own.shape[0] - i)
                while self._in_samples and self._in_samples + n > cap:
                    if self._error is not None or self._done:
                        raise SessionClosed(f"the session stopped ({self._error or 'ended'})")
                    if self._epoch != epoch:
                        return  # interrupted while waiting: the rest of this speech is dropped
                    if self._input_closed:
                        raise SessionClosed("the session closed while audio was waiting")
                    left = None if deadline is None else deadline - self.clock()
                    if not block or (left is not None and left <= 0):
                        raise InputError(
                            f"more than {MAX_INPUT_SECONDS:.0f} s of audio is waiting; push slower "
                            "or read frames()"
                        )
                    self._cond.wait(0.1 if left is None else min(0.1, left))
                self._enqueue_locked(own[i : i + n], None if par is None else par[i : i + n])

    def push_partner(self, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        """Queue the partner's voice on its own (e.g. a second microphone). It is aligned to the
        own voice as that is consumed (silence included); beyond MAX_PARTNER_SECONDS of backlog
        the oldest partner audio is dropped (counted)."""
        self.start()
        x = self._convert(pcm, sample_rate, "partner", "partner audio")
        with self._cond:
            if self._input_closed:
                raise SessionClosed("the session is closed; no more audio can be pushed")
            if x.size:
                self._partner.append(x)
                self._partner_samples += x.shape[0]
            cap = int(MAX_PARTNER_SECONDS * SAMPLE_RATE)
            while self._partner_samples > cap:
                extra = self._partner_samples - cap
                head = self._partner[0]
                k = min(extra, head.shape[0])
                if k == head.shape[0]:
                    self._partner.popleft()
                else:
                    self._partner[0] = head[k:]
                self._partner_samples -= k
                self._stats.partner_dropped_s += k / SAMPLE_RATE

    def interrupt(self) -> int:
        """Barge-in: drop the queued audio and every rendered frame not yet delivered. The next
        frames continue the timeline from the last delivered frame, from the current motion.
        Returns the number of frames discarded (queued frames; the chunk in flight is also
        discarded when it completes)."""
        self.start()
        with self._cond:
            self._epoch += 1
            self._stats.interruptions += 1
            frames = sum(o.n for o in self._out if o.rgb is not None)
            if self._out:
                self._tl_next = self._out[0].index  # those frames were never shown
            self._out.clear()
            self._stats.interrupted_frames += frames
            self._stats.interrupted_audio_s += (
                self._in_samples + self._m_own.shape[0]
            ) / SAMPLE_RATE
            self._in.clear()
            self._in_samples = 0
            self._sched_interrupt = True
            if self.realtime:  # the avatar idles from here: silence may fill at once
                self._last_push = self.clock() - 2 * self.chunk_s
            self._cond.notify_all()
            return frames

    def _convert(self, pcm, rate: int, which: str, what: str) -> np.ndarray:
        from .audio_io import StreamResampler

        x = np.asarray(pcm)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        elif not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{what} must be float32 or int16 samples, got {x.dtype}")
        if x.ndim not in (1, 2):
            raise InputError(f"{what} must be [samples] or [samples, channels], got {x.shape}")
        if not np.isfinite(x).all():
            raise InputError(f"{what} contains NaN or Inf samples")
        if rate == SAMPLE_RATE and x.ndim == 1:
            return np.ascontiguousarray(np.clip(x, -1.0, 1.0), dtype=np.float32)
        key = (which, int(rate))
        rs = self._resamplers.get(key)
        if rs is None:
            with self._cond:
                rs = self._resamplers.setdefault(key, StreamResampler(rate))
        return rs(x)

    def _enqueue_locked(self, own: np.ndarray, partner: np.ndarray | None) -> None:
        if own.size == 0:
            return
        now = self.clock()
        if self._origin is None:
            self._origin = now  # offline: the timeline starts with the first audio
        self._last_push = now
        self._in.append((own, partner))
        self._in_samples += own.shape[0]
        self._cond.notify_all()

    # ---- output ----------------------------------------------------------------------------------
    def frames(self) -> Iterator[LiveFrame]:
        """Every frame of the stream, in order, until the input is closed and rendered (or
        abort()). In realtime mode each frame is handed out at its presentation time."""
        self.start()
        while True:
            with self._cond:
                while True:
                    self._raise_error_locked()
                    if self._out:
                        head = self._out[0]
                        if head.rgb is None:  # skipped by the worker: its audio goes on
                            self._out.popleft()
                            self._carry_locked(head)
                            self._cond.notify_all()
                            continue
                        now = self.clock()
                        late = False
                        if self.realtime and self._t0 is None:
                            # Anchor the presentation clock. Audio that keeps coming in real time
                            # needs (C + L) frames plus compute before its frame exists, so frames
                            # rendered early from a burst wait for that delay: later frames keep it.
                            self._t0 = max(
                                now - head.index / FPS,
                                self._origin + self._stats.floor_s + self._compute_s,
                            )
                        if self.realtime:
                            due = self._t0 + head.index / FPS
                            if now < due:
                                self._cond.wait(min(due - now, 0.05))
                                continue
                            late = now - due > self.chunk_s
                            if late and self.late_policy == "drop":
                                self._out.popleft()
                                self._carry_locked(head)
                                self._stats.dropped += 1
                                self._cond.notify_all()
                                continue
                        item = self._out.popleft()
                        self._cond.notify_all()
                        break
                    if self._done or self._aborted:
                        if self._end is None:
                            self._end = self.clock()
                        return
                    self._cond.wait(0.05)
                if self._stats.first_frame_delay_s is None:
                    self._stats.first_frame_delay_s = now - (self._origin or now)
                audio, partner = item.audio, item.partner
                if self._carry:
                    audio = np.concatenate([*self._carry, audio])
                    if partner is not None or any(p is not None for p in self._carry_partner):
                        partner = np.concatenate(
                            [
                                p if p is not None else np.zeros_like(a)
                                for a, p in zip(
                                    [*self._carry, item.audio],
                                    [*self._carry_partner, item.partner],
                                    strict=True,
                                )
                            ]
                        )
                    self._carry.clear()
                    self._carry_partner.clear()
                self._stats.frames += 1
                self._stats.late += int(late)
                frame = LiveFrame(item.index, item.rgb, late, audio, partner)
            yield frame

    def _carry_locked(self, item: _Out) -> None:
        self._carry.append(item.audio)
        self._carry_partner.append(item.partner)

    def _raise_error_locked(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._done = True
            raise err

    # ---- worker ----------------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # handed to the reader; frames() re-raises it
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            with self._cond:
                self._done = True
                if self._end is None and self._aborted:
                    self._end = self.clock()
                self._cond.notify_all()

    def _loop(self) -> None:
        sched = self.scheduler
        spf = SAMPLES_PER_FRAME
        while True:
            flush = False
            with self._cond:
                while True:
                    if self._aborted:
                        return
                    if self._sched_interrupt:
                        self._sched_interrupt = False
                        sched.interrupt()
                        self._m_own = self._m_own[:0]
                        self._m_partner = self._m_partner[:0]
                    if self.realtime and self.late_policy == "drop":
                        self._catch_up_locked()
                    if self._in_samples:
                        own, partner = self._take_locked(self.chunk * spf)
                        break
                    if self._input_closed:
                        flush = True
                        break
                    if self.realtime and self._fill_silence_locked():
                        continue
                    self._cond.wait(TICK_S)
                epoch = self._epoch
            t_compute = time.perf_counter()
            if flush:
                frames = sched.flush()
                n = len(frames) * spf
                pad = max(0, n - self._m_own.shape[0])
                self._m_own = np.pad(self._m_own, (0, pad))
                self._m_partner = np.pad(self._m_partner, (0, pad))
            else:
                self._m_own = np.concatenate([self._m_own, own])
                self._m_partner = np.concatenate(
                    [self._m_partner, partner if partner is not None else np.zeros_like(own)]
                )
                frames = sched.push_audio(own, partner)
            n = len(frames) * spf
            if frames:
                dt = (time.perf_counter() - t_compute) * self.chunk / len(frames)
                self._compute_s = dt if not self._compute_s else 0.8 * self._compute_s + 0.2 * dt
            audio, pa = self._m_own[:n], self._m_partner[:n]
            self._m_own, self._m_partner = self._m_own[n:], self._m_partner[n:]
            if flush:
                self._m_own, self._m_partner = self._m_own[:0], self._m_partner[:0]
            with self._cond:
                while (
                    frames
                    and len(self._out) >= self.max_queued_frames
                    and self._epoch == epoch
                    and not self._aborted
                ):
                    self._cond.wait(0.05)
                if self._epoch != epoch:
                    self._stats.interrupted_frames += len(frames)
                elif not self._aborted:
                    self._put_frames_locked(frames, audio, pa)
                if flush:
                    return

    def _put_frames_locked(self, frames, audio: np.ndarray, partner: np.ndarray) -> None:
        spf = SAMPLES_PER_FRAME
        has_partner = self.scheduler.partner_seen or self._partner_samples > 0 or partner.any()
        for i, f in enumerate(frames):
            span = slice(i * spf, (i + 1) * spf)
            self._out.append(
                _Out(self._tl_next, f.rgb, audio[span], partner[span] if has_partner else None)
            )
            self._tl_next += 1
        self._cond.notify_all()

    def _take_locked(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        owns, pairs = [], []
        got = 0
        while got < n and self._in:
            own, par = self._in[0]
            k = min(n - got, own.shape[0])
            owns.append(own[:k])
            pairs.append(None if par is None else par[:k])
            if k == own.shape[0]:
                self._in.popleft()
            else:
                self._in[0] = (own[k:], None if par is None else par[k:])
            got += k
        self._in_samples -= got
        own = owns[0] if len(owns) == 1 else np.concatenate(owns)
        fifo = self._take_partner_locked(got)
        if fifo is None and all(p is None for p in pairs):
            return own, None
        paired = np.concatenate(
            [p if p is not None else np.zeros_like(o) for o, p in zip(owns, pairs, strict=True)]
        )
        partner = paired if fifo is None else np.clip(paired + fifo, -1.0, 1.0)
        return own, partner

    def _take_partner_locked(self, n: int) -> np.ndarray | None:
        if not self._partner_samples:
            return None
        out = np.zeros(n, np.float32)
        got = 0
        while got < n and self._partner:
            head = self._partner[0]
            k = min(n - got, head.shape[0])
            out[got : got + k] = head[:k]
            if k == head.shape[0]:
                self._partner.popleft()
            else:
                self._partner[0] = head[k:]
            got += k
        self._partner_samples -= got
        return out

    def _timeline_samples_locked(self) -> int:
        """Own-voice samples on the timeline so far: delivered/queued frames, audio in the
        scheduler, and audio waiting in the input queue."""
        return self._tl_next * SAMPLES_PER_FRAME + self._m_own.shape[0] + self._in_samples

    def _fill_silence_locked(self) -> bool:
        """Realtime idling: keep the audio timeline up with the wall clock. Returns True if fed."""
        now = self.clock()
        gap = int((now - self._origin) * SAMPLE_RATE) - self._timeline_samples_locked()
        idle = now - (self._last_push or self._origin) > self.chunk_s
        if gap < SAMPLES_PER_FRAME or not (idle or gap > self.chunk * SAMPLES_PER_FRAME):
            return False
        n = gap // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
        self._in.append((np.zeros(n, np.float32), None))
        self._in_samples += n
        self._stats.silence_s += n / SAMPLE_RATE
        return True

    def _catch_up_locked(self) -> None:
        """Late policy "drop": audio whose frames would be more than a chunk late when shown is
        not rendered; its frames are dropped (counted) and the timeline moves on."""
        if self._t0 is None:
            return
        # How late the next frame would be when ready (now + the usual compute time of a chunk).
        behind = self.clock() + self._compute_s - (self._t0 + self._tl_next / FPS)
        if behind <= self.chunk_s:
            return
        spf = SAMPLES_PER_FRAME
        k = min(int(np.ceil(behind * FPS)), (self._m_own.shape[0] + self._in_samples) // spf)
        if k < 1:
            return
        need = k * spf
        own, par = self._m_own, self._m_partner
        self.scheduler.interrupt()
        self._m_own, self._m_partner = own[:0], par[:0]
        if own.shape[0] >= need:
            skipped, skipped_p = own[:need], par[:need]
            rest, rest_p = own[need:], par[need:]
            if rest.size:  # less than a chunk: goes back without rendering anything
                self._m_own, self._m_partner = rest, rest_p
                self.scheduler.push_audio(rest, rest_p if self.scheduler.partner_seen else None)
        else:
            more, more_p = self._take_locked(need - own.shape[0])
            skipped = np.concatenate([own, more])
            skipped_p = np.concatenate([par, more_p if more_p is not None else np.zeros_like(more)])
        has_partner = self.scheduler.partner_seen or skipped_p.any()
        self._out.append(_Out(self._tl_next, None, skipped, skipped_p if has_partner else None, k))
        self._tl_next += k
        self._stats.dropped += k
        self._stats.skipped += k
