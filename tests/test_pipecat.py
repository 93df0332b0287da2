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
import importlib.util
import json
import shutil
import threading
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

from .conftest import StealMeter, ceiling_for_this_machine, floor_for_this_machine  # noqa: E402

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


def test_bad_input_is_one_line(tmp_path):
    from edgetalk.errors import InputError

    with pytest.raises(InputError, match="avatar image not found: .*nope.jpg"):
        EdgeTalkVideoService(avatar=tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="threads must be 1 or more"):
        EdgeTalkVideoService(threads=0)


def test_video_service_in_a_pipeline():
    steal = StealMeter()
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
        await avatar.stream.start()  # the model opens in the background; wait for it
        await asyncio.sleep(1.5)  # idle
        marks = {"speak1": time.monotonic()}
        await _tts(task, first, rate)
        await asyncio.sleep(3.5)  # the utterance plays out, then idle
        marks["speak2"] = time.monotonic()
        await _tts(task, second, rate)
        t0 = time.monotonic()
        while sum(1 for t, f in sink.got if isinstance(f, TTSAudioRawFrame) and t > t0) < 15:
            assert time.monotonic() - t0 < 10, "utterance 2 is not shown"
            await asyncio.sleep(0.02)  # interrupt once 0.6 s of it has been shown
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
    # Only images and speech come out (idle frames are images alone: the transport sends silence).
    # A speaking image is followed by its span's audio at the pipeline's output rate (24 kHz by
    # default): exactly 40 ms, so the transport's 40 ms chunks fall on frame boundaries.
    assert "aud" not in kinds
    for (_, k0, _), (_, k1, f1) in zip(media, media[1:], strict=False):
        assert k0 == "img" or k1 == "img"  # never two audio frames in a row
        if k1 == "tts":
            assert f1.sample_rate == 24000 and f1.num_channels == 1
            assert len(f1.audio) == 2 * 960
    images = [(t, f) for t, k, f in media if k == "img"]
    assert images[0][1].size == (256, 256) and images[0][1].format == "RGB"
    assert all(f.sync_with_audio for _, f in images)  # queued with the audio by the transport
    t_img = np.array([t for t, _ in images])
    span = t_img[-1] - t_img[0]
    fps = (len(t_img) - 1) / span

    # Speech frames: the first utterance in full, then TTSStoppedFrame right after its last one.
    audio = [(t, k, f) for t, k, f in media if k != "img"]
    speech_t = np.array([t for t, k, _ in audio if k == "tts"])
    first_speech = speech_t[(speech_t > marks["speak1"]) & (speech_t < marks["speak2"])]
    # The audio goes through whole and in order: the first utterance is in the output stream.
    import soxr

    out = np.concatenate(
        [np.frombuffer(f.audio, np.int16) for t, k, f in audio if t < marks["speak2"]]
    ).astype(np.float32)
    out = soxr.resample(out, 24000, 16000)
    ref = soxr_mono16(first, rate)
    dropped = avatar.stream.late_audio_dropped_s  # frames (and their audio) dropped as late
    if dropped == 0:
        assert _match(out, ref) > 0.99
    else:  # what was not dropped went out
        assert abs(out.shape[0] / 16000 + dropped - ref.shape[0] / 16000) < 0.3 + dropped
    ffd = first_speech[0] - marks["speak1"]
    stopped = [t for (t, f) in got if isinstance(f, TTSStoppedFrame)]
    assert len(stopped) == 1 and 0 <= stopped[0] - first_speech[-1] < 0.04
    # Idle between: pictures go on, and no speech.
    idle = [t for t in t_img if first_speech[-1] < t < marks["speak2"]]
    assert len(idle) >= 5

    # The interruption: speech stops within one chunk (4 frames) of it passing the service.
    t_int = next(t for t, f in got if isinstance(f, InterruptionFrame))
    after = speech_t[speech_t > t_int]
    assert len(after) <= 5, len(after)
    second = sum(
        len(f.audio) // 2 for t, k, f in audio if k == "tts" and marks["speak2"] < t < t_int
    )
    assert 0.55 < second / 24000 < 2.0  # it was talking when interrupted (3 s of speech queued)
    assert sum(1 for t in t_img if t > t_int + 0.2) >= 5  # and idles on
    assert avatar.stream.session is not None
    print(
        f"\npipecat service: FFD {ffd * 1000:.0f} ms after the first TTS audio "
        f"(stream: {[round(d * 1000) for d in avatar.stream.speech_delays]} ms), "
        f"FPS {fps:.1f}, {len(after)} speech frames after the interruption; "
        f"{avatar.stream.session.stats.summary()}"
    )
    # Measured on the 2-core CI-class VM: 19.9-21.0 FPS, longest gap 0.34 s; these floors catch a
    # stalled or half-speed avatar without failing on that VM's jitter.
    if steal.speed_judged(f"FPS {fps:.1f} (floor 15)"):
        assert fps >= floor_for_this_machine(fps, 15, "pipecat FPS"), fps
    assert fps > 0
    gap = float(np.max(np.diff(t_img)))  # the avatar never stalls, idle or not
    assert gap < ceiling_for_this_machine(gap, 0.6, "pipecat longest gap between images (s)")


# ---- the example bot in a browser ------------------------------------------------------------------
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


def _load_example():
    spec = importlib.util.spec_from_file_location("edgetalk_example_pipecat_bot", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loudness_to_level(rms):
    """Loudness -> 0..255, the same map for the marker drawn and the sound heard."""
    return 255.0 * np.minimum(1.0, np.sqrt(np.asarray(rms, dtype=np.float64) / 0.25))


class MarkedAvatar(EdgeTalkVideoService):
    """Draws two blocks at the top left of each frame: the brightness of the first is the
    frame's loudness, that of the second its index mod 4. The page reads them back from the
    video it shows, so no frame numbering has to survive the transport, and a frame the
    transport repeats is not counted as a new one."""

    def render_image(self, f):
        rgb = f.rgb.copy()
        h, w = rgb.shape[:2]
        rms = float(np.sqrt(np.mean(np.square(f.audio)))) if f.audio.size else 0.0
        rgb[: h // 16, : w // 16] = np.uint8(round(float(_loudness_to_level(rms))))
        rgb[: h // 16, w // 16 : w // 8] = np.uint8(85 * (f.index % 4))
        return rgb


class _Server:
    """The example's aiohttp app on a loopback port, in a thread with its own event loop."""

    def __init__(self, app):
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        self.app = app
        ready = threading.Event()

        async def serve():
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(
            target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()),
            daemon=True,
        )
        self.thread.start()
        assert ready.wait(30)
        self.url = f"http://127.0.0.1:{self.port}/"

    def call(self, fn):
        async def wrapper():
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _av_offset(video: np.ndarray, audio: np.ndarray, t0: float, t1: float, max_ms: float = 400):
    """Lag (ms; positive: the picture comes after its sound) that best lines up the marker of the
    frame on screen with the loudness heard, and the correlation there."""
    grid = np.arange(t0, t1, 5.0)
    csum = np.concatenate([[0.0], np.cumsum(audio[:, 1] ** 2)])
    lo = np.searchsorted(audio[:, 0], grid)
    hi = np.searchsorted(audio[:, 0], grid + 40.0)  # one frame's span of sound
    heard = _loudness_to_level(np.sqrt((csum[hi] - csum[lo]) / np.maximum(hi - lo, 1)))
    best = (0.0, -np.inf)
    for lag in np.arange(-max_ms, max_ms + 1, 5.0):
        k = np.searchsorted(video[:, 0], grid + lag, side="right") - 1
        seen = np.where(k >= 0, video[np.clip(k, 0, None), 1], np.nan)
        ok = np.isfinite(seen)
        if ok.sum() < 200 or seen[ok].std() == 0 or heard[ok].std() == 0:
            continue
        r = float(np.corrcoef(seen[ok], heard[ok])[0, 1])
        if r > best[1]:
            best = (float(lag), r)
    return best


def _spy_on_sender(monkeypatch) -> dict:
    """Log what the transport hands to aiortc (the sender side of the A/V offset): when each
    10 ms of audio and each video frame is taken, with the audio's loudness and the frame's
    loudness marker."""
    from pipecat.transports.smallwebrtc import transport as smallwebrtc

    sent: dict = {"audio": [], "video": []}
    recv_audio, recv_video = smallwebrtc.RawAudioTrack.recv, smallwebrtc.RawVideoTrack.recv

    async def audio(self):
        f = await recv_audio(self)
        x = f.to_ndarray().astype(np.float32) / 32768.0
        sent["audio"].append((time.time() * 1000, float(np.sqrt(np.mean(np.square(x))))))
        return f

    async def video(self):
        f = await recv_video(self)
        h = f.height // 16
        marker = float(f.to_ndarray(format="rgb24")[: h // 2, : h // 2, 0].mean())
        sent["video"].append((time.time() * 1000, marker))
        return f

    monkeypatch.setattr(smallwebrtc.RawAudioTrack, "recv", audio)
    monkeypatch.setattr(smallwebrtc.RawVideoTrack, "recv", video)
    return sent


@pytest.mark.timeout(240)
def test_example_bot_in_browser(monkeypatch):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium): browser test skipped")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): the bot has no voice")
    example = _load_example()
    steal = StealMeter()
    avatars: list[MarkedAvatar] = []
    sent = _spy_on_sender(monkeypatch)

    def make_avatar():
        avatars.append(MarkedAvatar(threads=1))
        return avatars[-1]

    server = _Server(example.create_app(make_avatar, "scripted"))
    report: dict = {}
    t_start = time.monotonic()
    try:
        with sync_playwright() as pw:
            try:
                browser = pw.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, timeout=60_000
                )
            except Exception as e:
                pytest.skip(f"chromium does not start under playwright: {str(e).splitlines()[0]}")
            try:
                page = browser.new_page()
                page.goto(server.url + "?measure=1", timeout=30_000)
                page.click("#start")
                page.wait_for_function("() => window.edgetalk.shown > 0", timeout=60_000)
                report["first_shown_after_start_s"] = time.monotonic() - t_start
                # 20 s of lines and pauses: Chrome's A/V sync settles over the first ~15 s
                # (its audio jitter buffer starts deep), as in edgetalk serve's test.
                page.wait_for_function("() => window.edgetalk.shown > 25 * 20", timeout=90_000)
                pc_id = page.evaluate("() => window.edgetalk.pcId")
                bot = server.app["bots"][pc_id]
                stats = server.call(bot.stats)
                trace = page.evaluate("() => window.edgetalk.trace")
                first_shown = page.evaluate("() => window.edgetalk.firstShownAt")
                # Interrupt, through the page: the bot stops talking, the video goes on.
                before = page.evaluate("() => window.edgetalk.shown")
                page.click("#interrupt")
                page.wait_for_function(
                    f"() => window.edgetalk.shown > {before} + 50", timeout=30_000
                )
                after = server.call(bot.stats)
            finally:
                browser.close()
    finally:
        server.stop()

    video = np.array(trace["video"], dtype=np.float64)  # [epoch ms on screen, loudness, index]
    audio = np.array(trace["audio"], dtype=np.float64)  # [epoch ms heard, rms]
    assert len(video) > 200 and len(audio) > 1000, (len(video), len(audio))
    span_s = (video[-1, 0] - video[0, 0]) / 1000
    fps_shown = (len(video) - 1) / span_s  # frames the transport sent, repeats included
    new = np.count_nonzero(np.diff(np.round(video[:, 2] / 85.0)) != 0)
    fps_browser = new / span_s  # different frames shown per second
    # First frame on screen after the first TTS audio: the first shown frame whose marker says
    # "speech" (both clocks are this machine's wall clock).
    speaking = video[video[:, 1] > 40]
    assert len(speaking), "no speaking frame was shown"
    ffd_screen = speaking[0, 0] / 1000 - stats["first_tts_audio_at"]
    t0 = max(video[0, 0], audio[0, 0]) + 500
    t1 = min(video[-1, 0], audio[-1, 0]) - 300
    lag0, r0 = _av_offset(video, audio, t0, min(t1, t0 + 6000))  # the first 6 s
    lag, r = _av_offset(video, audio, max(t0, t1 - 8000), t1)  # settled: the last 8 s
    sv, sa = np.array(sent["video"]), np.array(sent["audio"])
    s0, s1 = max(sv[0, 0], sa[0, 0]) + 500, min(sv[-1, 0], sa[-1, 0]) - 300
    lag_sent, r_sent = _av_offset(sv, sa, s0, s1)  # what goes into aiortc
    report.update(
        av_offset_sender_ms=lag_sent,
        av_corr_sender=r_sent,
        ffd_service_ms=[d * 1000 for d in stats["speech_delays_s"]],
        ffd_on_screen_ms=ffd_screen * 1000,
        fps_browser=fps_browser,
        fps_shown_with_repeats=fps_shown,
        fps_service=stats["fps"],
        av_offset_initial_ms=lag0,
        av_corr_initial=r0,
        av_offset_ms=lag,
        av_corr=r,
        frames_shown=len(video),
        lines_spoken=stats["lines_spoken"],
        session_late_dropped=(stats["late"], stats["dropped"]),
        interruptions=after["interruptions"],
        first_shown_after_start_epoch_ms=first_shown,
        test_runtime_s=time.monotonic() - t_start,
    )
    (_artifacts() / "pipecat_report.json").write_text(json.dumps(report, indent=2, default=str))
    (_artifacts() / "pipecat_trace.json").write_text(json.dumps(trace))
    print(
        f"\npipecat in the browser: FFD {ffd_screen * 1000:.0f} ms on screen after the first TTS "
        f"audio (service: {report['ffd_service_ms'][0]:.0f} ms), FPS browser {fps_browser:.1f} / "
        f"service {stats['fps']:.1f}; A/V offset first 6 s {lag0:.0f} ms (r={r0:.2f}), "
        f"settled {lag:.0f} ms (r={r:.2f}); at the sender {lag_sent:.0f} ms (r={r_sent:.2f}); "
        f"runtime {report['test_runtime_s']:.0f} s"
    )
    assert stats["lines_spoken"] >= 2  # BotStoppedSpeaking came back after line 1
    assert after["interruptions"] == 1
    # Where the transport hands media to aiortc, sound and picture sit within ITU-R BT.1359's
    # acceptability window. At the receiver the figure is reported, not asserted: with the bot,
    # its TTS and Chromium on 2 cores the browser shows 7-10 FPS here, and the receiver's
    # correlation (0.48-0.61) is too weak to place the offset reliably.
    if steal.speed_judged(f"the sender's A/V offset {lag_sent:.0f} ms (r={r_sent:.2f})"):
        assert r_sent > 0.4, report
        assert -185 <= lag_sent <= 90, report
    assert ffd_screen < 2.0, report
    assert fps_browser >= 5, report  # frames keep flowing; real time is not reached on 2 cores
