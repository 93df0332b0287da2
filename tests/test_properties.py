"""Property-based tests (hypothesis) of every path that reads untrusted bytes: audio files, the
resampler, PCM on stdin, the socket wire format, avatar images and bundle manifests.

The outcome must always be a valid result or EdgeTalk's own clear error. The same oracles drive the
coverage-guided fuzz run outside CI (`python -m edgetalk.tests.fuzz.run_atheris`).
"""

from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgetalk.errors import BundleError, InputError
from edgetalk.models.config import SAMPLE_RATE
from edgetalk.runtime.audio_io import StreamResampler
from edgetalk.runtime.bundle import open_bundle
from edgetalk.runtime.socket_source import (
    CTRL_AUTH,
    CTRL_END,
    CTRL_INTERRUPT,
    MAX_FRAME_BYTES,
    FrameReader,
    ProtocolError,
)

from .fuzz import targets

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
cuts = st.lists(st.integers(0, 4096), max_size=12)


# ---- socket wire format ---------------------------------------------------------------------------
audio_msg = st.binary(min_size=1, max_size=40).map(lambda b: b if len(b) % 2 == 0 else b + b"\0")
message = st.one_of(
    audio_msg.map(lambda b: ("audio", b)),
    st.just(("interrupt",)),
)


def encode(msgs, token: bytes | None = None, end: bool = False) -> bytes:
    out = b""
    if token is not None:
        out += struct.pack(">IB", CTRL_AUTH, len(token)) + token
    for m in msgs:
        if m[0] == "audio":
            out += struct.pack(">I", len(m[1])) + m[1]
        else:
            out += struct.pack(">I", CTRL_INTERRUPT)
    return out + (struct.pack(">I", CTRL_END) if end else b"")


@FAST
@given(st.lists(message, max_size=8), cuts, st.booleans(), st.binary(min_size=1, max_size=8))
def test_valid_streams_round_trip_however_cut(msgs, cut, end, token):
    data = encode(msgs, token, end) + (b"trailing bytes after END" if end else b"")
    got, err = targets.parse_stream(data, cut, token=token)
    assert err is None
    assert got == list(msgs) + ([("end",)] if end else [])


@FAST
@given(st.binary(max_size=512), cuts)
@example(bytes.fromhex("ffffffff23000000000028"), [])  # atheris: an interrupt, then a bad prefix
def test_any_bytes_parse_the_same_however_cut(data, cut):
    targets.check_socket_bytes(data, cut)


@FAST
@given(st.integers(0, 2**32 - 1))
def test_every_length_prefix_is_accepted_or_refused_at_once(n):
    """A giant prefix is refused from its 4 bytes alone: nothing is allocated for it."""
    reader = FrameReader()
    try:
        reader.feed(struct.pack(">I", n))
    except ProtocolError as e:
        assert "bad length prefix" in str(e)
        assert n == 0 or n % 2 or n > MAX_FRAME_BYTES
        assert n not in (CTRL_END, CTRL_INTERRUPT, CTRL_AUTH)
    else:
        assert reader.buffered == 0


def test_token_is_required_and_checked():
    with pytest.raises(ProtocolError, match="needs a token"):
        FrameReader(b"secret").feed(encode([("audio", b"ab")]))
    with pytest.raises(ProtocolError, match="bad token"):
        FrameReader(b"secret").feed(encode([], token=b"guess"))
    assert FrameReader(b"secret").feed(encode([("audio", b"ab")], token=b"secret")) == [
        ("audio", b"ab")
    ]


# ---- PCM on stdin ---------------------------------------------------------------------------------
@FAST
@given(st.binary(max_size=600), st.lists(st.integers(1, 97), max_size=6), st.sampled_from([1, 2]))
def test_pcm_stdin_reads_whole_samples_however_the_pipe_splits(data, sizes, channels):
    targets.check_pcm_stdin(data, sizes, channels)


# ---- resampler ------------------------------------------------------------------------------------
@FAST
@given(
    st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000, 96000]),
    st.lists(st.integers(0, 3000), min_size=1, max_size=8),
    st.sampled_from([1, 2]),
    st.floats(0.0, 4.0),
)
def test_stream_resampler_length_and_range(rate, pieces, channels, gain):
    rng = np.random.default_rng(len(pieces))
    rs = StreamResampler(rate)
    out = []
    for n in pieces:
        x = rng.standard_normal((n, channels)).astype(np.float32) * gain
        x[::97] = np.nan  # broken samples are silenced, never passed on
        out.append(rs(x))
    out.append(rs.flush())
    y = np.concatenate(out)
    want = sum(pieces) * SAMPLE_RATE / rate
    assert abs(y.size - want) <= 2, (y.size, want)
    assert y.dtype == np.float32 and np.isfinite(y).all() and np.abs(y).max(initial=0) <= 1.0


@pytest.mark.parametrize("rate", [0, -1, 100, 10_000_000])
def test_implausible_sample_rates_are_refused(rate):
    with pytest.raises(InputError, match="sample rate"):
        StreamResampler(rate)


