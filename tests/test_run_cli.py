"""`edgetalk run` end to end, and every bad input giving a clear error instead of a traceback."""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest
import soundfile as sf

from edgetalk.cli import main

from .conftest import need, speechlike


def run_cli(args, capsys):
    code = main(["run", *map(str, args)])
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.out, out.err


def probe(path):
    with av.open(str(path)) as c:
        v, a = c.streams.video, c.streams.audio
        assert len(v) == 1 and len(a) == 1
        frames = sum(1 for _ in c.decode(v[0]))
        return v[0], a[0], frames


def test_run_writes_synced_mp4(tmp_path, wav_file, capsys):
    wav = wav_file(seconds=1.3)
    out = tmp_path / "o.mp4"
    code, stdout, _ = run_cli(["--audio", wav, "--out", out], capsys)
    assert code == 0, stdout
    v, a, frames = probe(out)
    assert v.average_rate == 25
    assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
    assert (v.width, v.height) == (256, 256)
    audio_frames = 1.3 * 25
    assert abs(frames - audio_frames) <= 1  # video length matches audio within one frame
    assert abs(float(v.duration * v.time_base) - 1.3) <= 0.04 + 1e-6


def test_run_same_seed_same_video(tmp_path, wav_file, capsys):
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.runtime.backend_torch import TorchBackend
    from edgetalk.runtime.scheduler import StreamScheduler

    backend = TorchBackend.from_checkpoint()
    avatar = prepare_avatar(None, 256)
    pcm = speechlike(0.8)

    def render(seed):
        s = StreamScheduler(backend, avatar, seed=seed)
        return np.stack([f.rgb for f in s.push_audio(pcm) + s.flush()])

    a, b = render(3), render(3)
    assert np.array_equal(a, b) and a.shape[0] == 20


def test_44k_stereo_is_resampled_and_downmixed(tmp_path, wav_file, capsys):
    wav = wav_file(seconds=1.0, rate=44100, channels=2)
    out = tmp_path / "o.mp4"
    code, stdout, _ = run_cli(["--audio", wav, "--out", out], capsys)
    assert code == 0
    assert "resampled 44100 Hz to 16000 Hz" in stdout and "downmixed 2 channels" in stdout
    _, _, frames = probe(out)
    assert abs(frames - 25) <= 1


def test_dyadic_run(tmp_path, wav_file, capsys):
    own, partner = wav_file(seconds=1.0, name="a.wav"), wav_file(seconds=0.6, name="b.wav", seed=1)
    out = tmp_path / "o.mp4"
    code, _, _ = run_cli(["--audio", own, "--partner-audio", partner, "--out", out], capsys)
    assert code == 0 and probe(out)[2] == 25


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing", "audio file not found"),
        ("corrupt", "cannot read"),
        ("empty", "has no samples"),
        ("avatar_missing", "avatar image not found"),
        ("avatar_not_image", "cannot read"),
        ("avatar_no_face", "no face found"),
        ("bad_checkpoint", "not a safetensors checkpoint"),
        ("bad_out_dir", "output folder does not exist"),
        ("out_is_the_audio", "is also an input"),
        ("out_is_the_photo", "is also an input"),
        ("out_not_mp4", "the output is an mp4 video; name it o.mp4"),
    ],
)
def test_bad_input_clear_error(tmp_path, wav_file, capsys, case, expect):
    wav = wav_file(seconds=0.5)
    args = ["--audio", wav, "--out", tmp_path / "o.mp4"]
    if case == "missing":
        args[1] = tmp_path / "nope.wav"
    elif case == "corrupt":
        bad = tmp_path / "bad.wav"
        bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 3)
        args[1] = bad
    elif case == "empty":
        empty = tmp_path / "empty.wav"
        sf.write(empty, np.zeros(0, np.float32), 16000)
        args[1] = empty
    elif case == "avatar_missing":
        args += ["--avatar", tmp_path / "nope.png"]
    elif case == "avatar_not_image":
        txt = tmp_path / "face.png"
        txt.write_text("this is not an image\n" * 20)
        args += ["--avatar", txt]
    elif case == "avatar_no_face":
        flat = tmp_path / "flat.png"
        _write_png(flat, np.full((200, 300, 3), 128, np.uint8))
        args += ["--avatar", flat]
    elif case == "bad_checkpoint":
        ck = tmp_path / "model.safetensors"
        ck.write_bytes(b"\x80\x04\x95garbage pickle-ish bytes")
        args += ["--checkpoint", ck]
    elif case == "bad_out_dir":
        args[3] = tmp_path / "no" / "such" / "dir" / "o.mp4"
    elif case == "out_is_the_audio":
        args[3] = wav
    elif case == "out_is_the_photo":
        photo = tmp_path / "me.mov"  # a name the output could have
        _write_png(photo, np.full((64, 64, 3), 128, np.uint8))
        args += ["--avatar", photo]
        args[3] = photo
    elif case == "out_not_mp4":
        args[3] = tmp_path / "o.wav"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert expect in err, err
    assert err.startswith("edgetalk run: error:")
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # a refused run touches no file, inputs least of all


