"""The CPU ONNX backend converts each frame to 8-bit levels in the worker that rendered it
(Backend.decode_levels): the same bytes as the scheduler's conversion of the chunk, frame by
frame and band by band, and the same stream."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import BANDED, MICRO, export_seeded, need, speechlike

need("onnxruntime", "the onnx extra is not installed")

from edgetalk.runtime import backend_onnxruntime as bo  # noqa: E402
from edgetalk.runtime import composite  # noqa: E402
from edgetalk.runtime.bundle import open_bundle  # noqa: E402
from edgetalk.runtime.scheduler import StreamScheduler, to_uint8, to_uint8_into  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("levels")
    return {
        name: export_seeded(root, name, cfg, "int8", seed=5)
        for name, cfg in (("frames", MICRO), ("banded", BANDED))
    }


def avatar(res: int) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (res, res, 3), dtype=np.uint8)


def test_to_uint8_into_makes_to_uint8s_bytes():
    x = np.random.default_rng(0).uniform(-0.2, 1.2, (2, 9, 7, 3)).astype(np.float32)
    x[0, 0, 0] = [0.5 / 255, 1.0, np.nextafter(np.float32(1.0), np.float32(2.0))]
    want = to_uint8(x, np.empty_like(x))
    got = np.zeros(x.shape, np.uint8)
    to_uint8_into(x.copy(), got)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("name", "threads"), [("frames", 1), ("frames", 2), ("banded", 2)])
def test_levels_are_the_schedulers_conversion_of_the_decoders_frames(bundles, name, threads):
    be = bo.OnnxRuntimeBackend(open_bundle(bundles[name]), threads=threads)
    assert bool(be.band_sessions) == (name == "banded")
    sched = StreamScheduler(be, avatar(be.cfg.render.resolution), seed=1)
    rng = np.random.default_rng(3)
    for _ in range(2):
        motion = rng.uniform(0, 0.6, (1, be.cfg.chunk, be.cfg.motion_dim)).astype(np.float32)
        inputs = {**sched.photo, "motion": motion}
        levels = be.decode_levels(inputs)
        frames = be.run("decoder", inputs)["frames"]
        assert levels.dtype == np.uint8 and levels.shape == frames.shape
        np.testing.assert_array_equal(levels, to_uint8(frames, np.empty_like(frames)))


def test_a_frame_rendered_whole_per_call_is_left_to_the_scheduler(bundles, monkeypatch):
    """Unless its composite runs fused, which writes the levels directly (test_composite.py)."""
    monkeypatch.setenv(composite.ENV_SWITCH, "0")
    be = bo.OnnxRuntimeBackend(open_bundle(bundles["banded"]), threads=1)
    assert not be.band_sessions and not be.frame_sessions
    sched = StreamScheduler(be, avatar(be.cfg.render.resolution), seed=1)
    motion = np.zeros((1, 1, be.cfg.motion_dim), np.float32)
    assert be.decode_levels({**sched.photo, "motion": motion}) is None


@pytest.mark.parametrize(("name", "threads"), [("frames", 2), ("banded", 2)])
def test_a_stream_is_the_same_with_the_workers_conversion(bundles, monkeypatch, name, threads):
    def stream(backend):
        sched = StreamScheduler(backend, avatar(backend.cfg.render.resolution), seed=1)
        frames = sched.push_audio(speechlike(0.6)) + sched.flush()
        return np.stack([f.rgb for f in frames]), sched.stats

    be = bo.OnnxRuntimeBackend(open_bundle(bundles[name]), threads=threads)
    got, stats = stream(be)
    # the conversion is in the decoder's time: none is timed apart
    assert stats.convert_ms.count == stats.chunks and not stats.convert_ms.recent().any()
    monkeypatch.setattr(bo.OnnxRuntimeBackend, "decode_levels", lambda self, inputs: None)
    want, stats = stream(be)
    assert stats.convert_ms.recent().all()
    np.testing.assert_array_equal(got, want)
