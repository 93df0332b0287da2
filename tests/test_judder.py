import numpy as np
import pytest

from edgetalk.training.judder import frame_diffs, judder_ratio


def _steps(T: int, chunk: int, jump: float) -> np.ndarray:
    """A 1-D 'video' that moves 1 per frame inside chunks and `jump` into each chunk start."""
    inc = np.ones(T)
    inc[0] = 0
    inc[np.arange(T) % chunk == 0] = jump
    inc[0] = 0
    return np.cumsum(inc)


def test_smooth_motion_is_one():
    x = (np.arange(40) * 5.0)[:, None, None, None] * np.ones((1, 4, 5, 3))
    for chunk in (2, 3, 4, 8):
        assert judder_ratio(x.astype(np.uint8), chunk) == pytest.approx(1.0)


@pytest.mark.parametrize("chunk", [2, 4, 5])
def test_step_at_chunk_start_is_measured(chunk):
    x = _steps(41, chunk, jump=2.5)[:, None]
    assert judder_ratio(x, chunk) == pytest.approx(2.5)
    # the same video measured at a chunk size whose starts do not line up reads less
    other = 3 if chunk != 3 else 2
    assert judder_ratio(x, other) < 2.0


def test_uint8_and_float_agree_and_no_wraparound():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 256, size=(12, 6, 6, 3), dtype=np.uint8)
    assert judder_ratio(f, 4) == pytest.approx(judder_ratio(f.astype(np.float64), 4))
    # uint8 differences must not wrap (0 - 255 is 255, not 1)
    d = frame_diffs(np.array([[0], [255]], dtype=np.uint8))
    assert d[0] == 255


def test_chunk_one_and_bad_input():
    assert judder_ratio(_steps(20, 4, 3.0)[:, None], 1) == 1.0
    with pytest.raises(ValueError):
        judder_ratio(np.zeros((10, 2)), 0)
    with pytest.raises(ValueError):
        judder_ratio(np.zeros((1, 2)), 4)
    with pytest.raises(ValueError):  # 4 frames hold no boundary at chunk 4
        judder_ratio(np.zeros((4, 2)), 4)
    assert judder_ratio(np.zeros((9, 2)), 4) == 1.0


# ---- the fix: the scheduler shows motion made continuous across chunk boundaries ------------
from edgetalk.models.motion import INDEX, MOTION_DIM  # noqa: E402
from edgetalk.runtime.continuity import BoundaryBlend  # noqa: E402


