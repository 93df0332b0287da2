"""EdgeTalk as a Pipecat video service: TTS audio in, a talking face (and its audio) out.

    from edgetalk.integrations.pipecat import EdgeTalkVideoService, transport_params

    avatar = EdgeTalkVideoService(avatar="me.jpg")
    transport = SmallWebRTCTransport(connection, TransportParams(audio_in_enabled=True,
                                     audio_out_enabled=True, **transport_params()))
    Pipeline([transport.input(), stt, user_agg, llm, tts, avatar, transport.output(), asst_agg])

What goes through it:
- Every downstream `OutputAudioRawFrame` (TTS audio, any rate and channel count) is taken and fed
  to one live `edgetalk.Session`. Out comes, every 40 ms, an `OutputImageRawFrame`; while the
  avatar speaks it is followed by a `TTSAudioRawFrame` with the 640 samples (16 kHz mono) of that
  frame's span (when the CPU falls behind, frames skipped to catch up repeat the last picture with
  their own audio; a frame still more than a chunk late is dropped with its audio). The images
  are `sync_with_audio`: the output transport queues them with the audio and shows each one when
  the audio before it has been sent, so picture and sound stay on one clock (the audio's) even
  when the CPU hiccups and audio queues up; `transport_params()` has the matching settings. Idle
  frames come without audio (the transport sends silence by itself), so a backlog from a hiccup
  drains between utterances, and only speech counts as the bot speaking. With
  `pass_audio=False` only images go out, unsynchronised, and the TTS audio is passed on.
- Between utterances the Session feeds silence: the avatar idles (blinks, mouth closed) at 25 fps
  and nothing in the pipeline waits for it.
- Other frames that follow speech in order (TTSStoppedFrame, text, EndFrame, ...) are held until
  the frame holding the end of that speech has gone out, so they do not overtake it.
- An `InterruptionFrame` calls `Session.interrupt()`: queued speech and frames not yet shown are
  dropped (the avatar is idle within one chunk) and the held frames are dropped too, except
  uninterruptible ones. The output transport drops what it had queued when the interruption
  reaches it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    SystemFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from ..errors import EdgeTalkError
from ..models.config import SAMPLE_RATE
from ._stream import AvatarFrame, AvatarStream, to_int16

__all__ = ["EdgeTalkVideoService", "transport_params"]


def transport_params(resolution: int = 256) -> dict:
    """The `TransportParams` video settings the service needs. The transport sends the latest
    image (`video_out_is_live=False`: the images come queued with their audio, see the module
    doc) 30 times a second, the rate aiortc stamps video frames at; the avatar's 25 fps frames go
    out as they come, every sixth send repeating one."""
    return dict(
        video_out_enabled=True,
        video_out_is_live=False,
        video_out_width=resolution,
        video_out_height=resolution,
        video_out_framerate=30,
    )


class EdgeTalkVideoService(FrameProcessor):
    """A local talking head for a Pipecat pipeline; put it right after the TTS."""

    def __init__(
        self,
        *,
        avatar: str | Path | np.ndarray | None = None,
        bundle: str | Path | None = None,
        checkpoint: str | Path | None = None,
        backend=None,
        threads: int | None = None,
        pass_audio: bool = True,
        audio_out_sample_rate: int | None = None,
        seed: int = 0,
        face_check: bool = True,
        open_mouth: str = "close",
        **kwargs,
    ):
        """avatar: a photo (path or HxWx3 array; None: the embedded one). bundle / checkpoint:
        the model (None: the shipped weights). backend: a backend name, or an opened Backend
        to share between sessions. threads: CPU threads for torch. open_mouth: "close" (a photo taken
        mid-word closes its lips at rest) or "keep". pass_audio: send the
        avatar's audio (True, in sync with the images) or only images (the TTS audio then goes
        on untouched, unsynchronised). audio_out_sample_rate: the output transport's rate, when
        its TransportParams set one (default: the pipeline's)."""
        super().__init__(**kwargs)
        self._stream = AvatarStream(
            avatar=avatar,
            bundle=bundle,
            checkpoint=checkpoint,
            backend=backend,
            threads=threads,
            seed=seed,
            face_check=face_check,
            open_mouth=open_mouth,
        )
        self._pass_audio = pass_audio
        self._out_rate = audio_out_sample_rate
        # 16 kHz -> the transport's rate, exactly rate / 25 samples a frame: (rate sent, function)
        self._to_out = _frame_resampler(None)
        self._emit_task = None
        self.first_tts_audio_at: float | None = None  # wall clock (time.time()) of the first audio

    @property
    def stream(self) -> AvatarStream:
        """The live stream (its Session, and the measurements: speech_delays, fps)."""
        return self._stream

    async def setup(self, setup):
        await super().setup(setup)
        self._out_rate = self._out_rate or setup.audio_out_sample_rate or SAMPLE_RATE
        self._to_out = _frame_resampler(self._out_rate)

    # ---- frames in -------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)

        if isinstance(frame, StartFrame):
            # The model opens in the background: the pipeline starts at once, the avatar shows
            # up when it is ready, and TTS audio that comes first waits for it.
            await self.push_frame(frame, direction)
            self._emit_task = self.create_task(self._emit())
        elif isinstance(frame, InterruptionFrame):
            held = self._stream.interrupt()
            await self.push_frame(frame, direction)
            for f in held:  # an EndFrame, say, must still get through
                if not f.interruptible:
                    await self._release(f)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, SystemFrame) or direction == FrameDirection.UPSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, OutputAudioRawFrame):
            if self.first_tts_audio_at is None:
                self.first_tts_audio_at = time.time()
            await self._stream.push(frame.audio, frame.sample_rate, frame.num_channels)
            if not self._pass_audio:
                await self.push_frame(frame, direction)
        else:
            if isinstance(frame, TTSStoppedFrame):
                await self._stream.flush()
            if not await self._stream.mark(frame):
                await self._release(frame)

    async def _release(self, frame: Frame) -> None:
        await self.push_frame(frame)
        if isinstance(frame, EndFrame):
            await self._stop()

    # ---- frames out ------------------------------------------------------------------------------
    async def _emit(self) -> None:
        try:
            async for f in self._stream:
                await self._push_avatar_frame(f)
                for held in f.markers:
                    await self._release(held)
        except EdgeTalkError as e:  # a photo with no face, a bad bundle: one line, upstream
            await self.push_error(error_msg=f"edgetalk: {e}", exception=e, fatal=True)

    async def _push_avatar_frame(self, f: AvatarFrame) -> None:
        rgb = np.ascontiguousarray(self.render_image(f))
        h, w = rgb.shape[:2]
        image = OutputImageRawFrame(image=rgb.tobytes(), size=(w, h), format="RGB")
        image.sync_with_audio = self._pass_audio
        await self.push_frame(image)
        if self._pass_audio and f.speech:
            rate, to_out = self._to_out
            pcm = to_int16(to_out(f.audio)).tobytes()
            await self.push_frame(TTSAudioRawFrame(pcm, sample_rate=rate, num_channels=1))

    def render_image(self, f: AvatarFrame) -> np.ndarray:
        """The picture sent for a frame: its RGB. Override to draw an overlay."""
        return f.rgb

    async def _stop(self) -> None:
        if self._emit_task is not None and self._emit_task is not asyncio.current_task():
            await self.cancel_task(self._emit_task)
        self._emit_task = None
        await self._stream.aclose()

    async def cleanup(self):
        await super().cleanup()
        await self._stop()


def _frame_resampler(rate: int | None) -> tuple[int, object]:
    """16 kHz -> `rate`, exactly rate / 25 samples for each frame's 640, with nothing held back:
    the transport then cuts its 40 ms chunks on frame boundaries and needs no resampler of its
    own, which would hold samples back and put each image ahead of its sound. 48 and 24 kHz use
    serve's fixed ×3 filter (1 ms delay; 24 kHz keeps every other sample: speech at 16 kHz has
    nothing above 8 kHz to alias). Other rates go out at 16 kHz for the transport to resample."""
    if rate not in (24_000, 48_000):
        return SAMPLE_RATE, lambda x: x
    from ..serve.media import Upsampler

    up = Upsampler()
    step = 48_000 // rate
    return rate, lambda x: up(x)[::step]
