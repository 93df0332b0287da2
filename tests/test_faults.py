"""Faults a live avatar must survive: a full disk, a vanished virtual camera, hostile or broken
socket peers, and signals during `live` and `export`. Each ends in a clear report, never a
traceback, and what was written stays usable."""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from edgetalk.errors import BundleError, SinkError
from edgetalk.runtime import socket_source
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.session import Session
from edgetalk.runtime.socket_source import CTRL_END, SocketSource
from edgetalk.runtime.sources import feed

from .conftest import MICRO, as_from_a_terminal, av_ends, need, seeded_model, speechlike

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
AAC_FRAME_S = 1024 / 16000  # the encoder pads the last audio frame: the ends agree within it


@pytest.fixture(scope="module")
def backend():
    return TorchBackend(seeded_model(MICRO))


# ---- sinks --------------------------------------------------------------------------------------
def test_disk_full_during_live_keeps_a_playable_mp4(micro_ckpt, tmp_path):
    """The process may write 40 kB (RLIMIT_FSIZE: writes beyond fail with EFBIG, as on a full
    disk). `live` says so in one line, prints its summary, and the fragmented mp4 plays."""
    out = tmp_path / "full.mp4"
    limit = 40_000

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    pcm = (speechlike(8.0) * 32767).astype("<i2").tobytes()
    r = subprocess.run(
        [sys.executable, "-m", "edgetalk", "live", "--checkpoint", str(micro_ckpt),
         "--pcm-stdin", "--out", str(out), "--seconds", "60"],
        input=pcm, capture_output=True, timeout=120, env=ENV, preexec_fn=small_disk,
    )  # fmt: skip
    err, stdout = r.stderr.decode(), r.stdout.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err + stdout
    assert "error: cannot write" in err and "is the disk full?" in err
    assert "live: stopped: the output failed" in stdout and "summary: frames" in stdout
    assert out.stat().st_size <= limit
    n, v_end, a_end = av_ends(out)  # decodes without an error: the torn fragment was cut off
    assert n >= 25 and abs(v_end - a_end) <= 0.04 + 1e-6, (n, v_end, a_end)


class _FakeCam:
    """pyvirtualcam.Camera whose device disappears after 10 frames."""

    def __init__(self, width, height, fps, fmt=None, device=None):
        self.device, self.sent = device or "/dev/video9", 0

    def send(self, rgb):
        if self.sent >= 10:
            raise RuntimeError("error writing frame: No such device")
        self.sent += 1

    def close(self):
        raise RuntimeError("device gone")


def test_virtual_camera_gone_is_reported(backend, monkeypatch, capsys):
    from edgetalk.runtime.cli_live import play
    from edgetalk.runtime.sinks import VirtualCamSink
    from edgetalk.runtime.sources import FileSource

    fake = types.SimpleNamespace(Camera=_FakeCam, PixelFormat=types.SimpleNamespace(RGB="RGB"))
    monkeypatch.setitem(sys.modules, "pyvirtualcam", fake)
    sink = VirtualCamSink(64)
    session = Session(backend=backend, realtime=False)
    wav = _wav(monkeypatch, 2.0)
    with pytest.raises(SinkError, match="stopped taking frames .*No such device.* after 10 frames"):
        play(session, sink, [FileSource(wav, realtime=False)], seconds=30)
    out = capsys.readouterr().out
    assert "live: stopped: the output failed" in out and "summary: frames" in out
    assert sink.closed  # closed despite the device error


def _wav(monkeypatch, seconds):
    import soundfile as sf

    path = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"edgetalk-fault-{os.getpid()}.wav")
    sf.write(path, speechlike(seconds), 16000)
    return path