def _chunked(blend: BoundaryBlend, raw: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([blend(raw[s : s + chunk]) for s in range(0, len(raw), chunk)])


@pytest.mark.parametrize("chunk", [1, 2, 4, 8])
def test_blend_spreads_chunk_steps_without_drift(chunk):
    rng = np.random.default_rng(chunk)
    t = np.arange(96)
    smooth = np.sin(t / 9.0)[:, None] * np.ones(MOTION_DIM)
    steps = np.repeat(rng.normal(0, 0.3, (96 // chunk + 1, MOTION_DIM)), chunk, 0)[:96]
    raw = (smooth + steps).astype(np.float32)  # a smooth path that jumps at every chunk start
    shown = _chunked(BoundaryBlend(chunk), raw, chunk)
    free = [i for i in range(MOTION_DIM) if i not in (INDEX["jaw_open"], INDEX["lip_press"])]
    if chunk > 1:
        assert judder_ratio(raw[:, free], chunk) > 2.0
        assert judder_ratio(shown[:, free], chunk) < 1.3
    # The lip-sync parameters stay exactly as generated; the first chunk too.
    for p in ("jaw_open", "lip_press"):
        assert np.array_equal(shown[:, INDEX[p]], raw[:, INDEX[p]])
    assert np.array_equal(shown[:chunk], raw[:chunk])
    # No drift: the shown path stays near the generator's, and returns to it once it is still.
    assert np.abs(shown - raw).max() < 1.5
    still = np.concatenate([raw, np.repeat(raw[-1:], 16 * max(chunk, 2), 0)])
    shown = _chunked(BoundaryBlend(chunk), still, chunk)
    assert np.abs(shown[-1] - still[-1]).max() < 1e-3


def test_velocity_gain_is_fitted_per_chunk_size_and_interpolated_between():
    from edgetalk.runtime.continuity import VELOCITY_GAINS, velocity_gain

    for chunk, gain in VELOCITY_GAINS.items():
        assert velocity_gain(chunk) == pytest.approx(gain)
    assert velocity_gain(5) == pytest.approx((VELOCITY_GAINS[4] + VELOCITY_GAINS[6]) / 2)
    assert velocity_gain(32) == pytest.approx(VELOCITY_GAINS[max(VELOCITY_GAINS)])
    # every gain continues the motion, damped or not, never reverses or doubles it
    assert all(0.5 <= g <= 1.2 for g in VELOCITY_GAINS.values())
    # the blend uses its chunk size's gain: a steady ramp continues at exactly that velocity
    for chunk in (2, 4, 8):
        blend = BoundaryBlend(chunk)
        ramp = (np.arange(2 * chunk, dtype=np.float32)[:, None] * np.ones(MOTION_DIM)) * 0.1
        first = blend(ramp[:chunk])
        free = INDEX["head_yaw"]
        raw_next = np.zeros((chunk, MOTION_DIM), np.float32)  # the generator jumps back to 0
        shown = blend(raw_next)
        step = shown[0, free] - first[-1, free]
        expect = velocity_gain(chunk) * 0.1 - (first[-1, free] + velocity_gain(chunk) * 0.1) / (
            chunk + 1
        )
        assert step == pytest.approx(expect, abs=1e-5)


def test_blend_is_causal_and_repeatable():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(24, MOTION_DIM)).astype(np.float32)
    b = a.copy()
    b[16:] += 5.0  # a different future
    sa, sb = _chunked(BoundaryBlend(4), a, 4), _chunked(BoundaryBlend(4), b, 4)
    assert np.array_equal(sa[:16], sb[:16])
    assert np.array_equal(sa, _chunked(BoundaryBlend(4), a, 4))
    assert sa.dtype == np.float32


class _MotionOnly:
    """The shipped model without its decoder (the costly part): records the generator's motion and
    the motion the scheduler hands to the decoder."""

    def __init__(self, chunk):
        from edgetalk.runtime.backend_torch import TorchBackend

        self.inner = TorchBackend.from_checkpoint(chunk=chunk)
        self.cfg, self.io = self.inner.cfg, self.inner.io
        self.generated, self.shown = [], []

    def run(self, module, inputs):
        if module == "decoder":
            self.shown.append(inputs["motion"][0])
            c, r = inputs["motion"].shape[1], self.cfg.render.resolution
            return {"frames": np.zeros((c, r, r, 3), np.float32)}
        out = self.inner.run(module, inputs)
        if module == "generator":
            self.generated.append(out["motion"][0])
        return out


@pytest.mark.parametrize("chunk", [2, 4, 8])
def test_shipped_model_streams_without_judder(chunk):
    """The regression: with the shipped weights, head pose stepped 2-5x at chunk starts."""
    import torch

    from edgetalk.runtime.audio_io import default_speech, read_audio
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.runtime.scheduler import StreamScheduler

    torch.set_num_threads(1)
    backend = _MotionOnly(chunk)
    sched = StreamScheduler(backend, prepare_avatar(None, backend.cfg.render.resolution), seed=3)
    pcm = read_audio(default_speech()).pcm[: 16000 * 5]
    for i in range(0, pcm.shape[0], 1000):
        sched.push_audio(pcm[i : i + 1000])
    std = backend.inner.model.generator.motion_std.numpy()
    shown = np.concatenate(backend.shown) / std
    generated = np.concatenate(backend.generated) / std
    head = slice(INDEX["head_yaw"], MOTION_DIM)
    assert judder_ratio(shown[:, head], chunk) <= 1.25
    assert judder_ratio(shown, chunk) <= 1.15
    # the generator's own motion is what it made (its context stays the trained one)
    assert np.array_equal(sched.prev_motion[0], backend.generated[-1][-1])
    assert not np.array_equal(shown, generated)
