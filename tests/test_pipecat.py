"""`edgetalk.integrations.pipecat`: the video service in a real Pipecat pipeline, and the example
bot end to end in a browser (Pipecat's SmallWebRTC transport, headless Chromium).

The pipeline test feeds TTS frames (stereo 22.05 kHz, 20 ms pieces, as a streaming TTS sends
them) into `EdgeTalkVideoService` and records what comes out: 25 fps images, each followed by
its 640 samples, idling between utterances, TTSStoppedFrame after the last speech frame, and an
interruption that stops the speech within one chunk.

The browser test runs `examples/pipecat_bot.py` (scripted lines spoken by espeak-ng, nothing on
the network). Each frame carries a marker (top-left block, brightness = its audio's loudness);
the page logs when each frame is shown and the marker's brightness, and the loudness of the
sound as played. Cross-correlating the two gives the A/V offset where the viewer is.
Artifacts go to tests/artifacts/pipecat_report.json.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="needs pipecat-ai (pip install 'edgetalk[pipecat]')")
pytest.importorskip("aiortc", reason="needs aiortc (pip install 'edgetalk[pipecat]')")

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from edgetalk.integrations.pipecat import EdgeTalkVideoService  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_bot.py"


def _artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    ignore = ARTIFACTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return ARTIFACTS


def _speech(rate: int, seconds: float) -> np.ndarray:
    """The embedded speech, at `rate`, as int16 stereo (the two channels equal)."""
    import soundfile as sf
    import soxr

    from edgetalk.runtime.audio_io import default_speech

    x, sr = sf.read(str(default_speech()), dtype="float32")
    x = soxr.resample(x[: int(seconds * sr)], sr, rate)
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    return np.stack([pcm, pcm], axis=1)


def soxr_mono16(pcm: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(pcm.mean(axis=1).astype(np.float32), rate, 16000)


def _match(out: np.ndarray, ref: np.ndarray) -> float:
    """Correlation of `ref` with the stretch of `out` it lines up with best."""
    n = out.shape[0] + ref.shape[0]
    c = np.fft.irfft(np.fft.rfft(out, n) * np.conj(np.fft.rfft(ref, n)), n)[: out.shape[0]]
    off = int(np.argmax(c))
    seg = out[off : off + ref.shape[0]]
    if seg.shape[0] < ref.shape[0] - 160:
        return 0.0
    return float(np.corrcoef(seg, ref[: seg.shape[0]])[0, 1])


class Collector(FrameProcessor):
    """The sink: records (monotonic time, frame) of everything that comes downstream."""

    def __init__(self):
        super().__init__()
        self.got: list[tuple[float, object]] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.got.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)


async def _tts(task, pcm: np.ndarray, rate: int) -> None:
    n = rate // 50  # 20 ms pieces
    await task.queue_frame(TTSStartedFrame())
    for i in range(0, pcm.shape[0], n):
        piece = np.ascontiguousarray(pcm[i : i + n])
        await task.queue_frame(TTSAudioRawFrame(piece.tobytes(), rate, 2))
    await task.queue_frame(TTSStoppedFrame())


def test_video_service_in_a_pipeline():
    rate = 22050
    first = _speech(rate, 2.0)
    second = _speech(rate, 3.0)
    avatar = EdgeTalkVideoService(threads=1)
    sink = Collector()

    async def main():
        task = PipelineWorker(Pipeline([avatar, sink]), enable_rtvi=False, idle_timeout_secs=None)
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(task)
        running = asyncio.create_task(runner.run())
        await asyncio.sleep(1.5)  # idle
        marks = {"speak1": time.monotonic()}
        await _tts(task, first, rate)
        await asyncio.sleep(3.5)  # the utterance plays out, then idle
        marks["speak2"] = time.monotonic()
        await _tts(task, second, rate)
        await asyncio.sleep(1.2)
        marks["interrupt"] = time.monotonic()
        await task.queue_frame(InterruptionFrame())
        await asyncio.sleep(1.5)
        await task.queue_frame(EndFrame())
        await asyncio.wait_for(running, 20)
        return marks

    marks = asyncio.run(main())
    got = sink.got
    kinds = [
        "img"
        if isinstance(f, OutputImageRawFrame)
        else "tts"
        if isinstance(f, TTSAudioRawFrame)
        else "aud"
        if isinstance(f, OutputAudioRawFrame)
        else type(f).__name__
        for _, f in got
    ]
    media = [(t, k, f) for (t, f), k in zip(got, kinds, strict=True) if k in ("img", "tts", "aud")]
    # Every image is followed by the 640 samples (16 kHz mono) of its span: 640 x k when k - 1
    # frames before it were dropped as late (their audio is never lost).
    assert [k == "img" for _, k, _ in media[::2]] == [True] * (len(media) // 2)
    spans = []
    for _, k, f in media[1::2]:
        assert k in ("tts", "aud") and f.sample_rate == 16000 and f.num_channels == 1
        assert len(f.audio) % (2 * 640) == 0 and len(f.audio) > 0
        spans.append(len(f.audio) // 1280)
    images = [(t, f) for t, k, f in media if k == "img"]
    assert images[0][1].size == (256, 256) and images[0][1].format == "RGB"
    t_img = np.array([t for t, _ in images])
    span = t_img[-1] - t_img[0]
    fps = (len(t_img) - 1) / span

    # Speech frames: the first utterance in full, then TTSStoppedFrame right after its last one.
    audio = [(t, k, f) for t, k, f in media if k != "img"]
    speech_t = np.array([t for t, k, _ in audio if k == "tts"])
    first_speech = speech_t[(speech_t > marks["speak1"]) & (speech_t < marks["speak2"])]
    # The audio goes through whole and in order: the first utterance is in the output stream.
    out = np.concatenate(
        [np.frombuffer(f.audio, np.int16) for t, k, f in audio if t < marks["speak2"]]
    ).astype(np.float32)
    ref = soxr_mono16(first, rate)
    assert _match(out, ref) > 0.99
    ffd = first_speech[0] - marks["speak1"]
    stopped = [t for (t, f) in got if isinstance(f, TTSStoppedFrame)]
    assert len(stopped) == 1 and 0 <= stopped[0] - first_speech[-1] < 0.04
    # Idle between: frames go on, with silence, not counted as speech.
    idle = [f for t, k, f in audio if k == "aud" and first_speech[-1] < t < marks["speak2"]]
    assert not any(np.frombuffer(f.audio, np.int16).any() for f in idle)
    assert len(idle) >= 3 and sum(len(f.audio) for f in idle) // 1280 >= 15  # timeline frames

    # The interruption: speech stops within one chunk (4 frames) of it passing the service.
    t_int = next(t for t, f in got if isinstance(f, InterruptionFrame))
    after = speech_t[speech_t > t_int]
    assert len(after) <= 5, len(after)
    second = sum(
        len(f.audio) // 2 for t, k, f in audio if k == "tts" and marks["speak2"] < t < t_int
    )
    assert 0.3 < second / 16000 < 1.3  # it was talking when interrupted (3 s of speech queued)
    idle_after = [f for t, k, f in audio if t > t_int + 0.2]
    assert len(idle_after) >= 8 and sum(len(f.audio) for f in idle_after) // 1280 >= 25  # idles on
    assert avatar.stream.session is not None
    print(
        f"\npipecat service: FFD {ffd * 1000:.0f} ms after the first TTS audio "
        f"(stream: {[round(d * 1000) for d in avatar.stream.speech_delays]} ms), "
        f"FPS {fps:.1f}, {len(after)} speech frames after the interruption; "
        f"{avatar.stream.session.stats.summary()}"
    )
    assert fps >= 20, fps
    assert np.max(np.diff(t_img)) < 0.25  # the avatar never stalls, idle or not
