"""EdgeTalk as a LiveKit Agents avatar: a `VideoGenerator` for the framework's `AvatarRunner`.

    from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver
    from edgetalk.integrations.livekit import EdgeTalkVideoGenerator, avatar_options

    gen = EdgeTalkVideoGenerator(avatar="me.jpg")
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room), video_gen=gen,
                          options=avatar_options())
    await runner.start()

The avatar protocol (livekit.agents.voice.avatar):
- `push_audio(frame)`: the agent's TTS audio (any rate, any channel count) goes into one live
  `edgetalk.Session`; an `AudioSegmentEnd` marks the end of an utterance.
- `clear_buffer()`: the agent was interrupted. `Session.interrupt()` drops the queued speech and
  the frames not yet shown; the avatar idles within one chunk.
- `async for` yields, every 40 ms, an `rtc.VideoFrame` (RGB24); while the avatar speaks, each is
  followed by the `rtc.AudioFrame` of that frame's span (16 kHz mono, 640 samples; when the CPU
  falls behind, frames skipped to catch up repeat the last picture with their own audio, and a
  frame still more than a chunk late is dropped with its audio), and each `AudioSegmentEnd` comes right after the frame that holds the
  last audio of its utterance, which is when the runner tells the agent that playback finished.
  Between utterances the frames are the avatar idling (video only, as in LiveKit's own example
  generator: the runner counts every audio frame as playback), so the video never stops.

The runner's `AVSynchronizer` paces the published tracks; the Session paces the frames at the
same rate, so its queues stay short.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from pathlib import Path

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarSession,
    VideoGenerator,
)

from ..models.config import FPS, SAMPLE_RATE
from ._stream import AvatarFrame, AvatarStream, to_int16

__all__ = [
    "EdgeTalkAvatarSession",
    "EdgeTalkVideoGenerator",
    "avatar_options",
    "run_avatar_worker",
]


def avatar_options(resolution: int = 256) -> AvatarOptions:
    """The AvatarRunner options for EdgeTalk's output: resolution², 25 fps, 16 kHz mono."""
    return AvatarOptions(
        video_width=resolution,
        video_height=resolution,
        video_fps=FPS,
        audio_sample_rate=SAMPLE_RATE,
        audio_channels=1,
    )


class EdgeTalkVideoGenerator(VideoGenerator):
    """A local talking head behind LiveKit's avatar protocol (see the module doc)."""

    def __init__(
        self,
        *,
        avatar: str | Path | np.ndarray | None = None,
        bundle: str | Path | None = None,
        checkpoint: str | Path | None = None,
        backend=None,
        threads: int | None = None,
        seed: int = 0,
        face_check: bool = True,
        open_mouth: str = "close",
    ):
        """avatar: a photo (path or HxWx3 array; None: the embedded one). bundle / checkpoint:
        the model (None: the shipped weights). backend: a backend name, or an opened Backend to
        share between sessions. threads: CPU threads for torch. open_mouth: "close" (a photo taken
        mid-word closes its lips at rest) or "keep"."""
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
        self._started = asyncio.Lock()
        # (timeline index, wall time, speaking?) of each frame handed out; the frames themselves
        # carry their timeline index as `edgetalk_index`
        self.log: deque[tuple[int, float, bool]] = deque(maxlen=100_000)

    @property
    def stream(self) -> AvatarStream:
        """The live stream (its Session, and the measurements: speech_delays, fps)."""
        return self._stream

    async def start(self) -> None:
        """Open the model (also done by the first push_audio or iteration)."""
        async with self._started:
            await self._stream.start()

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        await self.start()
        if isinstance(frame, AudioSegmentEnd):
            await self._stream.flush()
            if not await self._stream.mark(frame):
                self._stream.emit_marker(frame)  # nothing pending: the segment is over now
            return
        pcm = np.frombuffer(frame.data, dtype=np.int16)
        await self._stream.push(pcm, frame.sample_rate, frame.num_channels)

    def clear_buffer(self) -> None:
        self._stream.interrupt()  # the dropped segment ends are not reported: it was interrupted

    def __aiter__(self):
        return self._frames()

    async def _frames(self):
        await self.start()
        async for item in self._stream:
            if not isinstance(item, AvatarFrame):
                yield item
                continue
            rgb = np.ascontiguousarray(item.rgb)
            h, w = rgb.shape[:2]
            video = rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, rgb.tobytes())
            sound = None
            if item.speech:  # idle frames go without audio, as the protocol expects: the runner
                # counts every audio frame as playback of the current utterance
                pcm = to_int16(item.audio)
                sound = rtc.AudioFrame(
                    data=pcm.tobytes(),
                    sample_rate=SAMPLE_RATE,
                    num_channels=1,
                    samples_per_channel=pcm.shape[0],
                )
            video.edgetalk_index = item.index  # which timeline frame this is, for measurements
            if sound is not None:
                sound.edgetalk_index = item.index
            self.log.append((item.index, time.monotonic(), item.speech))
            yield video
            if sound is not None:
                yield sound
            for marker in item.markers:
                yield marker

    async def aclose(self) -> None:
        await self._stream.aclose()


