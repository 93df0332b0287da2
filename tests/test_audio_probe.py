"""The linear audio probe (training/audio_probe.py) that chose the running log-mel mean."""

from __future__ import annotations

import numpy as np

from edgetalk.models.motion import INDEX, MOTION_DIM
from edgetalk.training import audio_probe


def _clip(seed: int, frames: int = 150):
    """Noise whose loudness follows the jaw, at a level and colour of its own per clip (a
    speaker and a microphone), over a faint floor."""
    rng = np.random.default_rng(seed)
    jaw = np.clip(np.convolve(rng.normal(size=frames), np.ones(5) / 5, mode="same") + 0.3, 0, 1)
    env = np.repeat(jaw, 640)
    colour = np.array([1.0, rng.uniform(-0.9, 0.9)])
    pcm = np.convolve(rng.normal(size=frames * 640), colour, mode="same") * env
    pcm = (pcm + rng.normal(0, 0.02, frames * 640)) * 10 ** rng.uniform(-1, 0)
    motion = np.zeros((frames, MOTION_DIM), np.float32)
    motion[:, INDEX["jaw_open"]] = jaw
    return (f"c{seed}", pcm.astype(np.float32), motion)


def test_probe_recovers_a_mouth_that_the_audio_carries():
    """Loudness follows the jaw: the probe, trained on six clips of other levels and colours,
    finds it on three new ones; on audio unrelated to the jaw it finds nothing."""
    train = [_clip(s) for s in range(6)]
    held = [_clip(s) for s in range(100, 103)]
    shuffled = [(cid, a, np.roll(m, 37, axis=0)) for cid, a, m in held]
    assert audio_probe.probe(train, held, 1.0, 1e3)["corr"] > 0.7
    assert audio_probe.probe(train, shuffled, 1.0, 1e3)["corr"] < 0.45
