import numpy as np
import pytest

from edgetalk.errors import InputError
from edgetalk.models.motion import INDEX, MOTION_DIM
from edgetalk.training import motion_proxy as mp


def _motion(jaw: np.ndarray, press: np.ndarray | None = None) -> np.ndarray:
    m = np.zeros((len(jaw), MOTION_DIM), np.float32)
    m[:, INDEX["jaw_open"]] = jaw
    if press is not None:
        m[:, INDEX["lip_press"]] = press
    return m


def test_lag_corr_and_range_of_a_late_half_size_mouth():
    rng = np.random.default_rng(0)
    jaw = np.convolve(rng.uniform(0, 1, 200), np.ones(4) / 4, mode="same")
    fitted = _motion(jaw)
    late = _motion(0.1 + 0.5 * np.roll(jaw, 3))  # 3 frames late
    s = mp.score_clip(late, fitted)
    assert s["lag"] == 3
    assert s["corr"] > 0.95
    assert s["range_ratio"] == pytest.approx(0.5, abs=0.03)
    # an unrelated mouth scores near zero, a flat one exactly zero
    other = _motion(np.convolve(rng.uniform(0, 1, 200), np.ones(4) / 4, mode="same"))
    assert mp.score_clip(other, fitted)["corr"] < 0.4
    assert mp.score_clip(_motion(np.zeros(200)), fitted)["corr"] == 0.0


def test_lip_press_closes_the_mouth_signal():
    jaw = np.full(30, 0.4)
    press = np.r_[np.zeros(15), np.ones(15)]
    sig = mp.mouth(_motion(jaw, press))
    assert sig[0] == pytest.approx(0.4) and sig[-1] == pytest.approx(-0.1)
    assert sig[15] == pytest.approx(0.4 - 0.5 * 0.75)  # smoothed [1, 2, 1] / 4 across the step


def test_silent_lead_and_mouth_open_at_start():
    rng = np.random.default_rng(1)
    pcm = np.r_[rng.normal(0, 1e-4, 640 * 8), rng.normal(0, 0.1, 640 * 40)].astype(np.float32)
    assert mp.silent_lead(pcm) == 8
    assert mp.silent_lead(pcm[640 * 8 :]) == 0
    jaw = np.r_[np.zeros(8), 0.5 + 0.3 * np.sin(np.arange(40) / 2)]
    fitted = _motion(jaw)
    shut = mp.score_clip(fitted, fitted, mp.silent_lead(pcm))
    assert shut["silent_lead"] == 8 and not shut["open_at_start"]
    opened = _motion(np.r_[np.full(8, 0.4), jaw[8:]])  # the defect: open in the silence
    s = mp.score_clip(opened, fitted, mp.silent_lead(pcm))
    assert s["open_at_start"] and s["lead_mouth"] > 0.3
    assert "lead_mouth" not in mp.score_clip(opened, fitted, 0)


def test_too_short_and_missing_checkpoint():
    with pytest.raises(InputError):
        mp.score_clip(_motion(np.zeros(5)), _motion(np.zeros(5)))
    with pytest.raises(InputError, match="checkpoint not found"):
        mp.evaluate("/nonexistent/x.safetensors", [])


def test_scores_are_averaged_over_seeds():
    jaw = np.sin(np.arange(60) / 3.0) + 1
    fitted = _motion(np.r_[np.zeros(6), jaw[6:]])
    a = mp.score_clip(_motion(jaw), fitted, lead=6)  # opens in the silent lead
    b = mp.score_clip(fitted, fitted, lead=6)
    m = mp.mean_over_seeds([a, b])
    assert m["corr"] == pytest.approx((a["corr"] + b["corr"]) / 2)
    assert m["lead_mouth"] == pytest.approx((a["lead_mouth"] + b["lead_mouth"]) / 2)
    assert m["open_at_start"] == (m["lead_mouth"] > mp.OPEN_AT_START)
    assert m["lead_mouth_max"] == a["lead_mouth_max"] > 1.0


def test_speech_conditions_do_what_they_say():
    from edgetalk.training.motion_proxy import CONDITIONS

    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 100 * t) + 0.3 * np.sin(2 * np.pi * 1000 * t)).astype(
        np.float32
    )
    assert CONDITIONS["clean"](pcm, rng) is pcm
    np.testing.assert_allclose(CONDITIONS["quiet"](pcm, rng), pcm * 0.1, rtol=1e-6)
    spec = np.abs(np.fft.rfft(CONDITIONS["phone"](pcm, rng)[4000:]))
    assert spec[750] > 50 * spec[75]  # 1 kHz passes, 100 Hz is gone (bins of 1.33 Hz)
    noise = CONDITIONS["noisy"](np.zeros(16000, np.float32), rng)
    assert abs(20 * np.log10(noise.std()) + 45) < 0.5
