"""Scores on real people: motion fitting, the real-clip metrics, and `edgetalk eval --real`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetalk.training import metrics

from .conftest import need, tiny_real_folder

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------- metrics on constructed signals


def _speechlike(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.convolve(rng.random(n + 8), np.ones(5) / 5, mode="valid")[:n]


def test_lagged_corr_finds_the_lag_and_its_sign():
    real = metrics.mouth_signal(_speechlike(250, 0))
    late = np.concatenate([np.full(3, real[0]), real[:-3]])  # generated 3 frames late
    lag, corr = metrics.lagged_corr(late, real)
    assert lag == 3 and corr > 0.95
    early = np.concatenate([real[2:], np.full(2, real[-1])])
    assert metrics.lagged_corr(early, real)[0] == -2
    # Beyond the window the lag cannot be found: the best in-window score is much lower.
    far = np.roll(real, 12)
    assert metrics.lagged_corr(far, real)[1] < 0.5


def test_chance_level_separates_a_related_mouth_from_an_unrelated_one():
    rng = np.random.default_rng(1)
    real = metrics.mouth_signal(_speechlike(300, 2))
    related = metrics.mouth_signal(real + 0.8 * rng.standard_normal(300))
    unrelated = metrics.mouth_signal(_speechlike(300, 3))
    for gen, above in ((related, True), (unrelated, False)):
        corr = metrics.lagged_corr(gen, real)[1]
        chance = metrics.chance_corr(gen, real, min_shift=25)
        assert len(chance) == 300 - 2 * 25 + 1  # every circular shift of at least 1 s
        assert bool(corr > np.percentile(chance, 95)) is above
    # Chance is the best-lag score, so it is positive on average, not zero.
    assert np.mean(metrics.chance_corr(unrelated, real, 25)) > 0.0


def test_range_ratio_and_mouth_signal():
    real = 0.02 + 0.05 * _speechlike(200, 4)
    assert metrics.range_ratio(0.5 * real, real) == pytest.approx(0.5)
    assert metrics.range_ratio(real + 0.3, real) == pytest.approx(1.0)  # offsets do not count
    gappy = real.copy()
    gappy[10:14] = np.nan  # no face for 4 frames: filled, not dropped
    z = metrics.mouth_signal(gappy)
    assert np.isfinite(z).all() and abs(z.mean()) < 1e-9 and z.std() == pytest.approx(1.0)
    assert np.all(metrics.mouth_signal(np.full(20, np.nan)) == 0)
    loud = metrics.loudness_db(np.r_[np.zeros(640), 0.1 * np.ones(640)].astype(np.float32), 2)
    assert loud[0] == pytest.approx(-80) and loud[1] == pytest.approx(-20, abs=0.01)


def test_pause_opening_reads_the_quietest_frames():
    from edgetalk.training.eval_real import pause_opening

    loud = np.r_[np.full(20, -70.0), np.full(80, -20.0)]  # 20% silence, then speech
    stuck_open = np.full(100, 0.08)
    rests = np.r_[np.full(20, 0.005), np.full(80, 0.08)]
    assert pause_opening(stuck_open, loud) == pytest.approx(0.08)
    assert pause_opening(rests, loud) == pytest.approx(0.005)
    rests[:5] = np.nan  # no face there: the rest still counts
    assert pause_opening(rests, loud) == pytest.approx(0.005)
    assert np.isnan(pause_opening(np.full(100, np.nan), loud))


# ---------------------------------------------------------------- fitting the 16 parameters


@pytest.fixture(scope="module")
def rendered():
    """Frames rendered by the synthetic renderer from known motion, on the embedded avatar."""
    need("mediapipe", "fitting needs mediapipe's face mesh")
    from edgetalk.models.motion import INDEX
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.training import faces, render

    photo = prepare_avatar(None, 256)
    ref = render.prepare(photo, faces.face_landmarks(photo), 256)
    motions = np.zeros((5, 16), np.float32)
    motions[1, INDEX["jaw_open"]] = 0.7
    motions[2, [INDEX["jaw_open"], INDEX["head_yaw"]]] = 0.35, 0.12
    motions[3, [INDEX["blink_left"], INDEX["blink_right"], INDEX["head_pitch"]]] = 0.9, 0.9, -0.08
    motions[4, [INDEX["lip_spread"], INDEX["brow_raise"], INDEX["head_roll"]]] = 0.8, 0.8, 0.06
    frames = np.stack([render.render(ref, m)[0] for m in motions])
    return frames, motions


def test_fit_recovers_known_motion_from_rendered_frames(rendered):
    """The whole path on pixels: face mesh on rendered frames, then the fit, with the first
    (unmoved) frame as the reference, as a real clip's first frame is."""
    from edgetalk.models.motion import INDEX
    from edgetalk.training import fit_motion

    frames, truth = rendered
    track = fit_motion.mesh_track(frames, video_mode=False)
    assert np.isfinite(track).all()
    from edgetalk.training import render

    ref = render.prepare(frames[0], track[0], 256)
    got, valid, err = fit_motion.fit_landmarks(ref, track)
    assert valid.all() and np.nanmax(err) < 0.02  # landmark rms under 2% of face height
    jaw, yaw = INDEX["jaw_open"], INDEX["head_yaw"]
    assert abs(got[0]).max() < 0.1  # the reference itself is at rest
    assert got[1, jaw] == pytest.approx(0.7, abs=0.15)
    assert got[2, jaw] == pytest.approx(0.35, abs=0.15)
    assert got[2, yaw] == pytest.approx(0.12, abs=0.06)
    blinks = got[:, [INDEX["blink_left"], INDEX["blink_right"]]]
    # mediapipe sees about half of a rendered blink (its eyelid prior); open eyes stay open.
    assert blinks[3].min() > 0.3 and np.delete(blinks, 3, axis=0).max() < 0.15
    assert got[3, INDEX["head_pitch"]] < -0.03
    assert got[4, INDEX["brow_raise"]] > 0.4
    spread = got[:, INDEX["lip_spread"]]  # under a strong prior (see fit_motion.PRIOR)
    assert spread[4] > 0.2 and spread[4] > 2 * np.delete(spread, 4).max()
    assert got[4, INDEX["head_roll"]] == pytest.approx(0.06, abs=0.03)
    # A closed mouth is fitted closed: the jaw of rest frames stays low.
    assert got[[0, 3], jaw].max() < 0.15


