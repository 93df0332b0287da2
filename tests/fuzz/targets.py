"""One-input oracles shared by the hypothesis property tests and the atheris fuzz run.

Each `check_*` takes untrusted bytes, runs one input path of EdgeTalk on them, and raises
AssertionError when the outcome is anything but a valid result or EdgeTalk's own clear error
(an `EdgeTalkError` subclass). Hangs are caught by the callers' time limits; memory by the
bounded buffers these checks also assert on.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from edgetalk.errors import BundleError, InputError
from edgetalk.models.config import SAMPLE_RATE
from edgetalk.runtime.socket_source import MAX_FRAME_BYTES, FrameReader, ProtocolError
from edgetalk.runtime.sources import PcmStdinSource

_TMP = Path(tempfile.mkdtemp(prefix="edgetalk-fuzz-"))


def _file(data: bytes, suffix: str) -> Path:
    p = _TMP / f"input-{os.getpid()}{suffix}"
    p.write_bytes(data)
    return p


def check_audio_file(data: bytes, suffix: str = ".wav") -> None:
    """`read_audio` on any bytes: mono float32 16 kHz in [-1, 1], or InputError."""
    from edgetalk.runtime.audio_io import read_audio

    try:
        audio = read_audio(_file(data, suffix), max_seconds=60)
    except InputError:
        return
    pcm = audio.pcm
    assert pcm.dtype == np.float32 and pcm.ndim == 1 and pcm.size > 0
    assert np.isfinite(pcm).all() and np.abs(pcm).max() <= 1.0
    assert pcm.size <= 61 * SAMPLE_RATE  # the cap held


def check_image_file(data: bytes, suffix: str = ".png") -> None:
    """`load_image` on any bytes: HxWx3 uint8 within the pixel cap, or InputError."""
    from edgetalk.runtime.avatar import MAX_IMAGE_PIXELS, load_image

    try:
        rgb = load_image(_file(data, suffix))
    except InputError:
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert min(rgb.shape[:2]) >= 16 and rgb.shape[0] * rgb.shape[1] <= MAX_IMAGE_PIXELS


def parse_stream(data: bytes, cuts: list[int], token: bytes | None = None):
    """Feed `data` to a FrameReader cut at `cuts`: (messages, error text or None). Asserts the
    reader never buffers more than one message."""
    reader = FrameReader(token)
    msgs: list[tuple] = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            msgs += reader.feed(data[a:b])
            assert reader.buffered <= MAX_FRAME_BYTES + 4
    except ProtocolError as e:
        return msgs + list(e.messages), str(e)
    return msgs, None


def check_socket_bytes(data: bytes, cuts: list[int]) -> None:
    """Any byte stream, cut anywhere: the same messages and the same error as in one piece."""
    whole = parse_stream(data, [])
    assert parse_stream(data, cuts) == whole
    assert parse_stream(data, list(range(len(data)))) == whole  # one byte at a time
    for m in whole[0]:
        assert m[0] in ("audio", "interrupt", "end")
        if m[0] == "audio":
            assert 2 <= len(m[1]) <= MAX_FRAME_BYTES and len(m[1]) % 2 == 0


class _Pipe(io.RawIOBase):
    """A pipe that returns the data in the given read sizes."""

    def __init__(self, data: bytes, sizes: list[int]):
        self.data, self.pos, self.sizes = data, 0, sizes or [len(data) or 1]
        self.i = 0

    def read1(self, n: int) -> bytes:
        k = min(n, max(1, self.sizes[self.i % len(self.sizes)]), len(self.data) - self.pos)
        self.i += 1
        self.pos += k
        return self.data[self.pos - k : self.pos]


def check_pcm_stdin(data: bytes, sizes: list[int], channels: int = 1) -> None:
    """PCM on a pipe read in any sizes: exactly the whole samples, in order."""
    src = PcmStdinSource(_Pipe(data, sizes), channels=channels)
    pieces = list(src)
    got = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    frame = 2 * channels
    whole = data[: len(data) - len(data) % frame]
    want = np.frombuffer(whole, "<i2").astype(np.float32) / 32768.0
    if channels > 1:
        want = want.reshape(-1, channels).mean(axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert bool(src.notes) == (len(data) % frame != 0)


def check_manifest(text: bytes, bundle: Path) -> None:
    """Any manifest.json bytes in an otherwise good bundle: a Bundle, or BundleError."""
    from edgetalk.runtime.bundle import open_bundle

    (bundle / "manifest.json").write_bytes(text)
    try:
        b = open_bundle(bundle)
    except BundleError:
        return
    assert b.cfg.chunk >= 1 and set(b.files) >= set(b.io)


def fake_bundle(root: Path) -> dict:
    """A bundle directory that `open_bundle` accepts (dummy module files, true hashes): the
    manifest parser's input space is the manifest, not the graphs. Returns the manifest."""
    from edgetalk.models.config import preset
    from edgetalk.models.edgetalk import MODULES
    from edgetalk.models.io_spec import module_io
    from edgetalk.runtime.bundle import SCHEMA_VERSION, tree_sha256

    cfg = preset("tiny")
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in MODULES:
        (root / f"{name}.onnx").write_bytes(name.encode() * 8)
        files[name] = f"{name}.onnx"
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "target": "onnx",
        "precision": "fp32",
        "config": cfg.to_dict(),
        "streaming": {
            "chunk": cfg.chunk,
            "lookahead_samples": cfg.lookahead_samples,
            "cache_slots": cfg.cache_slots,
        },
        "modules": {n: {"io": io.to_dict()} for n, io in module_io(cfg).items()},
        "parity": {n: {"status": "pass"} for n in MODULES},
        "files": files,
        "sha256": {f: tree_sha256(root / f) for f in files.values()},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest
