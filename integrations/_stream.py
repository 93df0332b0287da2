"""One live `edgetalk.Session` driven from asyncio: the core both voice-agent integrations share.

Speech (any rate, any channel count) goes in with `push()`; frames come out of `async for`, each
with its RGB image, the 640 samples of its 40 ms span and whether that span holds pushed speech
or idle silence. When the CPU falls behind, the Session skips frames to catch up, or hands their
audio out ahead of the worker when a chunk's compute stalls: each such frame still comes with
its audio, under the last picture (`repeat`), at most a chunk past its time, as a late frame
that is shown would be. No speech is lost to a busy CPU. Only when the event loop itself falls
behind (audio more than a chunk and HANDOFF_SLACK_S late) is audio dropped with its frame, so
picture, sound and the conversation stay on time. Between utterances the Session feeds silence
itself, so frames keep coming at 25 fps and the avatar idles. If a slow spell raised the
Session's delay, it drops some of those idle frames (their index is skipped) until the delay is
back down: the conversation does not keep the spell's lag.

Markers: `mark(obj)` ties an object (a framework's end-of-segment marker, a control frame that
must not overtake the speech before it) to the end of the speech pushed so far; it comes out
right after the frame that holds the last of that speech. `interrupt()` drops the queued speech,
the frames not yet handed out and the pending markers (returned, so the caller can keep the ones
that must survive a barge-in).

Where speech lands on the Session's timeline (the silence it inserted while idle is on it too) is
what `Session.push_audio` returns; each frame's audio says which span of that timeline it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.config import FPS, SAMPLES_PER_FRAME

MAX_PENDING_FRAMES = 50  # frames handed out by the Session but not yet taken (2 s)
# The Session hands each frame's audio out at most a chunk after its time (frames(gaps=True));
# beyond that, plus this for the hand-off to the event loop, the loop itself fell behind.
HANDOFF_SLACK_S = 0.1
SPF = SAMPLES_PER_FRAME


@dataclasses.dataclass
class AvatarFrame:
    index: int  # on the Session's timeline: pts = index / 25 s
    rgb: np.ndarray  # HxWx3 uint8
    audio: np.ndarray  # float32 mono 16 kHz: this frame's 640 samples (see AvatarStream)
    speech: bool  # the span holds pushed speech (False: idle silence)
    markers: list  # objects whose speech ended within this frame; hand them on after it
    late: bool = False
    # the picture of the frame shown before: this one was skipped to catch up, and is here for
    # its audio (see AvatarStream._frames)
    repeat: bool = False

    @property
    def t(self) -> float:
        return self.index / FPS


def to_float(pcm, channels: int = 1) -> np.ndarray:
    """int16 bytes / int16 / float samples, interleaved `channels` -> float32 [n] or [n, ch]."""
    if isinstance(pcm, bytes | bytearray | memoryview):
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    else:
        x = np.asarray(pcm)
        x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
    if channels > 1 and x.ndim == 1:
        if x.shape[0] % channels:
            raise InputError(f"{x.shape[0]} samples do not split into {channels} channels")
        x = x.reshape(-1, channels)
    return x


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


class AvatarStream:
    """A realtime Session plus the bookkeeping an agent framework needs (see the module doc)."""

    def __init__(
        self,
        avatar: str | Path | np.ndarray | None = None,
        bundle: str | Path | None = None,
        checkpoint: str | Path | None = None,
        backend=None,  # a backend name or an opened Backend (shared between streams)
        threads: int | None = None,
        seed: int = 0,
        face_check: bool = True,
        late_policy: str = "drop",
        open_mouth: str = "close",
    ):
        from ..runtime.rest_pose import check_policy

        if threads is not None and threads < 1:
            raise InputError(f"threads must be 1 or more, got {threads}")
        check_policy(open_mouth)  # said now: the session opens later, in the background
        # The model opens later, in the background: a missing file is said now, in one line.
        for what, path in (
            ("avatar image", avatar),
            ("bundle", bundle),
            ("checkpoint", checkpoint),
        ):
            if isinstance(path, str | Path) and not Path(path).exists():
                raise InputError(f"{what} not found: {path}")
        self._kwargs = dict(
            avatar=avatar,
            bundle=bundle,
            checkpoint=checkpoint,
            backend=backend,
            seed=seed,
            face_check=face_check,
            open_mouth=open_mouth,
            realtime=True,
            late_policy=late_policy,
        )
        self.threads = threads
        self.session = None
        self._lock = threading.Lock()
        self._speech: deque[list[int]] = deque()  # [start, end) timeline samples of pushed speech
        self._markers: deque[tuple[int, object]] = deque()  # (timeline sample, obj)
        self._emitted_end = 0  # timeline samples handed out so far
        self._epoch = 0
        self._rs = None  # StreamResampler of the current rate
        self._rs_rate: int | None = None
        self._pusher = ThreadPoolExecutor(1, thread_name_prefix="edgetalk-push")  # keeps order
        self._queue: asyncio.Queue | None = None
        self._slots = threading.Semaphore(MAX_PENDING_FRAMES)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Task | None = None
        self._pump: threading.Thread | None = None
        self._closed = False
        # measurements: speech in -> its first frame out (per utterance), frames handed out
        self.speech_delays: list[float] = []
        self._speech_in_at: float | None = None  # first push of an utterance not yet shown
        self._speech_in_pos = 0
        self.frames_out = 0
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self.late_audio_dropped_s = 0.0
        self._last_rgb: np.ndarray | None = None  # the picture of the frame handed out last
        self._chunk_s = 0.0  # the Session's lateness bound (a chunk), once it is open

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the Session (in a thread: loading a backend takes a while) and start the pump.
        Every call waits for the same opening; push() and iteration call it themselves."""
        if self._opening is None:
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._opening = self._loop.create_task(self._start())
        await asyncio.shield(self._opening)

    async def _start(self) -> None:
        self.session = await self._loop.run_in_executor(None, self._open)
        self._chunk_s = self.session.chunk_s
        self.session.start()
        self._pump = threading.Thread(target=self._run_pump, name="edgetalk-pump", daemon=True)
        self._pump.start()

    def _open(self):
        from ..runtime.session import Session

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        session = Session(**self._kwargs)
        warm_up(session.backend, session.avatar)
        return session

    @property
    def resolution(self) -> int | None:
        return None if self.session is None else self.session.resolution

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._opening is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._opening)  # a half-open Session would leak its thread
        if self.session is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.session.abort)
        if self._pump is not None:
            self._slots.release()  # a pump waiting for room wakes up and sees _closed
            await asyncio.get_running_loop().run_in_executor(None, self._pump.join, 10.0)
        self._pusher.shutdown(wait=False, cancel_futures=True)
        if self._queue is not None:
            self._queue.put_nowait(None)

    # ---- input -----------------------------------------------------------------------------------
    async def push(self, pcm, sample_rate: int, channels: int = 1) -> None:
        """Queue speech: int16 bytes/array or float samples, interleaved if channels > 1."""
        x = to_float(pcm, channels)
        if x.size == 0 or self._closed:
            return
        await self.start()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pusher, self._push, x, sample_rate, self._epoch)

    async def flush(self) -> None:
        """End of an utterance: the resampler's held-back tail is pushed too."""
        if not self._closed and self.session is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pusher, self._flush, self._epoch)

    async def mark(self, obj) -> bool:
        """Hand `obj` out after the speech pushed so far. Returns False (and does nothing) when
        no speech is pending: the caller passes it on at once."""
        if self._closed or self.session is None:
            return False
        return await asyncio.get_running_loop().run_in_executor(self._pusher, self._mark, obj)

    def emit_marker(self, obj) -> None:
        """Hand `obj` out on its own, after the frames already waiting (call it on the loop)."""
        self._queue.put_nowait(("marker", obj))

    def interrupt(self) -> list:
        """Barge-in: queued speech, frames not handed out and pending markers are dropped; the
        markers are returned in order."""
        with self._lock:
            dropped = [obj for _, obj in self._markers]
            self._markers.clear()
            self._speech.clear()
            self._rs = None
            self._speech_in_at = None
            self._epoch += 1
        if self.session is not None:  # outside our lock: the Session takes its own
            self.session.interrupt()
        return dropped

    def _push(self, x: np.ndarray, rate: int, epoch: int) -> None:
        from ..runtime.audio_io import StreamResampler

        if epoch != self._epoch:  # queued before an interrupt: that speech is gone
            return
        if self._rs is None or self._rs_rate != rate:
            tail = self._rs.flush() if self._rs is not None else None
            if tail is not None and tail.size:
                self._push16(tail, epoch)
            self._rs, self._rs_rate = StreamResampler(rate), rate
        self._push16(self._rs(x), epoch)

    def _flush(self, epoch: int) -> None:
        if self._rs is not None and epoch == self._epoch:
            tail = self._rs.flush()
            if tail.size:
                self._push16(tail, epoch)

    def _push16(self, y: np.ndarray, epoch: int) -> None:
        if y.size == 0:
            return
        end = self.session.push_audio(y)  # where this speech ends on the Session's timeline
        with self._lock:
            if end is None or epoch != self._epoch:  # interrupted: the Session dropped it
                return
            start = end - y.shape[0]
            if not (self._speech and self._speech[-1][1] > self._emitted_end):  # a new utterance
                self._speech_in_at, self._speech_in_pos = time.monotonic(), start
            if self._speech and self._speech[-1][1] == start:
                self._speech[-1][1] = end
            else:
                self._speech.append([start, end])

    def _mark(self, obj) -> bool:
        with self._lock:
            pending = self._speech[-1][1] if self._speech else 0
            if pending <= self._emitted_end:
                return False
            self._markers.append((pending, obj))
            return True

    # ---- output ----------------------------------------------------------------------------------
    def _run_pump(self) -> None:
        """Session frames (paced in real time by the Session) -> the event loop."""
        try:
            for f in self.session.frames(gaps=True):
                while not self._slots.acquire(timeout=0.1):
                    if self._closed:
                        return
                if self._closed:
                    return
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (self._epoch, f))
        except Exception as e:  # the Session failed: the consumer raises it
            if not self._closed:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, e)
        finally:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def __aiter__(self):
        return self._frames()

    async def _frames(self):
        await self.start()
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if item[0] == "marker":
                yield item[1]
                continue
            self._slots.release()
            epoch, f = item
            if epoch != self._epoch:  # handed out by the Session before an interrupt
                continue
            if f.rgb is not None:
                self._last_rgb = f.rgb
                yield self._annotate(f.index, f.rgb, f.audio, f.late)
            else:
                for k in range(f.audio.shape[0] // SPF):
                    repeat = self._repeat(f, k)
                    if repeat is not None:
                        yield repeat

    def _repeat(self, gap, k: int) -> AvatarFrame | None:
        """Frame k of a gap (frames the Session skipped to catch up, dropped as late, or whose
        audio it handed out ahead of the worker), for its audio: under the last picture, as a
        late frame the Session still shows would be, so the protocol (a picture, then its 40 ms
        of audio) holds and no words are lost to a busy CPU. The Session hands it out at most a
        chunk late; later than that (and the hand-off's slack) the event loop fell behind, and
        it is dropped: agent transports play audio on their own clock (filling gaps with
        silence), so audio that comes late would queue up behind and lag the conversation from
        then on. (Markers in a dropped span come out with the next frame.)"""
        index, audio = gap.index + k, gap.audio[k * SPF : (k + 1) * SPF]
        bound = self._chunk_s + HANDOFF_SLACK_S
        late = gap.due is not None and time.monotonic() - (gap.due + k / FPS) > bound
        if late or self._last_rgb is None:
            self.late_audio_dropped_s += audio.shape[0] / (SPF * FPS)
            return None
        return self._annotate(index, self._last_rgb, audio, False, repeat=True)

    def _annotate(self, index, rgb, audio, late: bool, repeat: bool = False) -> AvatarFrame:
        end = (index + 1) * SPF
        start = end - audio.shape[0]
        now = time.monotonic()
        with self._lock:
            self._emitted_end = max(self._emitted_end, end)
            speech = any(a < end and b > start for a, b in self._speech)
            while self._speech and self._speech[0][1] <= end:
                self._speech.popleft()
            markers = []
            while self._markers and self._markers[0][0] <= end:
                markers.append(self._markers.popleft()[1])
            if speech and self._speech_in_at is not None and end > self._speech_in_pos:
                self.speech_delays.append(now - self._speech_in_at)
                self._speech_in_at = None
        if not repeat:  # rendered frames only
            self.frames_out += 1
            if self.first_frame_at is None:
                self.first_frame_at = now
            self.last_frame_at = now
        return AvatarFrame(index, rgb, audio, speech, markers, late, repeat)

    @property
    def fps(self) -> float:
        if self.first_frame_at is None or self.last_frame_at == self.first_frame_at:
            return 0.0
        return (self.frames_out - 1) / (self.last_frame_at - self.first_frame_at)


def warm_up(backend, avatar: np.ndarray, chunks: int = 3) -> None:
    """A few chunks of silence through the backend, off the clock: its first calls are slow
    (lazy initialisation), and the first utterance should not pay for them with dropped frames."""
    from ..runtime.session import Session

    s = Session(avatar=avatar, backend=backend, face_check=False, realtime=False)
    s.push_audio(np.zeros(chunks * s.chunk * SPF, np.float32))
    s.close()
    for _ in s.frames():
        pass