# ---- hostile socket peers -----------------------------------------------------------------------
@pytest.fixture
def live_socket(backend, monkeypatch):
    """A realtime session (the avatar idles when no audio comes) fed by a socket source."""
    monkeypatch.setattr(socket_source, "FRAME_TIMEOUT_S", 1.0)
    log = []
    src = SocketSource("127.0.0.1", 0, log=log.append)
    s = Session(backend=backend, realtime=True, late_policy="drop")
    pump = threading.Thread(target=feed, args=(s, src), daemon=True)
    pump.start()
    yield s, src, log
    src.close()
    s.abort()
    pump.join(5)


def frames_for(session, seconds: float) -> int:
    n, t0 = 0, time.monotonic()
    for _ in session.frames():
        n += 1
        if time.monotonic() - t0 > seconds:
            break
    return n


def test_slowloris_cannot_stall_video_or_hold_the_line(live_socket):
    s, src, log = live_socket
    c = socket.create_connection(src.address, timeout=5)
    c.recv(100)
    c.sendall(struct.pack(">I", 64000))  # promise 2 s of audio, then dribble it
    stop = threading.Event()

    def dribble():
        for _ in range(40):
            if stop.is_set():
                return
            try:
                c.sendall(b"\x01")
            except OSError:
                return
            time.sleep(0.05)

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    n = frames_for(s, 2.0)  # the video keeps its 25 fps meanwhile
    stop.set()
    t.join(3)
    assert n >= 0.8 * 2.0 * 25, n
    assert any("incomplete frame" in e for e in src.errors), src.errors  # cut off after 1 s
    c.close()
    c2 = socket.create_connection(src.address, timeout=5)  # the line is free again
    assert c2.recv(100).startswith(b"OK")
    c2.close()


def test_flood_of_connections_and_garbage(live_socket):
    s, src, _ = live_socket
    first = socket.create_connection(src.address, timeout=5)
    assert first.recv(100).startswith(b"OK")
    before = threading.active_count()
    others = []
    for _ in range(30):
        c = socket.create_connection(src.address, timeout=5)
        others.append(c)
    for c in others:
        assert c.recv(100).startswith(b"BUSY")
        c.close()
    first.sendall(os.urandom(4096))  # garbage: a protocol error for this connection only
    first.close()
    n = frames_for(s, 1.0)
    assert n >= 0.8 * 25
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= before  # no thread left behind per connection
    assert src.refused == 30 and src.protocol_errors <= 1


def test_fast_sender_is_held_back_not_buffered(live_socket):
    """A client pushing audio as fast as it can: the source's queue stays at its cap, so memory
    does not grow with what the client sends."""
    s, src, _ = live_socket
    c = socket.create_connection(src.address, timeout=5)
    c.recv(100)
    c.settimeout(0.5)
    payload = (speechlike(1.0) * 32767).astype("<i2").tobytes()
    sent, peak = 0, 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        try:
            c.sendall(struct.pack(">I", len(payload)) + payload)
            sent += 1
        except (TimeoutError, OSError):
            pass
        peak = max(peak, src.queue.samples)
        frames_for(s, 0.05)
    assert sent * 16000 > 2 * src.queue.cap  # far more than the cap was sent ...
    assert peak <= src.queue.cap + 16000  # ... and the queue stayed at it (the rest waits in
    # the kernel's socket buffers, then the sender blocks: TCP backpressure)
    c.close()


def test_disconnect_mid_frame_then_reconnect(backend):
    """The audio before the cut is kept; the next client continues the same stream."""
    src = SocketSource("127.0.0.1", 0, log=lambda m: None)
    s = Session(backend=backend, realtime=False)
    pump = threading.Thread(target=feed, args=(s, src), daemon=True)
    pump.start()
    try:
        good = (speechlike(0.4) * 32767).astype("<i2").tobytes()
        c = socket.create_connection(src.address, timeout=5)
        c.recv(100)
        c.sendall(struct.pack(">I", len(good)) + good + struct.pack(">I", 6400) + b"\0" * 1000)
        c.close()
        time.sleep(0.3)
        c2 = socket.create_connection(src.address, timeout=5)
        assert c2.recv(100).startswith(b"OK")
        c2.sendall(struct.pack(">I", len(good)) + good + struct.pack(">I", CTRL_END))
        c2.close()
        n = sum(1 for _ in s.frames())
        assert n == 20  # 0.4 s + 0.4 s; the half frame is dropped with an error
        assert "connection closed" in src.errors[0]
    finally:
        src.close()
        s.abort()
        pump.join(5)