@pytest.mark.parametrize("stop", [KeyboardInterrupt, MemoryError])
def test_a_run_that_stops_keeps_the_previous_video(tmp_path, wav_file, capsys, monkeypatch, stop):
    """The mp4 is written under a temporary name and moved into place only when complete."""
    from edgetalk.runtime.scheduler import StreamScheduler

    wav = wav_file(seconds=1.0)
    out = tmp_path / "o.mp4"
    out.write_bytes(b"yesterday's video")
    calls = []
    real = StreamScheduler.push_audio

    def push(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise stop()
        return real(self, *a, **k)

    monkeypatch.setattr(StreamScheduler, "push_audio", push)
    if stop is KeyboardInterrupt:
        assert main(["run", "--audio", str(wav), "--out", str(out), "--piece-ms", "100"]) == 130
    else:
        with pytest.raises(MemoryError):
            main(["run", "--audio", str(wav), "--out", str(out), "--piece-ms", "100"])
    capsys.readouterr()
    assert out.read_bytes() == b"yesterday's video"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o.mp4", wav.name])


def test_no_face_check_accepts_centre_crop(tmp_path, wav_file, capsys):
    flat = tmp_path / "flat.png"
    _write_png(flat, np.full((120, 200, 3), 90, np.uint8))
    out = tmp_path / "o.mp4"
    code, _, _ = run_cli(
        ["--audio", wav_file(0.4), "--avatar", flat, "--no-face-check", "--out", out], capsys
    )
    assert code == 0 and out.exists()


def test_user_photo_with_face(tmp_path, wav_file, capsys):
    skimage = need("skimage.data", "scikit-image gives a real face photo")
    photo = tmp_path / "astronaut.png"
    _write_png(photo, skimage.astronaut())
    out = tmp_path / "o.mp4"
    code, _, _ = run_cli(["--audio", wav_file(0.4), "--avatar", photo, "--out", out], capsys)
    assert code == 0


def test_console_entry_point(tmp_path, wav_file):
    out = tmp_path / "o.mp4"
    r = subprocess.run(
        [sys.executable, "-m", "edgetalk", "run", "--audio", str(wav_file(0.4)), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert out.exists()


def _write_png(path, rgb):
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_samples_that_are_not_numbers_become_silence_with_a_note(tmp_path, capsys):
    """A float wav with a NaN is damaged, not unreadable: it is said, and the NaN does not spread
    through the resampler's filter into the speech around it."""
    from edgetalk.runtime.audio_io import to_mono_16k

    t = np.arange(48000) / 48000.0
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    x[24000] = np.nan
    notes: list[str] = []
    got = to_mono_16k(x, 48000, notes)
    clean = x.copy()
    clean[24000] = 0.0
    assert np.allclose(got, to_mono_16k(clean, 48000), atol=1e-6)
    assert "1 samples were not numbers (NaN or Inf): replaced by silence" in notes
    wav = tmp_path / "nan.wav"
    sf.write(wav, x, 48000, subtype="FLOAT")
    code, stdout, _ = run_cli(["--audio", wav, "--out", tmp_path / "o.mp4"], capsys)
    assert code == 0 and "note: audio: 1 samples were not numbers" in stdout


def test_a_read_only_output_is_not_replaced(tmp_path, wav_file, capsys, monkeypatch):
    """The mp4 is moved into place, which a read-only file would not stop: so it is asked.
    (os.access is stubbed: as root, as on CI, every file is writable.)"""
    import os

    from edgetalk.runtime import sinks

    out = tmp_path / "o.mp4"
    out.write_bytes(b"keep me")
    real = os.access
    monkeypatch.setattr(
        sinks.os, "access", lambda p, mode: False if str(p) == str(out) else real(p, mode)
    )
    code, _, err = run_cli(["--audio", wav_file(seconds=0.5), "--out", out], capsys)
    assert code == 2 and "is read-only" in err and out.read_bytes() == b"keep me"


def test_overlap_on_spare_cores_writes_the_same_file(tmp_path, wav_file, capsys, monkeypatch):
    """With twice --threads cores, each chunk's decoder runs beside the next chunk's generator
    (scheduler overlap): the same bytes, said in the summary; --no-overlap keeps to --threads."""
    from edgetalk.runtime import threads

    wav = wav_file(seconds=1.3)
    monkeypatch.setattr(threads, "cpu_count", lambda: 2)
    files = {}
    for flags in ([], ["--no-overlap"]):
        out = tmp_path / f"o{len(flags)}.mp4"
        code, stdout, _ = run_cli(["--audio", wav, "--out", out, "--threads", 1, *flags], capsys)
        assert code == 0
        assert ("decoder overlapped on spare cores" in stdout) == (not flags)
        files[len(flags)] = out.read_bytes()
    assert files[0] == files[1]
    monkeypatch.setattr(threads, "cpu_count", lambda: 3)  # 2 threads need 4 cores
    code, stdout, _ = run_cli(["--audio", wav, "--out", tmp_path / "x.mp4", "--threads", 2], capsys)
    assert code == 0 and "overlapped" not in stdout
