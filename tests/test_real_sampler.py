import numpy as np

from edgetalk.models.config import SAMPLES_PER_FRAME as SPF
from edgetalk.models.motion import HEAD, INDEX, MOTION_DIM, MOUTH
from edgetalk.training.train_motion import RealSampler


def _pool(frames: int = 120):
    rng = np.random.default_rng(0)
    motion = rng.uniform(0.2, 0.6, (frames, MOTION_DIM)).astype(np.float32)
    audio = rng.normal(0, 0.3, (2, frames * SPF)).astype(np.float32)  # clean + one variant
    return [(audio, motion)], motion


def test_stream_start_windows_begin_silent_with_the_mouth_at_rest():
    pool, motion = _pool()
    mouth, head = [INDEX[k] for k in MOUTH], [INDEX[k] for k in HEAD]
    sampler = RealSampler(pool, 48, seed=3, start_share=1.0)
    ratios = []
    for _ in range(20):
        a, partner, m = sampler.one()
        assert a.shape == (48 * SPF,) and m.shape == (48, MOTION_DIM) and not partner.any()
        rest = np.flatnonzero(~(m[:, mouth] == 0).all(1))[0]  # first frame with the mouth moving
        assert 8 <= rest <= 30  # 0.3-1.2 s of lead
        assert np.allclose(m[:rest, head], m[rest, head], atol=0.05)  # head held at the 1st frame
        ratios.append(np.abs(a[: rest * SPF]).mean() / np.abs(a[rest * SPF :]).mean())
    # quiet before the speech (the per-step noise, up to -25 dB, sometimes drowns quiet speech)
    assert np.median(ratios) < 0.2


def test_no_stream_start_windows_by_default_share_zero():
    pool, _ = _pool()
    sampler = RealSampler(pool, 48, seed=3, start_share=0.0)
    mouth = [INDEX[k] for k in MOUTH]
    for _ in range(20):
        _, _, m = sampler.one()
        assert not (m[:8, mouth] == 0).all()


def test_ordinary_windows_start_on_voiced_frames():
    pool, _ = _pool()
    audio = pool[0][0].copy()
    audio[:, : 60 * SPF] *= 1e-4  # the first 60 frames are a pause
    sampler = RealSampler([(audio, pool[0][1])], 48, seed=5, start_share=0.0)
    assert not sampler.voiced[0][:60].any() and sampler.voiced[0][60:].all()
    for _ in range(20):
        a, _, _ = sampler.one()  # starts at frame >= 60: no window opens in the pause
        assert np.abs(a[:SPF]).mean() > 0.002


def test_stream_start_lead_uses_the_clips_own_quiet_frames():
    pool, motion = _pool()
    audio = pool[0][0].copy()
    audio[:, 30 * SPF : 50 * SPF] *= 1e-3  # a pause: the clip's room tone
    sampler = RealSampler([(audio, motion)], 48, seed=2, start_share=1.0)
    pause = audio[1, 30 * SPF : 50 * SPF].reshape(-1, SPF)
    from_clip = 0
    for _ in range(40):
        tone = sampler._room_tone(0, audio[1], 10).reshape(10, SPF)
        same = [(np.abs(pause - f).max(1) == 0).any() for f in tone]
        assert all(same) or not any(same)  # a lead is all room tone or all white noise
        from_clip += all(same)
    assert 8 <= from_clip <= 32


def test_windows_hear_the_audio_before_them():
    """With warm-up frames, every window carries the audio before it (room tone where the clip
    starts) so that the encoder's running state is set as in a stream that has been going."""
    pool, _ = _pool()
    sampler = RealSampler(pool, 48, seed=3, start_share=0.3, warm=25)
    for _ in range(12):
        a, b, m = sampler.one()
        assert a.shape == b.shape == ((25 + 48) * 640,) and m.shape == (48, 16)
        assert np.isfinite(a).all() and np.abs(a[: 25 * 640]).max() > 0  # never digital silence
