"""One peer connection = one avatar Session: the microphone track in, a video + audio track out.

Threads (per peer): the Session's worker renders; a pump thread reads `session.frames()` (paced in
real time by the Session) and hands each frame to the event loop, where the two outgoing tracks
queue it. aiortc's RTP senders pull from the tracks.

A/V sync: a Session frame carries the 640 samples (40 ms at 16 kHz) of its span. They are
upsampled to 48 kHz (exactly 1920 samples, see Upsampler) and cut into two 20 ms audio frames whose
pts count samples from the start of the timeline, while the video frame's pts is index / 25 s.
The audio track releases each 20 ms frame at its own time on the same wall clock as the video
frames, and the RTCP sender reports of both tracks pair RTP time with that presentation time, not
with the time of sending (rtp_clock: audio can still leave late when the machine stalls), so the
browser plays them in sync. Frames the Session drops as late come as gaps (`frames(gaps=True)`):
their audio is queued at once, not carried to the next frame shown. The incoming microphone is never mixed into the outgoing audio.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import secrets
import threading
import time
import uuid
from collections import deque

import numpy as np

from .rtp_clock import media_clock_sender

log = logging.getLogger("edgetalk.serve")

VIDEO_CLOCK = 90_000
OUT_RATE = 48_000  # outgoing audio: 20 ms Opus frames at 48 kHz
OUT_FRAME = OUT_RATE // 50
MAX_VIDEO_BACKLOG = 8  # frames waiting for the encoder; older ones are dropped beyond this
CONNECT_TIMEOUT_S = 10.0  # an offer that never connects frees its slot after this (ICE here: <1 s)
MIC_WAIT_S = 1.0  # after connecting, the session starts at the first mic audio or after this
MEDIA_TIMEOUT_S = 10.0  # no microphone packets for this long: the tab is gone (crashed, offline)
RECORD_FRAMES = 0  # frames (index, rgb) kept per peer for measurements; 0: none (tests raise it)


def _aiortc():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    return MediaStreamTrack, MediaStreamError


def audio_frame_to_float(frame) -> np.ndarray:
    """av.AudioFrame (any format/layout) -> float32 [samples, channels]."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        x = arr.reshape(channels, -1).T
    else:
        x = arr.reshape(-1, channels)
    if np.issubdtype(x.dtype, np.integer):
        scale = float(np.iinfo(x.dtype).max) + 1.0
        x = x.astype(np.float32) / scale
    return np.ascontiguousarray(x, dtype=np.float32)


class Upsampler:
    """16 kHz -> 48 kHz in real time: exactly 3 samples out per sample in, so each frame's 640
    samples become exactly two 20 ms frames, available with their video frame. (A resampler that
    holds samples back in blocks, as soxr does, would make every other audio frame go out late and
    skew the RTCP timing the browser syncs on.) A Kaiser-windowed sinc, 96 taps: a fixed delay of
    1 ms, flat to ~7 kHz; speech at 16 kHz has nothing above 8 kHz to lose."""

    FACTOR = 3

    def __init__(self, taps: int = 96):
        k = self.FACTOR
        t = (np.arange(taps) - (taps - 1) / 2) / k
        h = np.sinc(t) * np.kaiser(taps, 8.0)
        for p in range(k):  # each polyphase branch has unit DC gain
            h[p::k] /= h[p::k].sum()
        self.h = h.astype(np.float32)
        self.hist = np.zeros(taps - 1, np.float32)
        self.delay_s = (taps - 1) / 2 / (k * 16000)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        u = np.zeros(x.shape[0] * self.FACTOR, np.float32)
        u[:: self.FACTOR] = x
        buf = np.concatenate([self.hist, u])
        self.hist = buf[buf.shape[0] - self.hist.shape[0] :]
        return np.convolve(buf, self.h, mode="valid").astype(np.float32)


def _percentiles(values) -> dict | None:
    if not values:
        return None
    p50, p95, top = np.percentile(np.asarray(values) * 1000.0, [50, 95, 100])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "max": round(float(top), 1)}


