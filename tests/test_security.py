"""Security and robustness regressions (issue #16): each test is an attack that worked before.

Serve-level attacks (HTTP, SDP, session secrets) are in test_security_serve.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgetalk.errors import BundleError, EdgeTalkError, InputError

from .conftest import MICRO, seeded_model


# ---- 1: a backend shared by sessions --------------------------------------------------------------
def _generator_inputs(backend, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in backend.io["generator"].inputs:
        x = rng.standard_normal(t.shape).astype(np.float32)
        if t.name in ("cache_valid", "mask"):
            x = (x > 0).astype(np.float32)
        out[t.name] = x
    return out


def _hammer(backend, module: str, inputs: list[dict], seconds: float) -> tuple[int, int]:
    """Threads, one per input, each running `module` on its own input again and again: (calls,
    calls whose outputs differ from that input's single-threaded outputs)."""
    want = [backend.run(module, x) for x in inputs]
    calls, wrong = [0], [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(i):
        while time.monotonic() < stop:
            got = backend.run(module, inputs[i])
            bad = any(not np.array_equal(got[k], want[i][k]) for k in want[i])
            with lock:
                calls[0] += 1
                wrong[0] += bad

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return calls[0], wrong[0]


def test_cuda_backend_is_safe_to_share_between_threads():
    """Two sessions on one backend: each call must get exactly its own single-threaded outputs
    (before: 62 of 112 outputs were another thread's)."""
    from edgetalk.runtime_cuda.backend_cuda import CudaBackend

    be = CudaBackend(seeded_model(MICRO), precision="fp32", device="cpu")
    inputs = [_generator_inputs(be, 1), _generator_inputs(be, 2)]
    calls, wrong = _hammer(be, "generator", inputs, seconds=3.0)
    assert calls >= 20 and wrong == 0, f"{wrong} of {calls} outputs were another thread's"


# ---- 2: only images, by magic bytes, with an explicit decoder -------------------------------------
def _face_rgb() -> np.ndarray:
    from edgetalk.runtime.avatar import default_avatar

    return default_avatar()


def _face_mp4(path) -> None:
    import av

    rgb = _face_rgb()
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = rgb.shape[1], rgb.shape[0], "yuv420p"
        for _ in range(3):
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_avatar_playlist_naming_a_local_file_is_refused(tmp_path):
    """An HLS playlist `x.m3u8` whose line is file:///.../face.mp4 was decoded through FFmpeg's
    probe and the local video's face came back. Now the magic bytes decide, and only PNG, JPEG,
    WebP and BMP pass; the message is the same whether the named path exists or not."""
    from edgetalk.runtime.avatar import load_image

    _face_mp4(tmp_path / "face.mp4")
    msgs = []
    for target in (tmp_path / "face.mp4", tmp_path / "nothing.mp4"):
        m3u8 = tmp_path / "x.m3u8"
        m3u8.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile://{target}\n")
        with pytest.raises(InputError, match="not a PNG, JPEG, WebP or BMP") as e:
            load_image(m3u8)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "face.mp4" not in msgs[0]
    with pytest.raises(InputError, match="not a PNG, JPEG, WebP or BMP"):
        load_image(tmp_path / "face.mp4")  # a video is not an image either


def test_image_errors_do_not_leak_ffmpeg_internals(tmp_path):
    from edgetalk.runtime.avatar import load_image
    from edgetalk.serve.server import png_bytes

    png = png_bytes(_face_rgb())
    bad = tmp_path / "bad.png"
    bad.write_bytes(png[:64] + bytes(200))  # a PNG header, then garbage
    with pytest.raises(InputError) as e:
        load_image(bad)
    msg = str(e.value)
    assert "damaged or truncated" in msg
    assert "avcodec" not in msg and "Errno" not in msg and "Error" not in msg


# ---- 12: truncated and empty audio ----------------------------------------------------------------
def test_truncated_wav_says_so(tmp_path):
    import io

    import soundfile as sf

    from edgetalk.runtime.audio_io import read_audio

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 5, np.float32), 16000, format="WAV", subtype="PCM_16")
    p = tmp_path / "cut.wav"
    p.write_bytes(buf.getvalue()[: 44 + 2 * 1920])  # the header promises 5 s; 0.12 s is there
    with pytest.raises(InputError, match=r"truncated: header says 5\.00 s, found 0\.12 s"):
        read_audio(p)


def test_empty_wav_gets_a_clear_message(tmp_path):
    from edgetalk.runtime.audio_io import read_audio

    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    with pytest.raises(InputError) as e:
        read_audio(p)
    assert "empty (0 bytes)" in str(e.value) and "Errno" not in str(e.value)


# ---- 10: bundles and checkpoints ------------------------------------------------------------------
def _fake_bundle(root):
    from .fuzz.targets import fake_bundle

    return fake_bundle(root)