# ---- audio files ----------------------------------------------------------------------------------
def _wav(rate: int, channels: int, n: int, subtype: str) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    x = np.random.default_rng(n).uniform(-1, 1, (n, channels)).astype(np.float32)
    sf.write(buf, x, rate, subtype=subtype, format="WAV")
    return buf.getvalue()


@FAST
@given(
    st.sampled_from([8000, 16000, 44100, 48000]),
    st.integers(1, 6),
    st.integers(1, 4000),
    st.sampled_from(["PCM_16", "PCM_24", "FLOAT", "PCM_U8"]),
    st.floats(0.0, 1.0),
    st.binary(max_size=16),
)
def test_wav_reader_truncated_or_damaged(rate, channels, n, subtype, keep, junk):
    data = _wav(rate, channels, n, subtype)
    targets.check_audio_file(data[: max(1, int(len(data) * keep))] + junk)


@FAST
@given(st.binary(max_size=2048), st.sampled_from([".wav", ".mp3", ".flac", ".ogg", ""]))
def test_audio_reader_on_arbitrary_bytes(data, suffix):
    targets.check_audio_file(b"RIFF" + data if len(data) % 3 == 0 else data, suffix)


def test_fuzz_findings_stay_fixed(good_bundle):
    """Inputs atheris found (each failed before its fix)."""
    # 3 frames of 44.1 kHz stereo resample to no samples at all: a clear error, not empty audio.
    wav = bytes.fromhex(
        "52494646241a000057415645666d74201000000001000200"
        "44ac000010b1020004001000646174610001000056456"
        "66d0074"
    )
    targets.check_audio_file(wav)
    # A WAV header claiming AMR-NB at 1.6 GHz: PyAV's resampler took 12 s to build its filter.
    slow = bytes.fromhex(
        "52494646a400000057415645666d74201000000038000100803e005d000000000200100064617461"
        "8000000000000057415645666d00000000000057415645666d74202c00000074202c000000000000"
        "00000000"
    )
    t0 = time.monotonic()
    targets.check_audio_file(slow)
    assert time.monotonic() - t0 < 2.0
    # A manifest that lists no file for one module: refused when opened, not when first run.
    root, manifest = good_bundle
    files = {k: v for k, v in manifest["files"].items() if k != "decoder"}
    (root / "manifest.json").write_text(json.dumps(dict(manifest, files=files)))
    with pytest.raises(BundleError, match="no file for decoder"):
        open_bundle(root)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_audio_length_cap_is_checked_from_the_header(tmp_path):
    from edgetalk.runtime.audio_io import read_audio

    p = tmp_path / "long.wav"
    p.write_bytes(_wav(8000, 1, 8000 * 3, "PCM_16"))
    with pytest.raises(InputError, match="longer than the 2 s limit"):
        read_audio(p, max_seconds=2)


# ---- avatar images --------------------------------------------------------------------------------
def _image(mode: str, w: int, h: int, fmt: str) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(w * h)
    bands = len(Image.new(mode, (1, 1)).getbands())
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        arr = rng.integers(0, 255, (h, w, bands), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if bands == 1 else arr, "L" if bands == 1 else None)
        img = img.convert(mode) if img.mode != mode else img
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


IMAGE_KINDS = [
    ("RGB", "PNG"),
    ("RGBA", "PNG"),
    ("L", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("I;16", "PNG"),
    ("RGB", "JPEG"),
    ("L", "JPEG"),
    ("CMYK", "JPEG"),
    ("RGB", "WEBP"),
    ("RGB", "BMP"),
]


@pytest.mark.parametrize("mode,fmt", IMAGE_KINDS)
def test_every_image_kind_loads_as_rgb(mode, fmt, tmp_path):
    from edgetalk.runtime.avatar import load_image

    p = tmp_path / f"a.{fmt.lower()}"
    p.write_bytes(_image(mode, 40, 24, fmt))
    rgb = load_image(p)
    assert rgb.shape == (24, 40, 3) and rgb.dtype == np.uint8


@FAST
@given(st.sampled_from(IMAGE_KINDS), st.integers(8, 64), st.integers(8, 64), st.floats(0, 1))
def test_truncated_images_load_or_fail_clearly(kind, w, h, keep):
    data = _image(kind[0], w, h, kind[1])
    targets.check_image_file(data[: int(len(data) * keep)], "." + kind[1].lower())


@FAST
@given(st.binary(max_size=1024), st.sampled_from([".png", ".jpg", ".webp", ""]))
def test_image_loader_on_arbitrary_bytes(data, suffix):
    targets.check_image_file(data, suffix)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_huge_dimensions_are_refused_before_decoding(fmt, tmp_path, monkeypatch):
    """A header that claims 60000x60000 pixels: refused from the header, nothing allocated."""
    import zlib

    from edgetalk.runtime.avatar import load_image

    p = tmp_path / f"bomb.{fmt}"
    if fmt == "png":
        ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)

        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

        idat = zlib.compress(b"\0" * 1000)
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))
    else:
        data = bytearray(_image("RGB", 64, 64, "JPEG"))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
        p.write_bytes(bytes(data))
    with pytest.raises(InputError, match="pixel limit"):
        load_image(p)


