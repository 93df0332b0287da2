"""`edgetalk serve`: the HTTP guard, the audio plumbing, and the whole page in a real browser.

The browser test drives Debian's chromium through playwright (no browser download): a fake
microphone plays the embedded speech, the page uploads a photo (a face-less one first), starts a
session, and the test checks the avatar's video (a screenshot with a face in it), the server's
stats, interrupt, "busy" for a second tab, and that a closed or crashed tab frees its session. It
also measures, at the receiving end, the A/V offset of what the browser shows and plays.
Artifacts (screenshots, serve_report.json) go to tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from .conftest import (  # noqa: E402
    STEAL_LIMIT,
    StealMeter,
    floor_for_this_machine,
    need,
    skip_or_fail,
)

need("aiohttp", "edgetalk serve needs aiohttp (pip install 'edgetalk[serve]')")
need("aiortc", "edgetalk serve needs aiortc (pip install 'edgetalk[serve]')")

from edgetalk.serve import media  # noqa: E402
from edgetalk.serve.server import BackgroundServer, ServeConfig, png_bytes  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "test-token-7f3a"


def _artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    ignore = ARTIFACTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return ARTIFACTS


def _face_photo() -> Path:
    ref = importlib.resources.files("edgetalk.models") / "assets" / "avatar.png"
    return Path(str(ref))


def _faceless_png(path: Path) -> Path:
    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    path.write_bytes(png_bytes(rgb))
    return path


def _request(url, data=None, headers=None, method=None, timeout=10.0):
    # Only ever the loopback server this test starts (http://127.0.0.1:PORT): no downloads.
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"text": body.decode(errors="replace")}


@pytest.fixture(scope="module")
def server():
    srv = BackgroundServer(ServeConfig(port=0, token=TOKEN, max_sessions=1)).start()
    yield srv
    srv.stop()


# ---- cheap tests ---------------------------------------------------------------------------------
def test_remote_host_needs_token(tmp_path, capsys):
    from edgetalk.cli import main

    cfg = ServeConfig(host="0.0.0.0", port=0)
    cfg.check()  # never open to other machines without a token: one is made
    assert cfg.token and cfg.token_generated
    assert main(["serve", "--host", "0.0.0.0", "--token-file", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "cannot read --token-file" in err and "Traceback" not in err


def test_upsampler_is_exact_and_flat():
    up = media.Upsampler()
    t = np.arange(16000) / 16000
    for hz in (200.0, 3000.0):
        x = np.sin(2 * np.pi * hz * t).astype(np.float32)
        pieces = [up(x[i : i + 640]) for i in range(0, x.shape[0], 640)]
        assert all(p.shape[0] == 1920 for p in pieces)  # every frame: two whole 20 ms frames
        y = np.concatenate(pieces)
        ref = np.sin(2 * np.pi * hz * (np.arange(48000) / 48000 - up.delay_s))
        assert np.abs(y[500:] - ref[500:]).max() < 1e-3


def test_each_track_keeps_its_own_time_0_when_the_session_drops_a_quiet_frame():
    """The pump's clocks (serve/media.py): every frame's picture and every 20 ms of its sound are
    sent at the frame's presentation time (LiveFrame.due). The session drops a quiet frame in a
    pause to take back a raised delay (index 3 here; every frame after it is due 40 ms earlier),
    so the audio stream is the timeline less that frame: keyed to the timeline, its sound would
    go out 40 ms before its picture for every frame dropped."""
    import asyncio

    from edgetalk.runtime.session import LiveFrame

    rgb = np.zeros((16, 16, 3), np.uint8)
    t0 = time.monotonic() + 0.05

    class Session:
        def start(self):
            pass

        def frames(self, gaps=False):
            assert gaps  # the pump plays audio on its own clock
            for i in (0, 1, 2, 4, 5):  # frame 3 dropped: the delay came down by 40 ms
                yield LiveFrame(
                    i,
                    rgb,
                    audio=np.full(640, 0.001 * i, np.float32),
                    due=t0 + i / 25 - 0.04 * (i > 3),
                )

    async def main():
        peer = media.Peer(None, None, Session(), "x")
        audio_bases = []
        deliver = peer._deliver

        def spy(*args):
            deliver(*args)
            audio_bases.append(peer.audio.base)

        peer._deliver = spy
        peer.start_media()
        await asyncio.get_running_loop().run_in_executor(None, peer._pump_thread.join, 5.0)
        await asyncio.sleep(0.05)  # the last _deliver calls
        peer._timeout.cancel()
        return peer, audio_bases

    peer, audio_bases = asyncio.run(main())
    video = list(peer.video._q)
    audio = list(peer.audio._q)
    assert [f.pts * 25 // media.VIDEO_CLOCK for _, f, _ in video] == [0, 1, 2, 4, 5]
    assert len(audio) == 10 and len(audio_bases) == 5  # two 20 ms frames per frame sent
    lag = peer._handoff_lag
    for k, (i, (_, vf, vbase)) in enumerate(zip((0, 1, 2, 4, 5), video, strict=True)):
        due = t0 + i / 25 - 0.04 * (i > 3)
        assert vbase + vf.pts / media.VIDEO_CLOCK == pytest.approx(due + lag, abs=1e-6)
        af = audio[2 * k]  # this frame's first 20 ms of sound
        assert audio_bases[k] + af.pts / 48000 == pytest.approx(due + lag, abs=1e-6)


def test_audio_frame_to_float():
    import av

    pcm = (np.arange(1920, dtype=np.int16) - 960).reshape(1, -1)  # packed stereo, 960 samples
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
    frame.sample_rate = 48000
    x = media.audio_frame_to_float(frame)
    assert x.shape == (960, 2) and x.dtype == np.float32
    assert x[0, 0] == pytest.approx(-960 / 32768) and x[0, 1] == pytest.approx(-959 / 32768)


def test_http_guard_and_upload(server, tmp_path):
    url = server.url
    status, cfg = _request(url + "api/config")
    assert status == 200 and cfg == {"token_required": True}  # nothing else without the token
    status, body = _request(
        url + "offer", data=b"{}", headers={"X-EdgeTalk-Token": "wrong"}, method="POST"
    )
    assert status == 401 and "#token=" in body["error"]
    auth = {"X-EdgeTalk-Token": TOKEN}
    status, body = _request(url + "offer", data=b"not json", headers=auth, method="POST")
    assert status == 400 and "offer must be JSON" in body["error"]
    # the token is never taken from a URL (logs, history, Referer)
    status, body = _request(url + f"api/interrupt?token={TOKEN}", data=b"{}", method="POST")
    assert status == 401
    # POSTs need the page's header (a cross-site form cannot send it)
    status, body = _request(url + "api/interrupt", data=b"{}", method="POST")
    assert status == 401 and body["token_required"]
    # DNS rebinding: a loopback server answers only to loopback Host names
    status, _ = _request(url + "api/health", headers={**auth, "Host": "evil.example:80"})
    assert status == 403
    status, body = _request(url + "api/stats?id=nope", headers=auth)
    assert status == 404
    # the upload goes through prepare_avatar and its face check
    faceless = _faceless_png(tmp_path / "stripes.png").read_bytes()
    status, body = _request(
        url + "api/avatar",
        data=faceless,
        headers={**auth, "X-Filename": "stripes.png", "Content-Type": "image/png"},
        method="POST",
    )
    assert status == 400
    assert body["error"].startswith("no face found in stripes.png; use a frontal photo")
    assert "--no-face-check" not in body["error"] and str(tmp_path) not in body["error"]
    status, body = _request(
        url + "api/avatar",
        data=_face_photo().read_bytes(),
        headers={**auth, "X-Filename": "me.png", "Content-Type": "image/png"},
        method="POST",
    )
    assert status == 200 and body["id"] and body["preview"].startswith("data:image/png;base64,")
    status, body = _request(
        url + "api/avatar", data=b"", headers={**auth, "X-Filename": "x.png"}, method="POST"
    )
    assert status == 400 and "empty" in body["error"]


def test_cli_serves_and_stops(tmp_path):
    """`edgetalk serve` as a user runs it: prints the URL, serves the page, stops on Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "edgetalk", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines: list[str] = []
    got_url = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serve: open "):
                got_url.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert got_url.wait(90), "".join(lines)
        url = next(x for x in lines if x.startswith("serve: open ")).split()[2]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"<title>EdgeTalk</title>" in r.read()
        status, cfg = _request(url + "api/config")
        assert status == 200 and cfg["token_required"] is False and cfg["max_sessions"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert any("serve: stopping" in x for x in lines), "".join(lines)


# ---- the browser test ----------------------------------------------------------------------------
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


def _speech_wav_48k(path: Path) -> Path:
    import soundfile as sf
    import soxr

    from edgetalk.runtime.audio_io import default_speech

    x, rate = sf.read(str(default_speech()), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if rate != 48000:
        x = soxr.resample(x, rate, 48000)
    sf.write(str(path), x, 48000, subtype="PCM_16")
    return path


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install playwright; no browser download)")
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


def _wait(page, js: str, timeout_s: float, what: str):
    try:
        page.wait_for_function(js, timeout=timeout_s * 1000)
    except Exception as e:
        status = page.evaluate("() => document.getElementById('status').textContent")
        stats = page.evaluate("() => window.edgetalk && window.edgetalk.stats")
        raise AssertionError(
            f"timed out waiting for {what} (page status: {status!r}; server stats: {stats})"
        ) from e


def _health(server) -> dict:
    status, body = _request(server.url + "api/health", headers={"X-EdgeTalk-Token": TOKEN})
    assert status == 200
    return body


def _wait_active(server, n: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _health(server)["active"] == n:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"the server still has {_health(server)['active']} session(s), not {n}")


def _xcorr_offset(shown, values: dict, audio: np.ndarray, grid: np.ndarray, max_ms=400):
    """Lag (ms, positive: the picture comes after its sound) maximising the correlation between
    values[frame shown at t + lag] and the loudness heard at t, and that correlation."""
    csum = np.concatenate([[0.0], np.cumsum(audio[:, 1] ** 2)])
    lo = np.searchsorted(audio[:, 0], grid)
    hi = np.searchsorted(audio[:, 0], grid + 40.0)  # one frame's span of sound
    heard = np.sqrt((csum[hi] - csum[lo]) / np.maximum(hi - lo, 1))
    best = (0.0, -np.inf)
    for lag in np.arange(-max_ms, max_ms + 1, 5.0):
        seen = np.array([values.get(int(i), np.nan) for i in shown(grid + lag)])
        ok = np.isfinite(seen) & np.isfinite(heard)
        if ok.sum() < 50 or seen[ok].std() == 0 or heard[ok].std() == 0:
            continue
        r = float(np.corrcoef(seen[ok], heard[ok])[0, 1])
        if r > best[1]:
            best = (float(lag), r)
    return best


def _measure_av(trace: dict, frame_log: list, recorded: list, window_s: float = 6.0) -> dict:
    """Receiving-end A/V offsets, in ms (positive: the picture comes after its sound).

    The page logged when each video frame is displayed (requestVideoFrameCallback: expected
    display time, RTP timestamp) and the loudness of the avatar's audio as the browser plays it
    (an AudioWorklet tap, mapped to the same clock with getOutputTimestamp). The server logged each
    sent frame's index and the loudness of that frame's audio. RTP timestamps (90 kHz, pts = index
    * 3600) map the displayed frames to indices, the first shown frame being the first sent
    (loopback: nothing is lost). Cross-correlating "loudness of the frame on screen" with
    "loudness heard" gives the transport offset; "mouth opening of the frame on screen"
    (FaceMeasurer on the sent frames) with "loudness heard" gives mouth-to-sound.

    Chrome's A/V sync starts with audio behind (its audio jitter buffer starts deep) and closes
    the gap gradually, at about 30 ms a second; a stall that sends audio late in a burst opens it
    again. So the offset is reported for the first and the last `window_s` seconds, and over 4-s
    windows every 2 s (`offset_track`). "Settled" is the median over the windows of the stream's
    second half where the offset can be read (r >= 0.3): one stall near the end shows in the
    last window but not there, a lasting offset shows in both.
    """
    v = np.array([(r[0], r[1]) for r in trace["video"] if r[1] is not None], float)
    a = np.array(trace["audio"], float)
    out: dict = {"video_callbacks": len(v), "audio_blocks": len(a)}
    if len(v) < 100 or len(a) < 1000 or not frame_log:
        out["note"] = "too little data"
        return out
    first = frame_log[0][0]
    index = np.round(((v[:, 1] - v[0, 1]) % 2**32) / 3600.0).astype(int) + first

    def shown(times):
        k = np.searchsorted(v[:, 0], times, side="right") - 1
        return np.where(k >= 0, index[np.clip(k, 0, None)], -1)

    t0 = max(v[0, 0], a[0, 0]) + 1000.0
    t1 = min(v[-1, 0], a[-1, 0]) - 500.0
    w = window_s * 1000.0
    loud = {i: r for i, _, r in frame_log}
    for name, grid in (
        ("initial", np.arange(t0, min(t1, t0 + w), 5.0)),
        ("end", np.arange(max(t0, t1 - w), t1, 5.0)),
    ):
        lag, r = _xcorr_offset(shown, loud, a, grid)
        out[f"{name}_offset_ms"], out[f"{name}_corr"] = lag, r
    track = [  # (start s, ms, r)
        (round((s - t0) / 1000.0), *(round(x, 2) for x in _xcorr_offset(shown, loud, a, g)))
        for s in np.arange(t0, t1 - 4000.0, 2000.0)
        for g in [np.arange(s, s + 4000.0, 5.0)]
    ]
    out["offset_track"] = track
    half = [(lag, r) for start, lag, r in track if start * 1000.0 >= (t1 - t0) / 2]
    readable = [lag for lag, r in half if r >= 0.3]
    out["settled_windows"] = f"{len(readable)} of {len(half)}"
    out["settled_corr"] = float(np.median([r for _, r in half])) if half else 0.0
    out["settled_offset_ms"] = float(np.median(readable)) if len(readable) >= 3 else None
    sync = np.array(
        [(s[1], s[2]) for s in trace["sync"] if s[1] is not None and s[2] is not None], float
    )
    if len(sync) >= 10:  # Chrome's own estimate: video minus audio playout, in sender time
        d = sync[:, 1] - sync[:, 0]
        out["chrome_estimate_initial_ms"] = float(np.median(d[:5]))
        out["chrome_estimate_settled_ms"] = float(np.median(d[-5:]))
    if not recorded:
        return out
    try:
        from edgetalk.training.metrics import FaceMeasurer, av_offset
    except ImportError:
        out["mouth_note"] = "mediapipe missing: mouth-to-sound not measured"
        return out
    fm = FaceMeasurer()
    try:
        track = fm.track([rgb for _, rgb in recorded])
    finally:
        fm.close()
    mouth = {i: float(m) for (i, _), m in zip(recorded, track.opening, strict=True)}
    out["mouth_faces_found"] = track.found
    grid = np.arange(t0, t1, 5.0)
    lag, r = _xcorr_offset(shown, mouth, a, grid)
    out.update(mouth_to_sound_offset_ms=lag, mouth_to_sound_corr=r)
    # The same on the server's own timeline (no transport): does the model move the mouth with
    # the sound at all? With untrained weights it does not, and no offset can be read.
    idx = [i for i, _ in recorded if i in loud]  # a frame logged after the snapshot has no loudness
    lag_f, r_f = av_offset(np.array([mouth[i] for i in idx]), np.array([loud[i] for i in idx]))
    out.update(model_mouth_offset_frames=lag_f, model_mouth_corr=r_f)
    return out


@pytest.mark.timeout(420)
def test_page_in_browser(server, tmp_path, monkeypatch):
    sync_playwright = _browser_or_skip()
    from edgetalk.runtime.avatar import detect_face, load_image

    monkeypatch.setattr(media, "RECORD_FRAMES", 500)  # frames kept for the mouth measurement
    monkeypatch.setattr(media, "MEDIA_TIMEOUT_S", 6.0)  # a crashed tab is noticed sooner
    out = _artifacts()
    report: dict = {}
    t_start = time.monotonic()
    steal = StealMeter()
    wav = _speech_wav_48k(tmp_path / "speech48k.wav")
    flags = [*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"]
    page_url = server.url + f"?token={TOKEN}"
    with sync_playwright() as pw:
        try:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh --user-data-dir
                executable_path=CHROMIUM,
                headless=True,
                args=flags,
                timeout=60_000,
                viewport={"width": 1180, "height": 600},
            )
        except Exception as e:
            skip_or_fail(f"chromium does not start under playwright: {str(e).splitlines()[0]}")
        context.set_default_timeout(30_000)
        try:
            # Without the token the page says what to do.
            page = context.new_page()
            page.goto(server.url, timeout=30_000)
            _wait(
                page,
                "() => /access token/.test(document.getElementById('status').textContent)",
                15,
                "the token message",
            )
            assert page.is_visible("#token-box")

            page.goto(page_url, timeout=30_000)
            _wait(
                page,
                "() => /^Ready/.test(document.getElementById('status').textContent)",
                15,
                "the page to be ready",
            )
            # A photo with no face: the same preparation and face check as the CLI.
            page.set_input_files("#photo", str(_faceless_png(tmp_path / "stripes.png")))
            _wait(
                page,
                "() => /no face found/.test(document.getElementById('avatar-msg').textContent)",
                30,
                "the no-face error",
            )
            assert "error" in page.get_attribute("#avatar-msg", "class")
            assert page.is_checked("#avatar-default")
            page.set_input_files("#photo", str(_face_photo()))
            _wait(
                page,
                "() => /face found in/.test(document.getElementById('avatar-msg').textContent)",
                30,
                "the photo to be accepted",
            )
            assert page.is_checked("#avatar-upload")

            t_click = time.monotonic()
            page.click("#start")
            _wait(
                page,
                "() => window.edgetalk.stats && window.edgetalk.stats.frames > 0",
                60,
                "the first frames",
            )
            report["start_to_first_stats_s"] = time.monotonic() - t_click
            # Let it talk a while (the fake microphone loops the speech) for the measurements.
            # 750 frames: 54 s at the slower CI-class VM's ~14 FPS, 36 s at 21. The A/V offset is
            # judged on the second half, long enough after the start for Chrome's A/V sync
            # (30 ms a second) to have closed the 200-400 ms it starts with on a busy machine.
            try:
                _wait(page, "() => window.edgetalk.stats.frames > 750", 90, "750 frames")
            except AssertionError:
                if steal.speed_judged("750 frames in 90 s"):
                    raise
            # The A/V logs first: screenshots and the face check below load both processes
            # (the server shares this one), and a stall they cause inside the measured window
            # is the test's, not the product's (Chrome takes ~10 s to re-sync after one).
            # The page's own lines with the stats they show (the next poll may come after the
            # trace's transfer below, which holds this process for a moment).
            stats, browser, shown = page.evaluate(
                """() => [window.edgetalk.stats, window.edgetalk.browser,
                    ["st-fps", "st-backend", "st-ffd", "st-browser-ffd"].map(
                        (id) => document.getElementById(id).textContent)]"""
            )
            trace = page.evaluate("() => window.edgetalk.trace")
            peer = server.server.peers[stats["id"]]
            # One snapshot of both logs: frames keep flowing between two separate calls.
            frame_log, recorded = server.call(lambda: (list(peer.frame_log), list(peer.recorded)))
            page.locator("#video").screenshot(path=str(out / "serve_video.png"))
            page.screenshot(path=str(out / "serve_page.png"), full_page=True)
            report["server_stats"] = stats
            report["browser"] = browser
            report["browser_first_frame_after_start"] = shown[3]
            assert stats["state"] == "connected" and stats["avatar"] == "avatar.png"
            assert stats["fps"] > 0 and stats["fps_recent"] > 0
            assert stats["first_frame_delay_s"] is not None and stats["first_frame_delay_s"] > 0
            # The mic got there. The session's level, not the recent one: the recent level
            # falls in every pause of the looped speech, and a snapshot may land in one.
            assert stats["mic_seconds"] > 5 and stats["mic_rms_session"] > 0.001
            assert 0.0 <= stats["mic_rms"] <= 1.0
            assert browser["shownFps"] > 0 and browser["framesDecoded"] > 100
            assert float(shown[0]) > 0
            assert shown[1] == stats["backend"]
            assert "ms (floor" in shown[2]

            # The video element shows the avatar: not blank, and a face is in it.
            shot = load_image(out / "serve_video.png")
            assert shot.std() > 20, "the video element looks blank"
            assert detect_face(shot) is not None, "no face in the video element"

            # Receiving-end A/V offset (logs taken before the interrupt disturbs the stream).
            report["av"] = _measure_av(trace, frame_log, recorded)
            (out / "serve_trace.json").write_text(json.dumps({"trace": trace, "log": frame_log}))

            # Interrupt: wired to Session.interrupt(), counted in the stats.
            before = stats["interruptions"]
            page.click("#interrupt")
            _wait(
                page,
                f"() => window.edgetalk.stats.interruptions === {before + 1}",
                10,
                "the interruption to be counted",
            )
            _wait(
                page,
                f"() => document.getElementById('st-interruptions').textContent === '{before + 1}'",
                5,
                "the page to show it",
            )
            assert peer.session.stats.interruptions == before + 1

            # A second tab while the only session is in use: "busy".
            page2 = context.new_page()
            page2.goto(page_url, timeout=30_000)
            _wait(
                page2,
                "() => /^Ready/.test(document.getElementById('status').textContent)",
                15,
                "page 2 to be ready",
            )
            page2.click("#start")
            _wait(
                page2,
                "() => /busy/.test(document.getElementById('status').textContent)",
                30,
                "the busy message",
            )
            assert "error" in page2.get_attribute("#status", "class")
            assert not page2.is_disabled("#start")
            assert _health(server)["active"] == 1

            # Closing the tab frees the session (its pagehide beacon, or the connection closing).
            secret = page.evaluate("() => window.edgetalk.state.secret")  # the session's own
            page.close()
            report["freed_after_tab_close_s"] = _wait_active(server, 0, 40)
            final = _request(
                server.url + f"api/stats?id={stats['id']}",
                headers={"X-EdgeTalk-Token": TOKEN, "X-EdgeTalk-Session": secret},
            )[1]
            assert final["closed"] and final["frames"] > 300

            # Now the second tab gets a session.
            page2.click("#start")
            _wait(
                page2,
                "() => window.edgetalk.stats && window.edgetalk.stats.frames > 25",
                60,
                "page 2's frames",
            )
            report["second_session_stats"] = page2.evaluate("() => window.edgetalk.stats")
            # A crashed tab sends nothing more: the server notices the silence and frees it.
            cdp = context.new_cdp_session(page2)
            t_crash = time.monotonic()
            with contextlib.suppress(Exception):  # the crash also ends the CDP call
                cdp.send("Page.crash", timeout=5_000)
            _wait_active(server, 0, 45)
            report["freed_after_tab_crash_s"] = time.monotonic() - t_crash
        finally:
            context.close()
    report["test_runtime_s"] = time.monotonic() - t_start
    (out / "serve_report.json").write_text(json.dumps(report, indent=2, default=str))
    av = report["av"]
    print(
        "\nserve: first-frame delay (server) "
        f"{report['server_stats']['first_frame_delay_s'] * 1000:.0f} ms, "
        f"browser first frame after Start {report['browser_first_frame_after_start']}, "
        f"FPS server {report['server_stats']['fps_recent']:.1f} / browser "
        f"{report['browser']['shownFps']:.1f}; A/V offset initial {av.get('initial_offset_ms')} "
        f"ms, settled {av.get('settled_offset_ms')} ms (r={av.get('settled_corr', 0):.2f}, "
        f"last 6 s {av.get('end_offset_ms')} ms; "
        f"Chrome's estimate {av.get('chrome_estimate_initial_ms')} -> "
        f"{av.get('chrome_estimate_settled_ms')} ms); mouth-to-sound "
        f"{av.get('mouth_to_sound_offset_ms')} ms (r={av.get('mouth_to_sound_corr', 0):.2f}); "
        f"runtime {report['test_runtime_s']:.0f} s"
    )
    # Sound and picture together once the browser's A/V sync has settled: within the ITU-R
    # BT.1359 detectability window (sound at most 125 ms after / 45 ms before the picture).
    # Unconditional: a correlation too weak to place the offset is itself a failure. The window
    # is BT.1359's acceptability one (sound at most 185 ms after / 90 ms before the picture):
    # on the 2-core CI-class VM the settled offset measured -75 to -115 ms with aiortc's own
    # sender reports; with rtp_clock's (session 29, a Zen 1 EPYC VM) -35 to -45 ms over the last
    # 6 s, and -10 to -125 ms with a busy process on one of the two cores; the second half's
    # median -10 to -45 ms in four runs, but -170 and -175 ms in two where one burst of late
    # audio (a stall) made Chrome re-sync for ~20 s: near the bound on that VM.
    report["cpu_steal"] = steal.share()
    if steal.speed_judged("the receiver's A/V offset and the FPS floors"):
        why = (
            f"initial {av.get('initial_offset_ms')} ms, last 6 s {av.get('end_offset_ms')} ms; "
            f"4-s windows (s, ms, r): {av.get('offset_track')}; audio sent late (ms): "
            f"{report['server_stats']['audio_send_late_ms']}"
        )
        assert av.get("settled_corr", 0) > 0.4 and av.get("settled_offset_ms") is not None, (
            f"the A/V offset could not be measured: median r {av.get('settled_corr')}; {why}"
        )
        assert -185 <= av["settled_offset_ms"] <= 90, (
            f"sound and picture apart by {av['settled_offset_ms']} ms (median of the second "
            f"half); {why}"
        )
    # Frames at both ends, with Chromium on the same 2 cores. Measured on the AMD EPYC CI-class
    # VM: 19.0-21.5 FPS server, 16.1-21.2 browser (the old code: 12.4 / 11.0). On the Intel
    # Xeon (AVX-512) CI-class VM (session 11): the previous release 15.0 server / 13.6 browser,
    # this one 14.1-14.2 / 14.5, with the hypervisor stealing ~25% of the CPU during the test.
    # The floors catch a half-speed stream on the faster class.
    if steal.share() <= STEAL_LIMIT:
        server_fps, shown_fps = report["server_stats"]["fps_recent"], report["browser"]["shownFps"]
        assert server_fps >= floor_for_this_machine(server_fps, 11, "server FPS"), report
        assert shown_fps >= floor_for_this_machine(shown_fps, 9, "browser FPS"), report
    assert report["server_stats"]["frames"] > 100, report["server_stats"]  # never frozen