# ---- signals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_during_live_leave_a_playable_mp4(micro_ckpt, tmp_path, sig):
    out = tmp_path / "live.mp4"
    p = subprocess.Popen(
        [sys.executable, "-m", "edgetalk", "live", "--checkpoint", str(micro_ckpt),
         "--pcm-stdin", "--out", str(out), "--seconds", "60"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
        preexec_fn=as_from_a_terminal,
    )  # fmt: skip
    try:
        p.stdin.write((speechlike(2.0) * 32767).astype("<i2").tobytes())
        p.stdin.flush()
        deadline = time.monotonic() + 30
        while not (out.exists() and out.stat().st_size > 20_000) and time.monotonic() < deadline:
            time.sleep(0.1)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr.decode()
    assert "Traceback" not in stderr.decode() and "summary: frames" in stdout.decode()
    n, v_end, a_end = av_ends(out)
    assert n >= 25 and abs(v_end - a_end) <= AAC_FRAME_S + 1e-6, (n, v_end, a_end)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_during_export_leave_no_bundle(micro_ckpt, tmp_path, sig):
    need("onnxruntime", "the onnx extra is not installed")
    from edgetalk.runtime.bundle import open_bundle

    out = tmp_path / "bundle"
    p = subprocess.Popen(
        [sys.executable, "-m", "edgetalk", "export", "--checkpoint", str(micro_ckpt),
         "--target", "onnx", "--precision", "int8", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, preexec_fn=as_from_a_terminal,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        partial = out.with_name(out.name + ".partial")
        while time.monotonic() < deadline and not any(partial.glob("*.onnx")):
            time.sleep(0.05)
        assert any(partial.glob("*.onnx")), "export never started writing"
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == (130 if sig == signal.SIGINT else 143), stderr.decode()
    assert "interrupted" in stderr.decode() and "Traceback" not in stderr.decode()
    assert not out.exists()  # nothing at the bundle's path ...
    for path in (out, partial):  # ... and the resumable work folder is not a bundle either
        with pytest.raises(BundleError, match="not found|no manifest"):
            open_bundle(path)
    if sig == signal.SIGTERM:  # running the same export again resumes and finishes
        r = subprocess.run(
            [sys.executable, "-m", "edgetalk", "export", "--checkpoint", str(micro_ckpt),
             "--target", "onnx", "--precision", "int8", "--out", str(out)],
            capture_output=True, timeout=300, env=ENV,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr.decode()
        assert open_bundle(out).precision == "int8" and not partial.exists()


# ---- caps ---------------------------------------------------------------------------------------
def test_queued_audio_cap_is_a_clear_error(backend):
    """A producer far ahead of the video: pushes wait at MAX_INPUT_SECONDS (or fail clearly when
    they must not wait), so queued audio never grows without bound."""
    from edgetalk.errors import InputError
    from edgetalk.runtime.session import MAX_INPUT_SECONDS

    s = Session(backend=backend, realtime=False, max_queued_frames=1)  # nobody reads frames
    try:
        s.push_audio(np.zeros(int(16000 * MAX_INPUT_SECONDS * 0.75), np.float32))
        with pytest.raises(InputError, match=f"more than {MAX_INPUT_SECONDS:.0f} s of audio"):
            s.push_audio(np.zeros(int(16000 * MAX_INPUT_SECONDS * 0.5), np.float32), block=False)
        with pytest.raises(InputError, match="is waiting"):
            s.push_audio(np.zeros(16000 * 30, np.float32), timeout=0.3)
    finally:
        s.abort()