def test_a_real_decompression_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    """A valid 8000x8000 PNG of zeros (0.2 MB on disk, 192 MB decoded) over a lowered cap, with
    and without the Pillow header check (then PyAV's stream header, or FFmpeg's max_pixels)."""
    import zlib

    from edgetalk.runtime import avatar

    w = h = 8000
    raw = zlib.compress(b"\0" * ((3 * w + 1) * h), 9)

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    p = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    )
    monkeypatch.setattr(avatar, "MAX_IMAGE_PIXELS", 10_000_000)
    with pytest.raises(InputError, match="8000x8000, over the 10,000,000-pixel limit"):
        avatar.load_image(p)
    monkeypatch.setattr(avatar, "_header_size", lambda p: (0, 0))  # a format Pillow cannot read
    with pytest.raises(InputError, match="pixel limit|cannot read"):
        avatar.load_image(p)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_an_image_just_under_the_pixel_cap_decodes(monkeypatch, fmt):
    """FFmpeg checks its frame buffer, whose width it pads to its SIMD stride: with the cap
    passed as is, a 50 MP phone photo (8160x6120) under the 50 MP cap was refused as "damaged".
    Here the same at a lowered cap: 1000 px is not a multiple of 64, and 1000x990 is 1% under."""
    from edgetalk.runtime import avatar

    monkeypatch.setattr(avatar, "MAX_IMAGE_PIXELS", 1000 * 990)
    data = _image("RGB", 1000, 990, fmt)
    assert avatar.decode_image(data, "photo").shape == (990, 1000, 3)
    with pytest.raises(InputError, match="1000x991, over the 990,000-pixel limit"):
        avatar.decode_image(_image("RGB", 1000, 991, fmt), "photo")


def test_an_animated_webp_is_refused_by_name_not_as_damaged():
    from PIL import Image

    from edgetalk.runtime.avatar import decode_image

    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="sticker.webp is an animated WebP; use a still photo"):
        decode_image(buf.getvalue(), "sticker.webp")
    still = io.BytesIO()
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(still, "WEBP")  # VP8X (alpha), still
    assert still.getvalue()[12:16] == b"VP8X"
    assert decode_image(still.getvalue(), "still.webp").shape == (64, 64, 3)


def test_ffmpeg_is_allowed_the_announced_image_padded_and_no_more():
    from edgetalk.runtime.avatar import FFMPEG_PAD, ffmpeg_pixel_cap

    assert ffmpeg_pixel_cap(8160, 6120, 50_000_000) == (8160 + FFMPEG_PAD) * (6120 + FFMPEG_PAD)
    assert ffmpeg_pixel_cap(0, 0, 50_000_000) == 50_000_000  # size unknown: the plain cap
    assert ffmpeg_pixel_cap(16, 16, 50_000_000) < 50_000  # a tiny announced image stays tiny


# ---- bundle manifests -----------------------------------------------------------------------------
def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle") / "b"
    manifest = targets.fake_bundle(root)
    open_bundle(root)  # the baseline is accepted
    return root, manifest


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutated_manifests_open_or_are_refused_clearly(good_bundle, data):
    root, manifest = good_bundle
    paths = [p for p in _paths(manifest) if p]
    path = data.draw(st.sampled_from(paths))
    m = json.loads(json.dumps(manifest))
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    targets.check_manifest(json.dumps(m).encode(), root)


@FAST
@given(st.binary(max_size=300))
def test_manifest_bytes_that_are_not_a_manifest(good_bundle, data):
    targets.check_manifest(data, good_bundle[0])


def test_manifest_refusals_name_the_problem(good_bundle):
    root, manifest = good_bundle
    cases = [
        (dict(manifest, schema_version=3), "schema version 3"),
        (dict(manifest, schema_version=1), "schema version 1 .*re-export"),  # before dec_*
        ({k: v for k, v in manifest.items() if k != "files"}, "missing or has a malformed field"),
        (dict(manifest, files={**manifest["files"], "decoder": "../x.onnx"}), "outside the bundle"),
        (dict(manifest, parity={"decoder": {"status": "fail"}}), "parity failed for decoder"),
    ]
    # A tensor dimension that is not a JSON integer (found by the fuzzer: inf overflowed int()).
    for bad in (float("inf"), 2.5, True, -1, "4"):
        m = json.loads(json.dumps(manifest))
        m["modules"]["appearance"]["io"]["outputs"][0]["shape"][0] = bad
        cases.append((m, "malformed field .*dimension"))
    # the recorded FLOPs per call that size a module's thread pool: a count, or absent
    for bad in (-1.0, True, "3e7", [1]):
        m = json.loads(json.dumps(manifest))
        m["modules"]["audio"].setdefault("info", {})["flops_per_call"] = bad
        cases.append((m, "malformed field .*flops_per_call"))
    for m, words in cases:
        (root / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=words):
            open_bundle(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
