"""training/av_sync.py: each real training clip's audio/video offset, found by the readout fitted
without the clip's identity, and the re-paired voice and mouth (`fit_readout --av-sync`)."""

from __future__ import annotations

import numpy as np
import pytest

from edgetalk.models.motion import INDEX
from edgetalk.training import av_sync
from edgetalk.training.fit_readout import fit_maps, identity_folds

JAW = INDEX["jaw_open"]


def smooth_noise(n: int, rng) -> np.ndarray:
    x = np.convolve(rng.normal(size=n + 2), np.ones(3) / 3, mode="valid")[:n]
    return (x - x.min()) / (x.max() - x.min())


def clip(voice_late: int, rng, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A clip whose voice runs `voice_late` frames behind its mouth (web video's offset): the
    voice at frame t + voice_late says what the mouth did at frame t. The inputs hold the voice of
    frames t-2..t+2, as the readout reads a context of frames."""
    s = smooth_noise(n + 20, rng)
    motion = np.zeros((n, 16))
    motion[:, JAW] = 0.1 + 0.5 * s[10 : 10 + n]
    context = [s[10 - voice_late + k : 10 - voice_late + k + n] for k in range(-2, 3)]
    return np.stack([*context, rng.normal(size=n)], 1), motion


def fit(xs, ys):
    return fit_maps(xs, ys, 1.0, [1.0] * len(xs))


def test_offsets_are_found_for_every_clip_and_anchored_on_grid():
    """Six in-sync GRID-like clips and four web clips 3, -2, 5 and 1 frames off: every offset is
    found from a fit that never saw the clip's person, and GRID's own offset is the zero."""
    rng = np.random.default_rng(0)
    lags = [0, 0, 0, 0, 0, 0, 3, -2, 5, 1]
    ids = [f"grid_{i}" for i in range(6)] + ["web_a", "web_b", "web_c", "web_d"]
    pairs = [clip(lag, rng) for lag in lags]
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    folds = identity_folds(ids, {i: i for i in ids})
    found = av_sync.clip_offsets(fit, [xs], [ys], folds)
    assert found == lags
    # a shared offset of the whole corpus (every clip one frame more) is GRID's, not the clips'
    assert av_sync.anchored(ids, [lag + 1 for lag in lags]) == lags
    assert av_sync.anchored(["web_a", "web_b"], [2, -1]) == [2, -1]  # no anchor: own peaks


@pytest.mark.parametrize("lag", [3, -2, 0])
def test_shift_pairs_the_voice_at_t_plus_lag_with_the_mouth_at_t(lag):
    rng = np.random.default_rng(1)
    x, y = clip(lag, rng)
    x2, y2 = av_sync.shift(x, y, lag)
    assert len(x2) == len(y2) == len(x) - abs(lag)
    np.testing.assert_allclose(x2[:, 2], (y2[:, JAW] - 0.1) / 0.5, atol=1e-12)  # the centre frame


def test_alignment_sharpens_the_fit():
    """Most real clips off, beside an in-sync synthetic set (espeak's role): the offsets are
    found, and the map fitted on the re-paired clips follows a new in-sync clip better than the
    map fitted on the raw ones, whose offsets blur it."""
    rng = np.random.default_rng(2)
    lags = [0, 0, 4, -3, 5, 3, -4, 2]
    ids = ["grid_0", "grid_1"] + [f"web_{i}" for i in range(6)]
    pairs = [clip(lag, rng) for lag in lags]
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    synth = [clip(0, rng) for _ in range(6)]
    sx, sy = [x for x, _ in synth], [y for _, y in synth]
    folds = identity_folds(ids, {i: i for i in ids})
    found = av_sync.anchored(ids, av_sync.clip_offsets(fit, [xs, sx], [ys, sy], folds))
    assert found == lags
    aligned = [av_sync.shift(x, y, lag) for x, y, lag in zip(xs, ys, found, strict=True)]
    test_x, test_y = clip(0, rng)

    def corr(w, b):
        g = av_sync.predicted_mouth(w, b, test_x, test_y)
        return np.corrcoef(g, av_sync.mouth(test_y))[0, 1]

    raw = corr(*fit([xs, sx], [ys, sy]))
    sharp = corr(*fit([[x for x, _ in aligned], sx], [[y for _, y in aligned], sy]))
    assert 1 - sharp < (1 - raw) / 10, (sharp, raw)  # a tenth of the raw fit's error


def test_fit_readout_av_sync_needs_the_catalog(tmp_path):
    from edgetalk.training import fit_readout

    with pytest.raises(SystemExit, match="--av-sync needs --real DIR"):
        fit_readout.main(["--labels", str(tmp_path), "--score", "--av-sync"])


def test_fit_readout_av_sync_needs_two_people(tmp_path):
    """One person's clips leave no one to fit the offsets on: one line, no traceback."""
    from edgetalk.training import fit_readout

    from .conftest import tiny_real_folder

    labels = tmp_path / "labels"
    labels.mkdir()
    rng = np.random.default_rng(4)
    for name, held in (("grid_tiny_train", False), ("h", True)):
        motion = np.zeros((60, 16))
        motion[:, JAW] = smooth_noise(60, rng)
        pcm = rng.normal(scale=0.1, size=60 * 640).astype(np.float32)
        np.savez(labels / f"{name}.npz", audio=pcm, motion=motion, held_out=np.array(held))
    root = tiny_real_folder(tmp_path, "grid_tiny_train", "grid_spkT")
    argv = ["--labels", str(labels), "--score", "--av-sync", "--real", str(root), "--lam", "100"]
    with pytest.raises(SystemExit, match="at least two people"):
        fit_readout.main(argv)


def test_clip_norm_puts_every_clip_on_the_pooled_scale():
    """fit_readout --clip-norm: a wide talker and a narrow one, each relative to their own
    reference frame, end with the same mouth mean and spread (the pooled ones: the readout's
    range is kept); the shape of each clip's mouth and every other parameter are unchanged."""
    from edgetalk.models.motion import MOUTH
    from edgetalk.training.fit_readout import clip_normalized

    rng = np.random.default_rng(3)
    wide, narrow = np.zeros((120, 16)), np.zeros((80, 16))
    wide[:, JAW] = 0.4 + 0.3 * smooth_noise(120, rng)
    narrow[:, JAW] = 0.05 + 0.08 * smooth_noise(80, rng)
    wide[:, INDEX["head_yaw"]] = 0.2
    out = clip_normalized([wide, narrow])
    pooled = np.concatenate([wide, narrow])[:, JAW]
    for before, after in zip((wide, narrow), out, strict=True):
        assert after[:, JAW].mean() == pytest.approx(pooled.mean())
        assert after[:, JAW].std() == pytest.approx(pooled.std())
        assert np.corrcoef(after[:, JAW], before[:, JAW])[0, 1] == pytest.approx(1.0)
        others = [i for i in range(16) if i not in [INDEX[n] for n in MOUTH]]
        np.testing.assert_array_equal(after[:, others], before[:, others])
    # a parameter that never moves in a clip stays finite (its pooled mean)
    assert np.isfinite(out[1]).all()
