"""The audio encoder's running log-mel mean (cepstral mean normalization, `mel_norm_s`).

It is what lets the mouth follow voices it never heard (a plain regressor on the 10 held-out real
clips: 0.35 correlation with the real mouth on raw log-mels, 0.52 on normalized ones), so its
streaming form, its invariances and the compatibility of checkpoints without it are checked here.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgetalk.models.audio_encoder import normalize_mels
from edgetalk.models.checkpoint import load_checkpoint
from edgetalk.models.config import ModelConfig
from edgetalk.models.constants import GATE_CENTER, GATE_FLOOR, GATE_WIDTH
from edgetalk.models.io_spec import module_io
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.scheduler import StreamScheduler

from .conftest import MICRO, seeded_model, speechlike

SPF = 640


def with_norm(cfg: ModelConfig, seconds: float) -> ModelConfig:
    return dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, mel_norm_s=seconds))


def test_closed_form_equals_the_recurrence():
    """One call's matrix form = the frame-by-frame gated recurrence, from a non-empty state, and
    the state it returns is the recurrence's after frame keep - 1."""
    rng = np.random.default_rng(0)
    n, m, mels, keep, d = 3, 22, 5, 16, 0.995
    mel = rng.normal(size=(n, m, mels))
    mel[1, 3:9] -= 20.0  # a pause: shut by the gate, it barely moves the mean
    mean0, w0 = rng.normal(size=(n, mels)), rng.uniform(0, 150, size=(n, 1))
    out, state = normalize_mels(
        torch.tensor(mel, dtype=torch.float32),
        torch.tensor(np.concatenate([mean0, w0], 1), dtype=torch.float32),
        keep,
        d,
    )
    s, w = mean0 * w0, w0.copy()
    want = np.zeros_like(mel)
    for k in range(m):
        energy = np.log(np.exp(mel[:, k]).sum(1, keepdims=True))
        g = 1 / (1 + np.exp(-(energy - GATE_CENTER) / GATE_WIDTH))
        a = GATE_FLOOR + (1 - GATE_FLOOR) * g
        s, w = d * s + a * mel[:, k], d * w + a
        want[:, k] = g * (mel[:, k] - s / w)
        if k == keep - 1:
            want_state = np.concatenate([s / w, w], 1)
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5)
    np.testing.assert_allclose(state.numpy(), want_state, rtol=1e-5, atol=1e-5)


def _tokens(model, pcm: np.ndarray) -> np.ndarray:
    """Stream pcm through the scheduler's audio calls (torch backend); tokens [T, A]."""
    be = TorchBackend(model)
    sched = StreamScheduler(be, np.zeros((32, 32, 3), np.uint8))
    seen = []
    run = be.run

    def tap(module, inputs):
        out = run(module, inputs)
        if module == "audio":
            seen.append(out["audio_tokens"][0])
        return out

    be.run = tap
    sched.push_audio(pcm)
    sched.flush()
    return np.concatenate(seen)


def test_tokens_ignore_the_level_and_a_fixed_filter():
    """A quieter take through a different microphone (a fixed first-order filter) gives the same
    tokens once the running mean has settled; without the normalization it does not, so the check
    can fail. The take has a noise floor, as every microphone does: digital silence sits at the
    log's floor, which no gain moves, and there the invariance ends."""
    noise = np.random.default_rng(0).normal(0, 0.03, 96000)  # -30 dBFS: well above the gate
    pcm = (speechlike(6.0, seed=3) * 0.5 + noise).astype(np.float32)
    coloured = np.convolve(pcm, [0.6, 0.3], mode="full")[: len(pcm)].astype(np.float32) * 0.5
    late = slice(100, 140)  # 4 s in: the 2-s running mean has long settled
    for seconds, same in ((2.0, True), (0.0, False)):
        model = seeded_model(with_norm(MICRO, seconds))
        a, b = _tokens(model, pcm)[late], _tokens(model, coloured)[late]
        rel = np.abs(a - b).mean() / np.abs(a).mean()
        assert (rel < 0.02) == same, (seconds, rel)


