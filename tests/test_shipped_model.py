"""The shipped weights are trained: cheap checks that fail if `models/weights/tiny.safetensors` were
replaced by untrained (or badly trained) weights. Every other model test uses a small seeded model."""

from __future__ import annotations

import numpy as np
import pytest

from edgetalk.models.motion import INDEX, MOTION_DIM
from edgetalk.runtime.backend import Backend
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.scheduler import StreamScheduler, frame_rms

from .conftest import need


class MotionTap(Backend):
    """Passes every call through and keeps the motion the decoder was asked to draw."""

    def __init__(self, inner: Backend):
        super().__init__(inner.cfg, inner.io, inner.precision)
        self.name = inner.name
        self.inner = inner
        self.motion: list[np.ndarray] = []

    def run(self, module, inputs):
        if module == "decoder":
            self.motion.append(np.array(inputs["motion"][0]))
        return self.inner.run(module, inputs)


@pytest.fixture(scope="module")
def shipped():
    from edgetalk.models.checkpoint import default_checkpoint

    return TorchBackend.from_checkpoint(default_checkpoint())


@pytest.fixture(scope="module")
def avatar(shipped):
    from edgetalk.runtime.avatar import prepare_avatar

    return prepare_avatar(None, shipped.cfg.render.resolution)


def test_shipped_checkpoint_says_it_is_trained():
    from edgetalk.models.checkpoint import default_checkpoint, load_checkpoint

    _, meta = load_checkpoint(default_checkpoint())
    assert meta.get("trained"), meta


def test_jaw_opens_for_speech_and_rests_in_silence(shipped, avatar):
    """Over the embedded sentence: jaw opening in voiced frames at least twice that in silence."""
    from edgetalk.runtime.audio_io import default_speech, read_audio

    pcm = read_audio(default_speech()).pcm
    tap = MotionTap(shipped)
    sched = StreamScheduler(tap, avatar, seed=0)
    frames = sched.push_audio(pcm) + sched.flush()
    motion = np.concatenate(tap.motion)[: len(frames)]
    assert motion.shape[1] == MOTION_DIM
    rms = frame_rms(np.pad(pcm, (0, len(frames) * 640 - pcm.shape[0])), len(frames))
    voiced = rms > 0.25 * np.percentile(rms, 95)
    silent = rms < 0.02 * np.percentile(rms, 95)
    assert voiced.sum() >= 25 and silent.sum() >= 10, (voiced.sum(), silent.sum())
    jaw = motion[:, INDEX["jaw_open"]]
    talking, resting = float(jaw[voiced].mean()), float(jaw[silent].mean())
    print(f"\njaw_open: voiced {talking:.3f}, silent {resting:.3f}")
    assert talking >= 0.1, f"the jaw hardly opens in speech ({talking:.3f})"
    assert talking >= 2.0 * max(resting, 0.0), (talking, resting)


def test_lip_press_closes_the_embedded_avatars_mouth(shipped, avatar):
    """Drawn by the shipped decoder and measured from pixels: the embedded avatar's photo has parted
    lips; lip_press closes them, alone and over an open jaw (a p/b/m mid-word)."""
    need("mediapipe", "mediapipe 0.10.21 is not installed")
    from edgetalk.training.metrics import FaceMeasurer

    image = (avatar.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
    app = shipped.run("appearance", {"image": image})
    motions = np.zeros((3, MOTION_DIM), np.float32)
    motions[1, INDEX["lip_press"]] = 1.0
    motions[2, INDEX["lip_press"]] = 1.0
    motions[2, INDEX["jaw_open"]] = 0.8
    rgb = []
    for m in motions:  # the decoder takes a whole chunk; repeat the pose over it
        chunk = np.repeat(m[None, None], shipped.cfg.chunk, axis=1)
        photo = {k: app[k] for k in ("app_feat", "dec_proj", "dec_basis", "dec_lips")}
        out = shipped.run("decoder", {**photo, "image": image, "motion": chunk})
        rgb.append((np.clip(out["frames"][0], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    rest, pressed, pressed_open = FaceMeasurer(video_mode=False).track(rgb).opening
    print(
        f"\nmouth opening: photo {rest:.3f}, lip_press {pressed:.3f}, with jaw {pressed_open:.3f}"
    )
    assert rest > 0.04, f"the embedded photo's lips are parted ({rest:.3f}); the test needs that"
    assert pressed < 0.03 and pressed < 0.5 * rest, (rest, pressed)
    assert pressed_open < 0.03, (rest, pressed_open)


def test_shipped_mouth_readout_is_fitted_and_leads_in_speech(shipped, avatar):
    """The shipped weights carry a fitted mouth readout (MODEL_CARD.md, "Mouth readout, round 5"):
    mixed in fully, not the zeros a fresh readout starts from, and over the embedded sentence its
    jaw follows the voice (opens in voiced frames, not in silence)."""
    from edgetalk.runtime.audio_io import default_speech, read_audio

    assert shipped.cfg.audio.readout_mix == pytest.approx(1.0)
    pcm = read_audio(default_speech()).pcm
    seen = []
    run = shipped.run

    def tap(module, inputs):
        out = run(module, inputs)
        if module == "audio":
            seen.append((out["mouth"][0], out["mouth_weight"][0]))
        return out

    shipped.run = tap
    try:
        sched = StreamScheduler(shipped, avatar, seed=0)
        n = len(sched.push_audio(pcm) + sched.flush())
    finally:
        shipped.run = run
    mouth = np.concatenate([m for m, _ in seen])[:n]
    gate = np.concatenate([w for _, w in seen])[:n]
    rms = frame_rms(np.pad(pcm, (0, n * 640 - pcm.shape[0])), n)
    voiced = rms > 0.25 * np.percentile(rms, 95)
    silent = rms < 0.02 * np.percentile(rms, 95)
    jaw = mouth[:, 0]  # MOUTH[0] is jaw_open
    print(f"\nreadout jaw: voiced {jaw[voiced].mean():.3f}; gate voiced {gate[voiced].mean():.2f}")
    assert np.abs(mouth).max() > 0.05, "the readout is not fitted (all zeros)"
    assert jaw[voiced].mean() > jaw[silent].mean() + 0.1
    assert gate[voiced].mean() > 0.8 and gate[silent].mean() < 0.2