# ---- the avatar worker: a participant that joins the room and publishes the face ----------------------
async def run_avatar_worker(url: str, token: str, **generator_kwargs) -> None:
    """Join the room as the avatar participant, take the agent's audio (DataStream), publish the
    face and its voice, until the agent leaves or the room closes."""
    from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

    room = rtc.Room()
    stop = asyncio.Event()
    gen = EdgeTalkVideoGenerator(**generator_kwargs)
    runner = None
    try:
        await gen.start()  # load the model before joining: the agent waits for our video track
        await room.connect(url, token)
        runner = AvatarRunner(
            room,
            audio_recv=DataStreamAudioReceiver(room),
            video_gen=gen,
            options=avatar_options(gen.stream.resolution),
        )
        await runner.start()

        def on_left(p: rtc.RemoteParticipant) -> None:
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
                stop.set()

        room.on("participant_disconnected", on_left)
        room.on("disconnected", lambda *_: stop.set())
        await stop.wait()
    finally:
        if runner is not None:
            await runner.aclose()
        await gen.aclose()
        await room.disconnect()


class EdgeTalkAvatarSession(AvatarSession):
    """Plug EdgeTalk into an `AgentSession`, as the hosted avatar plug-ins do:

        avatar = EdgeTalkAvatarSession(avatar="me.jpg")
        await avatar.start(session, room=ctx.room)   # before session.start(...)

    It mints a token for the avatar participant (LIVEKIT_API_KEY / LIVEKIT_API_SECRET), starts
    the avatar worker in a child process (`python -m edgetalk.integrations.livekit`, so
    rendering never blocks the agent's event loop) and routes the agent's audio to it over a
    DataStream. The worker joins the room and publishes the face with the voice in sync."""

    def __init__(
        self,
        *,
        avatar: str | Path | None = None,
        bundle: str | Path | None = None,
        checkpoint: str | Path | None = None,
        backend: str | None = None,
        threads: int | None = None,
        identity: str = "edgetalk-avatar",
        livekit_url: str | None = None,
    ):
        self.args = {
            "avatar": avatar,
            "bundle": bundle,
            "checkpoint": checkpoint,
            "backend": backend,
            "threads": threads,
        }
        super().__init__()
        self.identity = identity
        self.livekit_url = livekit_url
        self.process: asyncio.subprocess.Process | None = None

    @property
    def avatar_identity(self) -> str:
        return self.identity

    @property
    def provider(self) -> str:
        return "edgetalk"

    async def start(self, agent_session, room: rtc.Room) -> None:
        import os
        import sys

        from livekit import api
        from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
        from livekit.agents.voice.avatar import DataStreamAudioOutput

        from ..errors import EdgeTalkError

        url = self.livekit_url or os.environ.get("LIVEKIT_URL")
        if not url:
            raise EdgeTalkError("EdgeTalkAvatarSession needs livekit_url= or LIVEKIT_URL")
        await super().start(agent_session, room)
        token = (
            api.AccessToken()
            .with_identity(self.identity)
            .with_name("EdgeTalk avatar")
            .with_kind("agent")
            .with_grants(api.VideoGrants(room_join=True, room=room.name))
            .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: room.local_participant.identity})
            .to_jwt()
        )
        cmd = [sys.executable, "-m", "edgetalk.integrations.livekit", "--url", url]
        for k, v in self.args.items():
            if v is not None:
                cmd += [f"--{k}", str(v)]
        # the token goes by environment, not argv: other users can read a process's argv
        env = {**os.environ, "EDGETALK_LIVEKIT_TOKEN": token}
        self.process = await asyncio.create_subprocess_exec(*cmd, env=env)
        agent_session.output.replace_audio_tail(  # keeps the transcript synchroniser in place
            DataStreamAudioOutput(
                room,
                destination_identity=self.identity,
                wait_remote_track=rtc.TrackKind.KIND_VIDEO,  # replies wait for the face
                wait_playback_start=True,  # AvatarRunner reports when playback starts
            )
        )

    async def aclose(self) -> None:
        await super().aclose()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


def main(argv=None) -> int:
    """`python -m edgetalk.integrations.livekit --url URL` (token in EDGETALK_LIVEKIT_TOKEN)."""
    import argparse
    import logging
    import os

    from ..errors import EdgeTalkError

    ap = argparse.ArgumentParser(description="EdgeTalk avatar worker for a LiveKit room")
    ap.add_argument("--url", required=True, help="LiveKit server, e.g. ws://127.0.0.1:7880")
    ap.add_argument("--avatar")
    ap.add_argument("--bundle")
    ap.add_argument("--checkpoint")
    ap.add_argument("--backend")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    token = os.environ.get("EDGETALK_LIVEKIT_TOKEN")
    if not token:
        print("edgetalk livekit worker: error: set EDGETALK_LIVEKIT_TOKEN to the room token")
        return 2
    logging.basicConfig(level=logging.INFO)
    kwargs = {k: getattr(args, k) for k in ("avatar", "bundle", "checkpoint", "backend", "threads")}
    try:
        asyncio.run(run_avatar_worker(args.url, token, **kwargs))
    except (EdgeTalkError, rtc.ConnectError) as e:
        print(f"edgetalk livekit worker: error: {e}")
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