def make_tracks():
    """The two outgoing track classes (built lazily: aiortc is an optional dependency)."""
    MediaStreamTrack, MediaStreamError = _aiortc()

    class QueuedTrack(MediaStreamTrack):
        """A track fed from a thread-side queue; recv() waits for the next item or the end."""

        def __init__(self):
            super().__init__()
            self._q: deque = deque()
            self._ready = asyncio.Event()
            self._ended = False

        def end(self) -> None:
            self._ended = True
            self._ready.set()

        async def _next(self):
            while not self._q:
                if self._ended or self.readyState != "live":
                    raise MediaStreamError
                self._ready.clear()
                await self._ready.wait()
            return self._q.popleft()

    class AvatarVideoTrack(QueuedTrack):
        kind = "video"

        def __init__(self):
            super().__init__()
            self.dropped = 0  # frames dropped because the encoder fell behind
            self.lateness: deque[float] = deque(maxlen=500)  # taken by the sender minus queued
            self.media_base: float | None = None  # timeline 0 of the frame sent last (rtp_clock)

        def put(self, frame, media_base: float | None) -> None:
            self._q.append((time.monotonic(), frame, media_base))
            while len(self._q) > MAX_VIDEO_BACKLOG:
                self._q.popleft()
                self.dropped += 1
            self._ready.set()

        async def recv(self):
            put_at, frame, self.media_base = await self._next()
            self.lateness.append(time.monotonic() - put_at)
            return frame

    class AvatarAudioTrack(QueuedTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.base: float | None = None  # monotonic wall time of timeline 0
            self.lateness: deque[float] = deque(maxlen=500)  # sent minus due, seconds
            self.media_base: float | None = None  # timeline 0 of the frame sent last (rtp_clock)

        def put(self, frame) -> None:
            self._q.append(frame)
            self._ready.set()

        async def recv(self):
            frame = await self._next()
            self.media_base = self.base
            if self.base is not None:  # send each 20 ms at its time on the video's clock
                due = self.base + frame.pts / OUT_RATE
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.lateness.append(time.monotonic() - due)
            return frame

    return AvatarVideoTrack, AvatarAudioTrack


class Peer:
    """One browser peer connection and its avatar Session."""

    def __init__(self, server, pc, session, avatar_name: str, client: str = "", max_s: float = 0):
        video_cls, audio_cls = make_tracks()
        self.id = uuid.uuid4().hex
        # Only the offer's answer carries the secret: stats, interrupt and close need it, so one
        # token holder cannot control another's session.
        self.secret = secrets.token_urlsafe(32)
        self.client = client  # the offering address: its pending offers are capped
        self.max_s = max_s
        self.server = server
        self.pc = pc
        self.session = session
        self.avatar_name = avatar_name
        self.loop = asyncio.get_running_loop()
        self.video = video_cls()
        self.audio = audio_cls()
        self.created = time.monotonic()
        self.connected_at: float | None = None
        self.started_at: float | None = None  # the session's timeline origin
        self.first_frame_at: float | None = None
        self._handoff_lag: float | None = None  # first frame: handed to the loop minus due
        self._video_base: float | None = None  # the video track's time 0 (monotonic)
        self.state = "new"
        self.closed = False
        self.close_reason = ""
        self.error: str | None = None
        self.frames_sent = 0
        self._sent_times: deque[float] = deque()
        self.mic_frames = 0
        self.last_mic_at: float | None = None
        self.mic_seconds = 0.0
        self.mic_dropped_s = 0.0
        self.mic_rms = 0.0  # recent level (an average over ~0.2 s): falls in every pause
        self._mic_energy = 0.0  # sum of squares over the whole session, for mic_rms_session
        self._mic_samples = 0
        self.mic_rate: int | None = None
        self.mic_channels: int | None = None
        self.frame_log: deque = deque(maxlen=20_000)  # (index, wall, audio rms) of sent frames
        self.recorded: deque = deque(maxlen=max(1, RECORD_FRAMES))
        self._record = RECORD_FRAMES > 0
        self._media_started = False
        self._pump_thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task] = []
        self._timeout = self.loop.call_later(CONNECT_TIMEOUT_S, self._connect_timeout)
        self._fallback: asyncio.TimerHandle | None = None
        self._limit = (
            self.loop.call_later(max_s, self._length_limit) if max_s and max_s > 0 else None
        )

    # ---- wiring ----------------------------------------------------------------------------------
    def attach(self) -> None:
        pc = self.pc

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                self._tasks.append(self.loop.create_task(self._consume_mic(track)))

        @pc.on("connectionstatechange")
        async def on_state():
            self.state = pc.connectionState
            if self.state == "connected" and self.connected_at is None:
                self.connected_at = time.monotonic()
                self._tasks.append(self.loop.create_task(self._watchdog()))
            log.info("peer %s: connection %s", self.id[:8], self.state)
            if self.state == "connected":
                # The session starts with the first microphone audio (its first-frame delay is
                # then "first audio in -> first frame out"), or a second after connecting.
                self._fallback = self.loop.call_later(MIC_WAIT_S, self.start_media)
            elif self.state in ("failed", "closed"):
                await self.close(f"connection {self.state}")

    def add_outgoing(self) -> None:
        for track in (self.audio, self.video):
            media_clock_sender(self.pc.addTrack(track))

    async def _watchdog(self) -> None:
        """Browsers send microphone packets without pause (silence included), so a long gap means
        the tab crashed or the network went: free the slot long before ICE consent (30 s) fails."""
        while not self.closed:
            await asyncio.sleep(1.0)
            last = self.last_mic_at or self.connected_at or self.created
            if time.monotonic() - last > MEDIA_TIMEOUT_S:
                self.loop.create_task(
                    self.close(f"no audio from the browser for {MEDIA_TIMEOUT_S:.0f} s")
                )
                return

    def _length_limit(self) -> None:
        if not self.closed:
            minutes = self.max_s / 60.0
            self.loop.create_task(self.close(f"the session reached its {minutes:g}-minute limit"))

    def _connect_timeout(self) -> None:
        if self.connected_at is None and not self.closed:
            self.loop.create_task(self.close(f"not connected within {CONNECT_TIMEOUT_S:.0f} s"))

    # ---- media -----------------------------------------------------------------------------------
    def start_media(self) -> None:
        if self._media_started or self.closed:
            return
        self._media_started = True
        self.started_at = time.monotonic()
        self._timeout.cancel()
        if self._fallback is not None:
            self._fallback.cancel()
        self.session.start()
        self._pump_thread = threading.Thread(
            target=self._pump, name=f"edgetalk-serve-{self.id[:8]}", daemon=True
        )
        self._pump_thread.start()

    def _pump(self) -> None:
        """Session frames (paced in real time) -> av frames -> the event loop."""
        import av

        upsample = Upsampler()
        pending = np.zeros(0, np.float32)
        apts = 0
        vtb = fractions.Fraction(1, VIDEO_CLOCK)
        atb = fractions.Fraction(1, OUT_RATE)
        try:
            # gaps: the audio of frames dropped as late leaves at its own time, not with the
            # next frame shown (a chunk's compute later, in a burst that the browser's jitter
            # buffer and A/V sync take tens of seconds to absorb)
            for f in self.session.frames(gaps=True):
                if self.closed:
                    break
                vf = None
                if f.rgb is not None:
                    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f.rgb), format="rgb24")
                    vf.pts = f.index * VIDEO_CLOCK // 25
                    vf.time_base = vtb
                # where this frame's audio starts in the audio track's own stream: its timeline
                # time, less the quiet frames the session dropped to bring a raised delay down
                at = (apts + pending.shape[0]) / OUT_RATE
                pending = np.concatenate([pending, upsample(f.audio)])
                afs = []
                while pending.shape[0] >= OUT_FRAME:
                    pcm = np.clip(pending[:OUT_FRAME] * 32767.0, -32768, 32767).astype(np.int16)
                    pending = pending[OUT_FRAME:]
                    af = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
                    af.sample_rate = OUT_RATE
                    af.pts = apts
                    af.time_base = atb
                    apts += OUT_FRAME
                    afs.append(af)
                rms = float(np.sqrt(np.mean(np.square(f.audio)))) if f.audio.size else 0.0
                rgb = f.rgb if self._record and vf is not None else None
                # Each track's clock: its time 0 on the session's presentation clock (it moves
                # when the pacer raises or lowers the delay; see LiveFrame.due).
                base = None if f.due is None else (f.due - f.t, f.due - at)
                self.loop.call_soon_threadsafe(self._deliver, f.index, f.t, vf, afs, rms, rgb, base)
        except Exception:  # the session failed: tell the page, free the slot
            log.exception("peer %s: session failed", self.id[:8])
            # The page sees a plain line; the exception text (paths, internals) stays in the log.
            self.error = "the avatar session failed (the server log has the details)"
            self.loop.call_soon_threadsafe(
                lambda: self.loop.create_task(self.close(f"session error: {self.error}"))
            )
        finally:
            self.loop.call_soon_threadsafe(self._end_tracks)

    def _deliver(self, index: int, t: float, vf, afs, rms: float, rgb, base) -> None:
        """One frame and its audio, or (vf None) the audio of a gap: frames dropped as late."""
        if self.closed:
            return
        now = time.monotonic()
        if vf is not None and self.first_frame_at is None:
            self.first_frame_at = now
        # The session's clock is time.monotonic (Peer does not pass another one). Both tracks
        # keep the first frame's hand-off lag (the picture's path to the sender) and follow
        # every later move of the presentation clock. The audio stream is the timeline less
        # the quiet frames the session dropped (Session.frames), so its time 0 is its own.
        if base is not None:
            vbase, abase = base
            if self._handoff_lag is None:
                self._handoff_lag = max(0.0, now - (vbase + t))
            self.audio.base = abase + self._handoff_lag
            self._video_base = vbase + self._handoff_lag
        elif self.audio.base is None:
            self.audio.base = self._video_base = now - t
        for af in afs:
            self.audio.put(af)
        if vf is None:
            return
        self.video.put(vf, self._video_base)
        self.frames_sent += 1
        self._sent_times.append(now)
        while self._sent_times and now - self._sent_times[0] > 2.0:
            self._sent_times.popleft()
        self.frame_log.append((index, now, rms))
        if rgb is not None:
            self.recorded.append((index, rgb))

    def _end_tracks(self) -> None:
        self.video.end()
        self.audio.end()

    async def _consume_mic(self, track) -> None:
        """Browser microphone (48 kHz Opus decoded by aiortc) -> Session.push_audio, which
        downmixes and resamples to 16 kHz mono with a streaming soxr resampler."""
        from aiortc.mediastreams import MediaStreamError

        from ..errors import InputError
        from ..runtime.session import SessionClosed

        while not self.closed:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            x = audio_frame_to_float(frame)
            rate = int(frame.sample_rate)
            self.mic_rate, self.mic_channels = rate, x.shape[1]
            self.mic_frames += 1
            self.last_mic_at = time.monotonic()
            self.mic_seconds += x.shape[0] / rate
            energy = float(np.sum(np.square(x)))
            self._mic_energy += energy
            self._mic_samples += x.size
            self.mic_rms = 0.9 * self.mic_rms + 0.1 * float(np.sqrt(energy / max(x.size, 1)))
            if not self._media_started:
                if self.connected_at is None:
                    continue
                self.start_media()
            try:
                self.session.push_audio(x, sample_rate=rate, block=False)
            except SessionClosed:
                return
            except InputError:  # more than MAX_INPUT_SECONDS waiting: the worker fell behind
                self.mic_dropped_s += x.shape[0] / rate

    # ---- control ---------------------------------------------------------------------------------
    def interrupt(self) -> int:
        return self.session.interrupt()

    def stats(self) -> dict:
        from ..models.config import FPS

        s = self.session.stats
        d = s.to_dict()
        misses = s.late + s.dropped
        now = time.monotonic()
        recent = [t for t in self._sent_times if now - t <= 2.0]
        fps_recent = (
            (len(recent) - 1) / (recent[-1] - recent[0])
            if len(recent) > 2 and recent[-1] > recent[0]
            else 0.0
        )
        d.update(
            id=self.id,
            state=self.state,
            closed=self.closed,
            close_reason=self.close_reason,
            error=self.error,
            avatar=self.avatar_name,
            backend=self.session.backend.describe(),
            resolution=self.session.resolution,
            fps_recent=fps_recent,
            deadline_misses=misses,
            deadline_miss_share=misses / s.timeline_frames if s.timeline_frames else 0.0,
            frames_sent=self.frames_sent,
            encoder_dropped=self.video.dropped,
            video_send_wait_ms=_percentiles(self.video.lateness),
            audio_send_late_ms=_percentiles(self.audio.lateness),
            connect_s=None if self.connected_at is None else self.connected_at - self.created,
            first_frame_after_connect_s=(
                None
                if self.first_frame_at is None or self.connected_at is None
                else self.first_frame_at - self.connected_at
            ),
            session_start_after_connect_s=(
                None
                if self.started_at is None or self.connected_at is None
                else self.started_at - self.connected_at
            ),
            mic_seconds=self.mic_seconds,
            mic_rms=self.mic_rms,
            mic_rms_session=(
                float(np.sqrt(self._mic_energy / self._mic_samples)) if self._mic_samples else 0.0
            ),
            mic_rate=self.mic_rate,
            mic_channels=self.mic_channels,
            mic_dropped_s=self.mic_dropped_s,
            video_fps=FPS,
        )
        return d

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._timeout.cancel()
        if self._fallback is not None:
            self._fallback.cancel()
        if self._limit is not None:
            self._limit.cancel()
        log.info("peer %s: closing (%s)", self.id[:8], reason)
        try:
            await self.loop.run_in_executor(None, self.session.abort)
        except Exception:  # closing must always free the slot
            log.exception("peer %s: session abort failed", self.id[:8])
        self._end_tracks()
        for t in self._tasks:
            t.cancel()
        try:
            await asyncio.wait_for(self.pc.close(), timeout=10.0)
        except Exception:
            log.exception("peer %s: closing the peer connection failed", self.id[:8])
        self.server.release(self)