def test_state_is_in_the_contract_only_when_normalizing():
    on, off = module_io(with_norm(MICRO, 2.0))["audio"], module_io(with_norm(MICRO, 0))["audio"]
    assert "mel_state" in on.input_names and "mel_state_out" in on.output_names
    assert "mel_state" not in off.input_names and "mel_state_out" not in off.output_names
    shape = {t.name: t.shape for t in on.inputs}["mel_state"]
    assert shape == (1, 2, MICRO.audio.n_mels + 1)


def test_checkpoint_without_the_field_is_read_unnormalized(tmp_path):
    """Files written before the normalization existed (the shipped weights among them until they
    were retrained) say nothing about it: they are read as mel_norm_s = 0, tokens unchanged."""
    old = seeded_model(with_norm(MICRO, 0))
    conf = old.cfg.to_dict()
    del conf["audio"]["mel_norm_s"]
    meta = {"format": "edgetalk-checkpoint", "format_version": "1", "config": json.dumps(conf)}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path), metadata=meta)
    model, _ = load_checkpoint(path)
    assert model.cfg.audio.mel_norm_s == 0 and not model.audio.mel_decay
    pcm = speechlike(1.0, seed=1)
    np.testing.assert_array_equal(_tokens(model, pcm), _tokens(old, pcm))


@pytest.mark.parametrize("bad", [-1.0, 1e4, True, "2"])
def test_config_refuses_a_bad_time_constant(bad):
    conf = MICRO.to_dict()
    conf["audio"]["mel_norm_s"] = bad
    with pytest.raises(ValueError, match="mel_norm_s"):
        ModelConfig.from_dict(conf)


def test_stream_start_and_flush_keep_the_state_finite():
    """Silence first (the weight of the history grows from 0), then speech: no NaN, and the state's
    weight stays under 1 / (1 - decay), the weight of a history that was all sound."""
    model = seeded_model(with_norm(MICRO, 0.5))
    pcm = np.concatenate([np.zeros(16000, np.float32), speechlike(4.0, seed=2)])
    tokens = _tokens(model, pcm)
    assert np.isfinite(tokens).all()
    be = TorchBackend(model)
    sched = StreamScheduler(be, np.zeros((32, 32, 3), np.uint8))
    sched.push_audio(pcm)
    w = sched.audio_state["mel_state"][0, :, -1]
    cap = 1 / (1 - model.audio.mel_decay)  # every frame fully sound
    assert w[0] > 0.2 * cap and (w <= cap * 1.001).all(), (w, cap)
    assert w[1] < 0.05 * cap  # the partner track is digital silence: the gate's floor only


def test_voice_gate_shuts_room_tone_and_passes_quiet_speech():
    """The gate's level, through the encoder's own front end: white noise at -60 dBFS (a quiet
    room) and digital silence are shut, -45 dBFS passes."""
    from edgetalk.models.audio_encoder import AudioEncoder, voice_gate

    enc = AudioEncoder(MICRO)
    rng = np.random.default_rng(0)

    def gate(x):
        with torch.no_grad():
            return float(
                voice_gate(enc.log_mel(torch.from_numpy(x.astype(np.float32))[None])).median()
            )

    assert gate(np.zeros(8000)) < 0.03
    assert gate(rng.normal(0, 10 ** (-60 / 20), 8000)) < 0.1
    assert gate(rng.normal(0, 10 ** (-45 / 20), 8000)) > 0.85
    assert gate(rng.normal(0, 10 ** (-20 / 20), 8000)) > 0.99


def test_silence_after_speech_keeps_the_mean_and_gives_zero_features():
    """Seconds of room tone after speech: the state's mean stays near the speech's (the gate keeps
    the room out of it) and the normalized features are ~0 (silence reads the same at any
    level)."""
    d = float(np.exp(-160 / 16000 / 2.0))
    rng = np.random.default_rng(0)
    speech = torch.tensor(rng.normal(0, 1, (1, 200, 8)) + 2.0, dtype=torch.float32)
    room = torch.full((1, 300, 8), -9.0) + 0.1 * torch.randn(1, 300, 8)
    _, st = normalize_mels(speech, torch.zeros(1, 9), 200, d)
    out, st2 = normalize_mels(room, st, 300, d)
    assert (st2[0, :8] - st[0, :8]).abs().max() < 1.5  # a plain mean would have moved ~8
    assert out.abs().max() < 0.02  # speech features are of order 1