def _rewrite(root, manifest) -> None:
    import json

    from edgetalk.runtime.bundle import tree_sha256

    names = {*manifest["files"].values(), *manifest.get("extra", [])}
    manifest["sha256"] = {f: tree_sha256(root / f) for f in names}
    (root / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items()}))


def test_bundle_symlinks_are_refused(tmp_path):
    """A module file that is a link to a file outside the bundle (same bytes, so the hash
    matched) was followed."""
    from edgetalk.runtime.bundle import open_bundle

    root = tmp_path / "b"
    _fake_bundle(root)
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes((root / "decoder.onnx").read_bytes())
    (root / "decoder.onnx").unlink()
    (root / "decoder.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        open_bundle(root)


def _onnx_with_external_data(path, location: str) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[w],
    )
    onnx.save(helper.make_model(g), str(path))


def test_onnx_external_data_is_confined_and_hashed(tmp_path):
    from edgetalk.runtime.bundle import open_bundle

    (tmp_path / "secret.bin").write_bytes(bytes(16))
    root = tmp_path / "b"
    manifest = _fake_bundle(root)
    _onnx_with_external_data(root / "decoder.onnx", "../secret.bin")
    _rewrite(root, manifest)
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(root)
    # inside the bundle but not hashed: refused; hashed: accepted, and a change is noticed
    (root / "w.bin").write_bytes(bytes(16))
    _onnx_with_external_data(root / "decoder.onnx", "w.bin")
    _rewrite(root, manifest)
    with pytest.raises(BundleError, match="does not hash"):
        open_bundle(root)
    _rewrite(root, {**manifest, "extra": ["w.bin"]})
    open_bundle(root)
    (root / "w.bin").write_bytes(b"\x01" * 16)
    with pytest.raises(BundleError, match="w.bin does not match its sha256"):
        open_bundle(root)


def test_checkpoint_config_is_capped_before_building(tmp_path, monkeypatch):
    """A few-kilobyte checkpoint whose config sets sizes near 65,536 built a huge model before
    any shape was compared. Now the model is sized on the meta device first."""
    import json

    import torch

    from edgetalk.models import checkpoint
    from edgetalk.models.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "small.safetensors"
    save_checkpoint(seeded_model(MICRO), path)
    from safetensors.torch import load_file, save_file

    from edgetalk.models.config import ModelConfig

    cfg = MICRO.to_dict()
    cfg["generator"].update(dim=65_536, mlp_ratio=64)
    cfg["audio"].update(hidden=65_536)
    cfg = ModelConfig.from_dict(cfg)  # a valid config: every size within 1..65,536
    meta = {"format": "edgetalk-checkpoint", "format_version": "1", "config": cfg.to_json()}
    save_file(load_file(str(path)), str(path), metadata=meta)
    assert path.stat().st_size < 1_000_000

    real = checkpoint.EdgeTalkModel

    def spy(c):  # the model may be built on the meta device only
        if torch.empty(0).device.type != "meta" and c == cfg:
            raise AssertionError("built the huge model before checking its size")
        return real(c)

    monkeypatch.setattr(checkpoint, "EdgeTalkModel", spy)
    t0 = time.monotonic()
    with pytest.raises(BundleError, match="over the limit"):
        load_checkpoint(path)
    assert time.monotonic() - t0 < 10
    assert json.loads(cfg.to_json())["generator"]["dim"] == 65_536


# ---- 11: export --out never deletes what export did not write -------------------------------------
def _fake_converter(monkeypatch):
    """A target whose converter writes placeholder files: the test is about the folders."""
    import types

    from edgetalk.converters.target import Target, targets
    from edgetalk.export import pipeline

    class Fake(Target):
        name, suffix, parity_backend = "fake", ".bin", "no such backend"

        def convert(self, model, part, io, path, sample):
            path.write_bytes(b"graph")

        def apply_precision(self, precision, src, dst, calibration):
            src.rename(dst)
            return {}

        def tool_versions(self):
            return {}

    monkeypatch.setitem(targets(), "fake", Fake)
    monkeypatch.setattr(pipeline, "parity_backend", lambda tgt, bundle: "a placeholder target")
    from edgetalk.models.io_spec import zeros_for

    def record(backend):  # one call per module is all a placeholder converter needs
        return types.SimpleNamespace(calls={m: [zeros_for(s)] for m, s in backend.io.items()})

    monkeypatch.setattr(pipeline, "record_stream", record)


