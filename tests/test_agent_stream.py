"""integrations/_stream.py, the core of the voice-agent integrations, on a CPU that falls behind:
frames skipped to catch up keep their speech (repeating the last picture); the Session hands no
audio out more than a chunk late, so none is dropped."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from edgetalk.integrations._stream import AvatarStream
from edgetalk.runtime.backend_torch import TorchBackend

from .conftest import MICRO, seeded_model, speechlike

SPF = 640
CHUNK_S = MICRO.chunk / 25


class SlowBackend(TorchBackend):
    """Renders at half real time (a decoder that sleeps two chunks' worth per chunk)."""

    def run(self, module, inputs):
        if module == "decoder":
            time.sleep(2 * CHUNK_S)
        return super().run(module, inputs)


def test_frames_skipped_to_catch_up_keep_their_speech_under_the_last_picture():
    speech = speechlike(3.0) + 0.05  # every sample non-zero: silence cannot pass for it
    end_marker = object()

    async def main():
        stream = AvatarStream(backend=SlowBackend(seeded_model(MICRO)), face_check=False)
        await stream.push(speech, 16000)
        start = stream._speech[0][0]  # where the speech landed on the Session's timeline
        assert await stream.mark(end_marker)
        out = []
        async for f in stream:
            out.append(f)
            if end_marker in f.markers:
                break
        dropped = stream.late_audio_dropped_s
        await stream.aclose()
        return start, out, dropped

    start, frames, dropped_s = asyncio.run(main())
    spoken = [f for f in frames if f.speech]
    repeats = [f for f in frames if f.repeat]
    print(
        f"{len(spoken)} speaking frames, {sum(f.repeat for f in spoken)} of them skipped and "
        f"kept under the last picture; {dropped_s:.2f} s of audio dropped as late"
    )
    assert repeats, "SlowBackend no longer falls behind"
    # one frame per timeline index, in order, each holding exactly its own span of the speech
    idx = [f.index for f in frames]
    kept = set(idx)
    assert idx == sorted(kept)
    for f in spoken:
        assert f.audio.shape == (SPF,)
        pos = f.index * SPF - start
        np.testing.assert_array_equal(f.audio, speech[pos : pos + SPF])
    # a skipped frame shows the picture of the frame before it, rendered or itself a repeat
    for a, b in zip(frames, frames[1:], strict=False):
        if b.repeat:
            assert b.rgb is a.rgb
    # every frame of the speech was handed out, or dropped as late (and counted)
    first, last = start // SPF, (start + speech.shape[0]) // SPF - 1
    missing = [i for i in range(first, last + 1) if i not in kept]
    assert abs(len(missing) * SPF / 16000 - dropped_s) < 1e-6
    # all of it kept: the Session hands a skipped frame's audio out at most a chunk late (two
    # frames of slack for a hiccup of the machine running the test)
    assert len(missing) <= 2, (len(missing), len(repeats))
