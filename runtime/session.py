"""A live session: push audio from any thread, read frames from another, interrupt at any time.

    with Session(avatar="me.jpg") as s:          # threads: yours push, yours read, one worker
        s.push_audio(tts_chunk)                   # float32 or int16, 16 kHz mono (or sample_rate=)
        for t, rgb in s.frames(): ...             # (seconds, HxWx3 uint8), paced in real time

Threads and queues (all bounded):
- The caller pushes audio into the input queue (`push_audio`, `push_partner`). The input queue holds
  at most MAX_INPUT_SECONDS; a push beyond that waits (backpressure) and an interrupt releases it.
  Unpaired partner audio (`push_partner`) is capped at MAX_PARTNER_SECONDS (oldest dropped).
- One worker thread owns the StreamScheduler. It takes at most one chunk of audio at a time, so
  an interrupt cuts in within one chunk of compute. With cores to spare, a chunk's decoder runs
  on the scheduler's overlap thread while the next chunk's audio is already here, and is handed
  out as soon as that audio is not (`overlap`).
- Rendered frames wait in the output queue (MAX_QUEUED_FRAMES, plus the chunk being added) until
  `frames()` takes them; beyond that the worker waits.

One A/V timeline: the frames the session hands out (or drops as late) are numbered 0, 1, 2, ...
with pts = index / 25, and every frame carries the audio of its 640-sample span (`frame.audio`,
from the scheduler's frame, including inserted silence), so a sink that writes each frame and then
its audio stays in sync however long the stream runs. `push_audio` returns where the pushed audio
ends on that timeline. Frames discarded by an interrupt never reach the timeline.

When frames are due, which are late, when silence is fed and what is skipped to catch up is the
pacing policy's (pacing.py): in realtime mode frames are handed out at their presentation time,
the avatar idles on silence while no audio comes, and with late policy "drop" late frames are
skipped (their audio moves to the next delivered frame, or with `frames(gaps=True)` comes in their
place as a gap, no picture, and never more than a chunk late: see frames()) while "mark" delivers
them `late=True`.
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
from .audio_io import StreamResampler, check_channels
from .pacing import LATE_POLICIES, Pacer, check_late_policy
from .timeline_audio import TimelineAudio

MAX_INPUT_SECONDS = 60.0  # audio waiting for the worker; push_audio waits beyond this
MAX_PARTNER_SECONDS = 5.0  # unpaired partner audio waiting; the oldest is dropped beyond this
MAX_QUEUED_FRAMES = 50  # rendered frames (2 s) waiting for frames(); the worker waits beyond this
PUSH_PIECE_SECONDS = 1.0  # long pushes are queued in pieces of this size
TICK_S = 0.01  # worker/reader poll period while idle
SPF = SAMPLES_PER_FRAME
# A frame whose own voice never exceeds this (-40 dBFS) is quiet: silence fed while idle, a pause
# in a TTS's speech, a quiet room. Only quiet frames are dropped to bring a raised delay back.
QUIET_PEAK = 0.01
# At most one frame in TRIM_EVERY is dropped so: the idle motion runs at most 1.5x for a while
# (a pause of 2 d takes d back) instead of jumping ahead. And only once QUIET_RUN quiet frames
# were handed out in a row: the pause between a TTS's sentences (about 300 ms) keeps its length,
# it is the idle time between turns that gives the delay back.
TRIM_EVERY = 3
QUIET_RUN = 8


def quiet(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.max(np.abs(audio))) < QUIET_PEAK


__all__ = ["LATE_POLICIES", "LiveFrame", "Session", "SessionClosed", "SessionStats"]


class SessionClosed(InputError):
    """Audio was pushed into a session whose input is closed."""


class LiveFrame(tuple):
    """`(timestamp_seconds, rgb)`, with `index`, `late`, `audio` (the own-voice samples of this
    frame's span, plus those of frames dropped just before it), `partner_audio` (or None) and
    `due`: in real time, when the frame is due on the session's clock (its presentation time;
    None offline). A sink that plays the audio on its own schedule keys it to `due - t`: that
    moves when the pacer raises the delay, and the sound must move with the picture.
    From `frames(gaps=True)`, rgb is None for a gap: frames dropped or skipped, with their audio
    (a gap handed out ahead of the worker is one frame, own voice only)."""

    def __new__(cls, index, rgb, late=False, audio=None, partner_audio=None, due=None):
        self = super().__new__(cls, (index / FPS, rgb))
        self.index = index
        self.late = late
        self.due = due
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
    # of `dropped`: frames whose audio frames(gaps=True) handed out at their time, before the
    # worker had rendered or skipped them
    audio_ahead: int = 0
    # of `dropped`: quiet frames frames(gaps=True) dropped in pauses to take a raised delay back
    trimmed: int = 0
    interruptions: int = 0
    interrupted_frames: int = 0  # rendered but discarded by interrupt() (never on the timeline)
    interrupted_audio_s: float = 0.0  # audio discarded by interrupt(): queued, or of dropped frames
    silence_s: float = 0.0  # silence fed while no audio came (realtime idling)
    partner_dropped_s: float = 0.0
    first_frame_delay_s: float | None = None  # first audio on the timeline -> first frame out
    floor_s: float = 0.0  # (C + L) * 40 ms: the audio the first chunk needs
    latency_raised_s: float = 0.0  # added to the delay when compute fell behind it (pacing.py)
    latency_lowered_s: float = 0.0  # of that, taken back in pauses (frames(gaps=True))
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
            f"({self.skipped} skipped to catch up"
            + (f", {self.audio_ahead} audio ahead of the worker" if self.audio_ahead else "")
            + f"); interruptions {self.interruptions} "
            f"({self.interrupted_frames} frames, {self.interrupted_audio_s:.2f} s audio discarded); "
            f"silence fed {self.silence_s:.2f} s",
        ]
        if self.latency_raised_s:
            lines.append(
                f"delay raised {self.latency_raised_s * 1000:.0f} ms (compute fell behind it), "
                f"{self.latency_lowered_s * 1000:.0f} ms of it taken back in pauses "
                f"({self.trimmed} quiet frames dropped)"
            )
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
        open_mouth: str = "close",
        realtime: bool = True,
        late_policy: str = "drop",
        chunk: int | None = None,
        max_queued_frames: int = MAX_QUEUED_FRAMES,
        clock=time.monotonic,
        overlap: bool | None = None,
    ):
        """`overlap`: while the next chunk's audio is already here (a TTS sends faster than
        real time, or the stream fell behind), a chunk's decoder runs on a second thread beside
        the next chunk's audio and generator; frames are handed out as soon as they are ready,
        so it never delays one. None: when the machine has cores to spare for it (threads.py)."""
        from .avatar import prepare_avatar
        from .backend import Backend
        from .rest_pose import check_policy, measure
        from .scheduler import StreamScheduler
        from .threads import spare_cores

        check_late_policy(late_policy)  # before the model loads
        check_policy(open_mouth)
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
        if overlap is None:
            overlap = spare_cores()
        self.scheduler = StreamScheduler(
            self.backend,
            self.avatar,
            seed=seed,
            mouth_rest=measure(self.avatar, open_mouth),
            overlap=overlap,
        )
        self.realtime = realtime
        self.late_policy = late_policy
        self.chunk = self.scheduler.chunk
        self.chunk_s = self.chunk / FPS
        self.max_queued_frames = max(1, int(max_queued_frames))
        self.clock = clock
        self.pacer = Pacer(
            realtime, late_policy, self.chunk, self.scheduler.lookahead_samples, clock
        )
        self._stats = SessionStats(
            floor_s=self.pacer.floor_s, chunk=self.chunk, realtime=realtime, late_policy=late_policy
        )
        self._cond = threading.Condition()
        # input side
        self._in: deque[tuple[np.ndarray, np.ndarray | None]] = deque()
        self._in_samples = 0
        self._partner: deque[np.ndarray] = deque()
        self._partner_samples = 0
        self._resamplers: dict[tuple[str, int], StreamResampler] = {}
        # the timeline: frames handed to the output queue, and own-voice samples put on it so far
        self._tl_next = 0
        self._tl_end = 0
        self._next_out = 0  # the next frame frames() hands out (or carries, or drops)
        self._audio = TimelineAudio()  # own voice from frame _next_out on (for gaps=True)
        self._quiet_run = 0  # quiet frames handed out in a row (a pause)
        self._since_trim = 0  # frames handed out since a quiet frame was last dropped
        # worker side
        self._sched_interrupt = False
        self._epoch = 0
        # output side
        self._out: deque[_Out] = deque()
        self._carry: list[np.ndarray] = []
        self._carry_partner: list[np.ndarray] = []
        # lifecycle
        self._end: float | None = None
        self._thread: threading.Thread | None = None
        self._input_closed = False
        self._done = False
        self._aborted = False
        self._error: BaseException | None = None

    @property
    def mouth_rest(self):
        """What was found of the photo's mouth and how it rests (runtime/rest_pose.py)."""
        return self.scheduler.mouth_rest

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the stream (also done by the first push_audio or frames()). In realtime mode the
        timeline starts now: the avatar idles until audio arrives."""
        with self._cond:
            if self._thread is not None:
                return
            self.pacer.start()
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
            if self.pacer.origin is not None:
                s.wall_s = (self._end or self.clock()) - self.pacer.origin
            s.latency_raised_s = self.pacer.raised_s
            s.latency_lowered_s = self.pacer.lowered_s
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
    ) -> int | None:
        """Queue own-voice audio (and optionally the partner's, same length), any piece size.

        float32 in [-1, 1] or int16; mono, or [samples, channels] (downmixed). Other rates are
        resampled continuously across pieces. Waits while MAX_INPUT_SECONDS are queued (or raises
        InputError when block=False or after `timeout`); an interrupt() during the wait discards
        the rest of this piece.

        Returns where the queued audio ends on the timeline, in 16 kHz samples: it fills the
        samples just before that, and frame i shows samples [640 i, 640 (i + 1)). None when an
        interrupt() discarded it while it waited.
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
                        return None  # interrupted while waiting: the rest of this speech is dropped
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
            return self._tl_end

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
            frames = sum(o.n for o in self._out if o.rgb is not None and o.index >= self._next_out)
            # Audio on the timeline but in no frame yet: queued, in the scheduler, or rendering
            # (less what frames(gaps=True) handed out ahead of the worker); and that of frames
            # skipped or dropped just before, which waits for the next frame shown (frames()
            # hands it on): after a barge-in it would play as a burst of the old speech on the
            # first idle frame.
            unrendered = max(0, self._tl_end - max(self._tl_next, self._next_out) * SPF)
            unrendered += sum(a.shape[0] for a in self._carry)
            self._carry.clear()
            self._carry_partner.clear()
            self._stats.interrupted_frames += frames
            self._stats.interrupted_audio_s += unrendered / SAMPLE_RATE
            # The timeline goes on from the first frame not handed out: the queued frames were
            # never shown, and the audio of frames before it is out (with a frame or ahead).
            self._tl_next = self._next_out
            self._out.clear()
            self._tl_end = self._tl_next * SPF
            self._audio.truncate(self._tl_end)
            self._in.clear()
            self._in_samples = 0
            self._sched_interrupt = True
            self.pacer.interrupted()
            self._cond.notify_all()
            return frames

    def _convert(self, pcm, rate: int, which: str, what: str) -> np.ndarray:
        if isinstance(pcm, (bytes, bytearray, memoryview)):  # what most TTS APIs hand back
            raise InputError(
                f"{what} is raw bytes: pass np.frombuffer(data, np.int16) for 16-bit PCM "
                "(little-endian), or float32 samples"
            )
        x = np.asarray(pcm)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        elif not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{what} must be float32 or int16 samples, got {x.dtype}")
        if x.ndim not in (1, 2):
            raise InputError(f"{what} must be [samples] or [samples, channels], got {x.shape}")
        check_channels(x, what)
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
        self.pacer.audio_arrived()
        self._in.append((own, partner))
        self._in_samples += own.shape[0]
        self._tl_end += own.shape[0]
        self._audio.append(own)
        self._cond.notify_all()

    # ---- output ----------------------------------------------------------------------------------
    def frames(self, gaps: bool = False) -> Iterator[LiveFrame]:
        """Every frame of the stream, in order, until the input is closed and rendered (or
        abort()). In realtime mode each frame is handed out at its presentation time.

        gaps=False: the audio of frames dropped as late or skipped goes out with the next frame
        shown (a sink that writes each frame and then its audio stays in sync).
        gaps=True: each of them is handed out in its place as a gap, a LiveFrame whose rgb is
        None with its own audio and `due` (a skip of several frames is one gap with all their
        audio), at its time or as soon as it is dropped. For sinks that play the audio on its own
        clock (WebRTC, agent transports): carried audio would leave a whole chunk's compute late,
        in a burst. Nor does the audio wait for the worker: with late policy "drop", a frame
        neither rendered nor skipped a chunk after its time (the late bound) is handed out then
        as a gap of its own, with its audio (own voice only: partner_audio None), and its
        picture is dropped when it comes. So no audio leaves more than a chunk late, however
        long a chunk's compute stalls. And a delay the pacer raised while compute fell behind
        comes back down in the pauses after it: quiet frames are dropped, at most one in three
        (`stats.trimmed`), so the sink plays that much less silence (_trim_locked)."""
        self.start()
        while True:
            with self._cond:
                frame = self._next_frame_locked(gaps)
            if frame is None:
                return
            yield frame

    def _next_frame_locked(self, gaps: bool) -> LiveFrame | None:
        """Wait for the next frame (or gap) to hand out; None at the end of the stream."""
        while True:
            self._raise_error_locked()
            self._drop_handed_locked()
            if self._out:
                head = self._out[0]
                if gaps and self._trim_locked():
                    continue
                skipped = head.rgb is None  # by the worker, unrendered: its audio goes on
                if skipped and not gaps:
                    self._hand_out_locked(carry=True)
                    continue
                wait, late = self.pacer.present(head.index)
                if wait > 0:
                    self._cond.wait(min(wait, 0.05))
                    continue
                if late and self.pacer.drop_late and not skipped:
                    self._stats.dropped += 1
                    if not gaps:
                        self._hand_out_locked(carry=True)
                        continue
                    skipped = True
                item = self._hand_out_locked()
                due = self.pacer.due(item.index)
                if skipped:  # a gap (gaps=True): counted as dropped, by the worker or above
                    return LiveFrame(item.index, None, late, item.audio, item.partner, due)
                if self._stats.first_frame_delay_s is None:
                    now = self.clock()
                    self._stats.first_frame_delay_s = now - (self.pacer.origin or now)
                self._stats.frames += 1
                self._stats.late += int(late)
                audio, partner = self._with_carry_locked(item)
                return LiveFrame(item.index, item.rgb, late, audio, partner, due)
            if self._done or self._aborted:
                if self._end is None:
                    self._end = self.clock()
                return None
            wait = 0.05
            if gaps:
                ahead, wait = self._audio_ahead_locked()
                if ahead is not None:
                    return ahead
            self._cond.wait(wait)

    def _trim_locked(self) -> bool:
        """In a pause (QUIET_RUN quiet frames handed out in a row), take a frame's time back off
        a delay the pacer raised: drop the head of the queue, rendered, quiet and followed by a
        quiet frame, with its audio (silence, or a room's hush). The frames after it come a
        frame's time earlier. Only while the worker is well ahead of the presentation (more
        than a chunk and two frames rendered and waiting) and the pacer finds the budget for
        it, so no later frame comes late for it. Sinks that play audio on their own clock
        (gaps=True) just play 40 ms less silence; a recorder (frames()) would lose those
        samples from its timeline, so it is never done there."""
        out = self._out
        if self._since_trim < TRIM_EVERY - 1 or len(out) < self.chunk + 2:
            return False
        if self._quiet_run < QUIET_RUN or not self.pacer.can_lower():
            return False
        head, nxt = out[0], out[1]
        if head.rgb is None or nxt.rgb is None or not (quiet(head.audio) and quiet(nxt.audio)):
            return False
        if self.pacer.present(head.index)[0] <= 0:  # due already: hand it out as it is
            return False
        self._hand_out_locked()
        self._since_trim = 0
        self.pacer.lower()
        self._stats.dropped += 1
        self._stats.trimmed += 1
        return True

    def _hand_out_locked(self, carry: bool = False) -> _Out:
        """The head of the output queue leaves it: handed out, or (carry) its audio waits for
        the next frame shown."""
        item = self._out.popleft()
        self._quiet_run = self._quiet_run + item.n if quiet(item.audio) else 0
        self._since_trim += item.n
        if carry:
            self._carry_locked(item)
        self._next_out = item.index + item.n
        self._audio.release(self._next_out * SPF)
        self._cond.notify_all()
        return item

    def _drop_handed_locked(self) -> None:
        """Frames the worker put out after frames(gaps=True) handed their audio out ahead of it
        (only rendered ones: the worker skips such frames without putting them out)."""
        while self._out and self._out[0].index < self._next_out:
            self._out.popleft()
            self._cond.notify_all()

    def _audio_ahead_locked(self) -> tuple[LiveFrame | None, float]:
        """With nothing from the worker for frame `_next_out`: its audio as a gap once it is a
        chunk past its time (when it would be dropped as late anyway), if it is on the timeline.
        Else (None, how long to wait)."""
        index = self._next_out
        due = self.pacer.due(index) if self.pacer.drop_late else None
        if due is None or self._audio.end < (index + 1) * SPF:  # not anchored; no audio yet
            return None, 0.05
        wait = due + self.pacer.late_s - self.clock()
        if wait > 0:
            return None, min(wait, 0.05)
        audio = self._audio.take(index * SPF, (index + 1) * SPF)
        self._quiet_run = self._quiet_run + 1 if quiet(audio) else 0
        self._since_trim += 1
        self._next_out = index + 1
        self._audio.release(self._next_out * SPF)
        self._stats.dropped += 1
        self._stats.audio_ahead += 1
        self._cond.notify_all()
        return LiveFrame(index, None, True, audio, None, due), 0.0

    def _carry_locked(self, item: _Out) -> None:
        self._carry.append(item.audio)
        self._carry_partner.append(item.partner)

    def _with_carry_locked(self, item: _Out) -> tuple[np.ndarray, np.ndarray | None]:
        """The item's audio, after that of the frames dropped or skipped just before it."""
        if not self._carry:
            return item.audio, item.partner
        owns, partners = [*self._carry, item.audio], [*self._carry_partner, item.partner]
        self._carry.clear()
        self._carry_partner.clear()
        audio = np.concatenate(owns)
        if all(p is None for p in partners):
            return audio, None
        return audio, np.concatenate(
            [p if p is not None else np.zeros_like(a) for a, p in zip(owns, partners, strict=True)]
        )

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
            self.scheduler.close()  # its overlap thread (a chunk still on it is not wanted)
            with self._cond:
                self._done = True
                if self._end is None and self._aborted:
                    self._end = self.clock()
                self._cond.notify_all()

    def _loop(self) -> None:
        sched = self.scheduler
        pending_epoch = self._epoch  # the epoch of the chunk on the overlap worker
        while True:
            flush = drain = False
            with self._cond:
                while True:
                    if self._aborted:
                        return
                    if sched.pending and (
                        self._sched_interrupt
                        or not self._chunk_in_hand_locked()
                        or self.pacer.late(self._tl_next)
                    ):
                        # Overlap only while the next chunk's audio is here: otherwise the
                        # chunk on the worker is handed out now, not after audio yet to come;
                        # an interrupt or a catch-up acts on a scheduler with nothing in flight.
                        drain = True
                        break
                    if self._sched_interrupt:
                        self._sched_interrupt = False
                        sched.interrupt()
                    if not sched.pending:  # (late an instant ago: drained above)
                        if not self._in_samples and not self._input_closed:
                            # Idle: the silence due now first, so that frames of it that would
                            # be late are skipped (after a barge-in, a stall) rather than raise
                            # the delay for want of audio in hand.
                            self._fill_silence_locked()
                        self._catch_up_locked()
                    if self._in_samples:
                        own, partner = self._take_locked(self.chunk * SPF)
                        break
                    if self._input_closed:
                        flush = True
                        break
                    if self._fill_silence_locked():
                        continue
                    self._cond.wait(TICK_S)
                epoch = pending_epoch if drain else self._epoch
            t_compute = time.perf_counter()
            if drain:
                frames = sched.drain()
            else:
                frames = sched.flush() if flush else sched.push_audio(own, partner)
                pending_epoch = epoch
            compute_s = time.perf_counter() - t_compute
            with self._cond:
                if frames:
                    self.pacer.computed(compute_s, len(frames))
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
                    self._put_frames_locked(frames)
                if flush:
                    return

    def _chunk_in_hand_locked(self) -> bool:
        """The scheduler would render a chunk from the audio here now (overlap's condition)."""
        sched = self.scheduler
        here = sched.own.shape[0] + min(self._in_samples, self.chunk * SPF)
        return here >= sched.cfg.chunk_samples

    def _put_frames_locked(self, frames) -> None:
        # Frames from before the partner's first audio carry silence for it, once it is there.
        has_partner = self.scheduler.partner_seen or self._partner_samples > 0
        for f in frames:
            partner = f.partner
            if partner is None and has_partner:
                partner = np.zeros_like(f.audio)
            self._out.append(_Out(self._tl_next, f.rgb, f.audio, partner))
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

    def _fill_silence_locked(self) -> bool:
        """Realtime idling: feed the silence the pacing policy asks for. Returns True if fed."""
        n = self.pacer.silence_needed(self._tl_end)
        if not n:
            return False
        silence = np.zeros(n, np.float32)
        self._in.append((silence, None))
        self._in_samples += n
        self._tl_end += n
        self._audio.append(silence)
        self._stats.silence_s += n / SAMPLE_RATE
        return True

    def _catch_up_locked(self) -> None:
        """Skip rendering the audio of the frames the pacing policy says would be late: they are
        dropped (counted), their audio goes to the next delivered frame, the timeline moves on.
        Frames whose audio frames(gaps=True) already handed out are skipped first, unseen."""
        sched = self.scheduler
        queued = sched.own.shape[0]  # in the scheduler, from its next frame on
        waiting = (queued + self._in_samples) // SPF
        handed = min(max(0, self._next_out - self._tl_next), waiting)
        k = self.pacer.frames_to_skip(self._tl_next + handed, waiting - handed)
        if k + handed < 1:
            return
        need = (handed + k) * SPF
        own, par = sched.own, sched.partner
        sched.interrupt()
        if own.shape[0] >= need:
            skipped, skipped_p = own[:need], par[:need]
            rest, rest_p = own[need:], par[need:]
            if rest.size:  # less than a chunk: goes back without rendering anything
                sched.push_audio(rest, rest_p if sched.partner_seen else None)
        else:
            more, more_p = self._take_locked(need - own.shape[0])
            skipped = np.concatenate([own, more])
            skipped_p = np.concatenate([par, more_p if more_p is not None else np.zeros_like(more)])
        self._tl_next += handed
        if k < 1:
            return
        skipped, skipped_p = skipped[handed * SPF :], skipped_p[handed * SPF :]
        has_partner = sched.partner_seen or skipped_p.any()
        self._out.append(_Out(self._tl_next, None, skipped, skipped_p if has_partner else None, k))
        self._tl_next += k
        self._stats.dropped += k
        self._stats.skipped += k