def test_export_out_keeps_user_files(tmp_path, micro_ckpt, monkeypatch):
    """Exporting into an existing folder that is not a bundle renamed it aside and deleted it."""
    from edgetalk.export.pipeline import export_bundle

    _fake_converter(monkeypatch)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    kw = dict(checkpoint=micro_ckpt, out=out, progress=False, e2e_frames=4)
    with pytest.raises(EdgeTalkError, match="not empty and not a bundle"):
        export_bundle("fake", "fp32", **kw)
    assert (out / "notes.txt").read_text() == "my notes"
    assert export_bundle("fake", "fp32", force=True, **kw).ok  # --force: exported, notes kept
    assert (out / "manifest.json").is_file()
    kept = list(tmp_path.glob("mine.old-*/mine/notes.txt"))
    assert [p.read_text() for p in kept] == ["my notes"]
    # replacing a bundle deletes what its manifest names, and keeps anything else
    from edgetalk.export.pipeline import _replace_out

    work = tmp_path / "mine.partial"
    work.mkdir()
    (work / "manifest.json").write_text("{}")
    (out / "trt_cache").mkdir()
    (out / "trt_cache" / "engine").write_bytes(b"x")
    _replace_out(work, out)
    assert (out / "manifest.json").read_text() == "{}"
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert [p for p in left if "old-" in p and "notes" not in p] == [
        next(p for p in left if p.endswith("trt_cache/engine") and "old-" in p)
    ]


# ---- 4: the socket of `live --listen` -------------------------------------------------------------
def _hello(addr, timeout=5.0):
    import socket

    c = socket.create_connection(addr, timeout=timeout)
    return c, c.makefile("rb").readline().decode().strip()


def _auth(token: bytes) -> bytes:
    import struct

    return struct.pack(">IB", 0xFFFFFFFD, len(token)) + token


def test_silent_peer_cannot_hold_the_socket(monkeypatch):
    """A client that connected and sent nothing held the only slot for ever: BUSY for the real one."""
    import struct

    from edgetalk.runtime import socket_source

    monkeypatch.setattr(socket_source, "AUTH_TIMEOUT_S", 1.0)
    monkeypatch.setattr(socket_source, "AUTH_BACKOFF_S", (0.0, 0.0))  # one address here
    src = socket_source.SocketSource("127.0.0.1", 0, token="s3cret", log=lambda m: None)
    try:
        idle, hello = _hello(src.address)
        assert hello.startswith("OK")
        time.sleep(1.6)
        # the silent peer was told and dropped; the real client gets the slot
        assert "no AUTH within" in idle.makefile("rb").read().decode()
        idle.close()
        c, hello = _hello(src.address)
        assert hello.startswith("OK"), hello
        c.sendall(_auth(b"s3cret") + struct.pack(">Ihh", 4, 1, 2) + struct.pack(">I", 0xFFFFFFFE))
        assert sum(p.shape[0] for p in src) == 2
        c.close()
    finally:
        src.close()


def test_wrong_tokens_are_slowed_down():
    """Wrong tokens could be tried back to back; now an address that sent one waits (1 s,
    doubling) before its next token is even read."""
    from edgetalk.runtime.socket_source import SocketSource

    src = SocketSource("127.0.0.1", 0, token="s3cret", log=lambda m: None)
    try:
        checked = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.9:
            c, hello = _hello(src.address)
            if hello.startswith("OK"):
                c.sendall(_auth(b"guess%d" % checked))
                reply = c.makefile("rb").read().decode()
                assert "bad token" in reply
                checked += 1
            else:
                assert "try again in" in hello
            c.close()
        assert checked == 1
    finally:
        src.close()


def test_refused_connections_do_not_each_start_a_thread():
    """100 refused connections (kept open) started 100 lingering threads."""
    import socket

    from edgetalk.runtime import socket_source

    src = socket_source.SocketSource("127.0.0.1", 0, log=lambda m: None)
    try:
        first, hello = _hello(src.address)
        assert hello.startswith("OK")
        before = threading.active_count()
        peak, others = before, []
        for _ in range(60):
            others.append(socket.create_connection(src.address, timeout=5))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:  # the server accepts them meanwhile
            peak = max(peak, threading.active_count())
            time.sleep(0.01)
        cap = socket_source.MAX_LINGER_THREADS
        assert peak <= before + cap + 1, f"{peak - before} threads for 60 refused connections"
        for c in others:
            c.close()
        first.close()
    finally:
        src.close()


def test_concurrent_sessions_on_one_backend_get_their_own_frames():
    """Two Sessions (two users, two photos) sharing one CudaBackend, as `serve` shares its
    backend: each must get exactly the frames it gets alone."""
    from edgetalk.runtime.session import Session
    from edgetalk.runtime_cuda.backend_cuda import CudaBackend

    from .conftest import speechlike

    be = CudaBackend(seeded_model(MICRO), precision="fp32", device="cpu")
    photos = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8) for i in (1, 2)]
    speech = [speechlike(1.2, seed=i) for i in (3, 4)]

    def render(i: int) -> np.ndarray:
        s = Session(avatar=photos[i], backend=be, face_check=False, realtime=False, seed=i)
        for k in range(0, speech[i].shape[0], 640):
            s.push_audio(speech[i][k : k + 640])
        s.close()
        return np.stack([f.rgb for f in s.frames()])

    alone = [render(0), render(1)]
    together: list = [None, None]

    def run(i: int) -> None:
        together[i] = render(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in (0, 1):
        np.testing.assert_array_equal(together[i], alone[i])