# ---------------------------------------------------------------- end to end


def _tiny_folder(tmp_path: Path) -> Path:
    """A one-clip data folder: 2.4 s of a held-out GRID speaker."""
    return tiny_real_folder(tmp_path, "grid_sbwe5n_tiny", "grid_spkA")


def test_eval_real_end_to_end(tmp_path, capsys):
    need("mediapipe", "eval --real needs mediapipe's face mesh")
    need("dlib", "identity needs dlib")
    from edgetalk.cli import main
    from edgetalk.models.checkpoint import default_checkpoint

    root = _tiny_folder(tmp_path)
    out = tmp_path / "report.json"
    argv = ["eval", "--real", str(root), "--checkpoint", str(default_checkpoint())]
    rc = main(argv + ["--long-minutes", "0.05", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "corr with the real mouth" in text and "judder ratio" in text
    assert "mouth opening in pauses" in text
    r = json.loads(out.read_text())
    (clip,) = r["clips"]
    assert clip["id"] == "grid_sbwe5n_tiny" and clip["frames"] == 60
    for system in ("model", "previous", "loudness", "fitted", "real"):
        s = clip[system]
        assert -1 <= s["corr"] <= 1 and abs(s["lag"]) <= 5 and s["face_found"] > 0.9
        assert 0 <= s["pause_open"] < 0.3
    assert clip["real"]["corr"] == pytest.approx(1.0) and clip["real"]["lag"] == 0
    assert clip["real"]["range_ratio"] == pytest.approx(1.0)
    # The same weights twice give the same video; the photo is the person: dlib agrees.
    assert clip["model"]["corr"] == pytest.approx(clip["previous"]["corr"])
    assert clip["model"]["id_start"] < 0.6
    # Rendering real motion is a mouth that follows the real one, well above a loudness jaw.
    assert clip["fitted"]["corr"] > 0.5
    assert r["long_stream"]["id_end"] < 0.6
    assert np.isfinite(clip["model"]["judder"])


def test_range_ratio_is_summed_up_by_mean_median_and_clips_in_band():
    """One clip far out of the band moves the mean, not the median; the count says so."""
    from edgetalk.training.eval_real import _means, format_real_report

    clips = [
        {"model": {"corr": 0.5, "lag": 0, "above_chance": True, "range_ratio": v}}
        for v in (0.9, 1.1, 1.2, 5.0, 0.5)
    ]
    m = _means(clips)["model"]
    assert m["range_ratio"] == pytest.approx(1.74)
    assert m["range_median"] == pytest.approx(1.1)
    assert m["range_in_band"] == "3/5"
    text = format_real_report({"mean": {"model": m}, "clips": []})
    assert "| clips with a range ratio in 0.7–1.4 | 3/5 | all |" in text
    assert "| mouth range ratio, median of clips | 1.10 |" in text


def test_judder_is_summed_up_by_mean_largest_clip_and_clips_in_band():
    """The judder target holds per clip: one clip stepping at the chunk rate shows in the
    largest clip and the count, not in the mean."""
    from edgetalk.training.eval_real import _means, format_real_report

    clips = [
        {"model": {"corr": 0.5, "lag": 0, "above_chance": True, "judder": v}}
        for v in (0.95, 1.0, 1.05, 1.40)
    ]
    m = _means(clips)["model"]
    assert m["judder"] == pytest.approx(1.1)
    assert m["judder_max"] == pytest.approx(1.40)
    assert m["judder_in_band"] == "3/4"
    text = format_real_report({"mean": {"model": m}, "clips": []})
    assert "| judder ratio, largest clip | 1.40 | ≤ 1.15 |" in text
    assert "| clips with judder ≤ 1.15 | 3/4 | all |" in text


def test_lag_is_also_given_for_the_clips_above_chance():
    """A clip at chance peaks anywhere within +-5 frames; the lag of the clips whose mouth does
    follow the real one is reported beside the largest of all."""
    from edgetalk.training.eval_real import _means, format_real_report

    clips = [
        {"model": {"corr": c, "lag": lag, "above_chance": sure}}
        for c, lag, sure in ((0.6, 1, True), (0.5, -2, True), (0.0, 5, False))
    ]
    m = _means(clips)["model"]
    assert m["max_abs_lag"] == 5 and m["max_abs_lag_above_chance"] == 2
    text = format_real_report({"mean": {"model": m}, "clips": []})
    assert "| largest |lag| of the clips above chance | 2 | ≤ 1 |" in text
    none = _means([{"model": {"corr": 0.0, "lag": 4, "above_chance": False}}])["model"]
    assert none["max_abs_lag_above_chance"] is None
    assert "| largest |lag| of the clips above chance | — | ≤ 1 |" in format_real_report(
        {"mean": {"model": none}, "clips": []}
    )


def test_eval_real_runs_the_chunk_size_asked_for_both_weights(tmp_path):
    """--chunk reaches the model and the previous weights alike: the same weights at the same
    chunk give the same video, so both score the same (at different chunks they would not)."""
    need("mediapipe", "eval --real needs mediapipe's face mesh")
    from edgetalk.cli import main
    from edgetalk.models.checkpoint import default_checkpoint

    root = _tiny_folder(tmp_path)
    out = tmp_path / "report.json"
    argv = ["eval", "--real", str(root), "--checkpoint", str(default_checkpoint()), "--chunk", "2"]
    assert main(argv + ["--no-fitted", "--long-minutes", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["chunk"] == 2
    (clip,) = r["clips"]
    assert clip["model"]["corr"] == pytest.approx(clip["previous"]["corr"])
    assert clip["model"]["judder"] == pytest.approx(clip["previous"]["judder"])
    assert r["mean"]["model"]["judder_in_band"] in ("0/1", "1/1")


def test_eval_real_refuses_a_folder_without_catalog(tmp_path, capsys):
    from edgetalk.cli import main

    assert main(["eval", "--real", str(tmp_path)]) == 2
    assert "catalog.json" in capsys.readouterr().err


def test_heldout_identities_never_reach_training(tmp_path):
    from edgetalk.training.real_data import HELD_OUT_IDENTITIES, videos

    root = _tiny_folder(tmp_path)
    assert "grid_spkA" in HELD_OUT_IDENTITIES
    assert [i.id for i in videos(root, "eval")] == ["grid_sbwe5n_tiny"]
    assert videos(root, "train") == []
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
    if (shared / "catalog.json").exists():  # the project's folder: >= 8 held-out clips
        ev, tr = videos(shared, "eval"), videos(shared, "train")
        assert len(ev) >= 8
        assert not {i.identity for i in ev} & {i.identity for i in tr}
