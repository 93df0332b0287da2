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
