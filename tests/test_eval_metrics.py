"""The eval measurements themselves: known inputs give known figures."""

from __future__ import annotations

import numpy as np
import pytest

from edgetalk.training import metrics

from .conftest import need, skip_or_fail


def test_av_offset_finds_a_known_shift():
    rng = np.random.default_rng(0)
    ref = np.convolve(rng.random(300), np.ones(5) / 5, mode="same")
    late = np.concatenate([np.full(2, ref[0]), ref[:-2]])  # video two frames late
    lag, peak = metrics.av_offset(late, ref)
    assert lag == 2 and peak > 0.99
    assert metrics.av_offset(ref, ref)[0] == 0
    assert metrics.pearson(ref, ref) == pytest.approx(1.0)


def test_bilabial_closure_counts_runs():
    opening = np.array([0.1, 0.0, 0.1, 0.1, 0.08, 0.1, 0.1, 0.01, 0.1])
    bil = np.array([0, 1, 1, 0, 1, 1, 0, 1, 0], bool)  # three closures, two shown closed
    assert metrics.bilabial_closure(opening, bil, 0.03) == pytest.approx(2 / 3)
    assert np.isnan(metrics.bilabial_closure(opening, np.zeros(9, bool), 0.03))
    lost = opening.copy()
    lost[7] = np.nan  # no face found in the last closure: it is not measured, not a miss
    assert metrics.bilabial_counts(lost, bil, 0.03) == (1, 2)


def test_closures_are_counted_per_face():
    from edgetalk.training.evaluate import closures_by_identity

    shut, wide = np.array([0.1, 0.0, 0.1]), np.array([0.1, 0.08, 0.1])
    bil = np.array([0, 1, 0], bool)
    acc = {"who": ["a", "b", "a"], "open": [shut, wide, wide], "bil": [bil, bil, bil]}
    assert closures_by_identity(acc) == {"a": [1, 2], "b": [0, 1]}


def test_drift_and_monotonic_trend():
    t = 300
    height = np.full(t, 100.0)
    center = np.zeros((t, 2))
    center[:, 0] = np.linspace(0, 10, t)  # 0.1 face heights to the right over the stream
    center[:, 1] = np.sin(np.arange(t) / 7.0) * 3  # wobble, no trend
    track = metrics.FaceTrack(np.zeros(t), center, height, np.zeros((t, 478, 2)))
    d = metrics.drift(track, fps=1.0)
    assert d["x_total_drift"] == pytest.approx(0.1, abs=1e-6)
    assert d["x_spearman"] == pytest.approx(1.0)
    assert abs(d["y_spearman"]) < 0.3
    assert d["scale_total_drift"] == pytest.approx(0.0, abs=1e-9)


def test_psnr_and_landmark_motion():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    assert metrics.psnr(a, a) == float("inf")
    assert metrics.psnr(a, a + 1) == pytest.approx(48.13, abs=0.01)
    lm = np.zeros((10, 478, 2))
    lm[::2] += 1.0
    track = metrics.FaceTrack(np.zeros(10), np.zeros((10, 2)), np.full(10, 2.0), lm)
    still = metrics.FaceTrack(np.zeros(10), np.zeros((10, 2)), np.full(10, 2.0), np.zeros_like(lm))
    mask = np.ones(10, bool)
    assert metrics.landmark_motion(track, mask) > metrics.landmark_motion(still, mask) == 0.0


def test_mouth_opening_measured_from_pixels():
    """mediapipe on rendered frames: an open jaw measures wider than the closed photo."""
    need("mediapipe", "mediapipe 0.10.21 is not installed")
    from edgetalk.models.motion import INDEX
    from edgetalk.training import render as renderer
    from edgetalk.training.faces import load_identities
    from edgetalk.training.synth import reference

    ref = reference(load_identities("train")[0], 256)
    closed = np.zeros(16, np.float32)
    closed[INDEX["lip_press"]] = 1.0
    opened = np.zeros(16, np.float32)
    opened[INDEX["jaw_open"]] = 1.0
    frames = [renderer.render(ref, m)[0] for m in (closed, opened)]
    track = metrics.FaceMeasurer(video_mode=False).track(frames)
    assert track.opening[0] < 0.03 < track.opening[1]


def test_eval_command_end_to_end(tmp_path, capsys):
    """`edgetalk eval` on a minimal protocol prints the table and writes the JSON report."""
    import json
    import shutil

    need("mediapipe", "mediapipe 0.10.21 is not installed")
    if shutil.which("espeak-ng") is None:
        skip_or_fail("espeak-ng is not installed")
    from edgetalk.cli import main

    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--clips",
            "1",
            "--seconds",
            "2",
            "--listen-clips",
            "1",
            "--long-minutes",
            "0.1",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "| lip-sync corr (pixels vs phonemes) |" in text
    report = json.loads(out.read_text())
    assert report["lip_sync"]["gt"]["lip_sync_corr"] > 0.5  # the measurement sees real lips
    # The shipped weights are trained: their lip sync beats a loudness-driven jaw by a margin.
    model = report["lip_sync"]["model"]["lip_sync_corr"]
    baseline = report["lip_sync"]["baseline"]["lip_sync_corr"]
    print(f"\nlip sync: model {model:.3f}, loudness baseline {baseline:.3f}")
    assert model >= baseline + 0.15, (model, baseline)
    assert set(report["lip_sync"]) == {"gt", "model", "decoder", "baseline"}
    assert "| bilabial closures closed, per face |" in text
    per_face = report["lip_sync"]["model"]["bilabial_by_identity"]
    assert list(per_face) == [report["identities"][0]]  # one clip: the first held-out face
    assert "identity_ratio" in report["long_stream"]["model"]


def test_whole_video_metrics_work_in_blocks_and_equal_the_plain_formulas(monkeypatch):
    """psnr and the judder's frame differences step through a video a few frames at a time
    (a float copy of a whole clip cost seconds and gigabytes a call); blocks that split the video
    anywhere give the plain formulas' values, for 8-bit and float frames."""
    from edgetalk.training import judder

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    plain_mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    plain_diffs = np.abs(np.diff(a.astype(np.float64).reshape(9, -1), axis=0)).mean(axis=1)
    for block in (1 << 22, 500, 192, 7):  # one block, several, a frame split across blocks
        monkeypatch.setattr(metrics, "BLOCK", block)
        monkeypatch.setattr(judder, "BLOCK", block)
        assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(255.0**2 / plain_mse), rel=1e-12)
        np.testing.assert_allclose(judder.frame_diffs(a), plain_diffs, rtol=1e-12)
        f = a.astype(np.float32)
        np.testing.assert_allclose(judder.frame_diffs(f), plain_diffs, rtol=1e-6)
        assert metrics.psnr(f, b.astype(np.float32)) == pytest.approx(metrics.psnr(a, b))
    with pytest.raises(ValueError, match="psnr of"):
        metrics.psnr(a, b[:3])
