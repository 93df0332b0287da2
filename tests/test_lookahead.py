"""The audio lookahead is counted in samples: 60 ms is 60 ms for every token of a chunk, streaming
equals whole-clip encoding, and checkpoints and bundles from the whole-frame (80 ms) days still
load and give the same tokens."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgetalk.benchmarks.measure import first_frame_floor_ms
from edgetalk.models.checkpoint import default_checkpoint, load_checkpoint, read_metadata
from edgetalk.models.config import ModelConfig
from edgetalk.models.io_spec import module_io
from edgetalk.runtime.bundle import _lookahead_samples
from edgetalk.runtime.pacing import Pacer

from .conftest import MICRO, seeded_model, speechlike

SPF = 640


def with_lookahead(cfg: ModelConfig, samples: int, chunk: int | None = None) -> ModelConfig:
    cfg = dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, lookahead_samples=samples))
    return cfg.with_streaming(chunk=chunk)


def stream(enc, pcm: torch.Tensor, mask: torch.Tensor, c: int) -> torch.Tensor:
    """Chunk-by-chunk encoding as the scheduler does it (the end padded with the lookahead)."""
    a = enc.cfg.audio
    t = mask.shape[1]
    full = F.pad(pcm, (0, a.lookahead_samples + c * SPF))
    ps = torch.zeros(1, 2, a.n_fft - a.hop)
    cs = torch.zeros(a.conv_layers, 2, a.hidden, a.kernel - 1)
    ms = torch.zeros(1, 2, a.n_mels + 1) if a.mel_norm_s else None
    out = []
    with torch.no_grad():
        for s in range(0, t - c + 1, c):
            r = enc(
                full[:, :, s * SPF : s * SPF + enc.cfg.chunk_samples],
                mask[:, s : s + c],
                ps,
                cs,
                ms,
            )
            ps, cs, ms = r["pcm_state_out"], r["conv_state_out"], r.get("mel_state_out")
            out.append(r["audio_tokens"])
    return torch.cat(out, 1)


def clip(frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    own = speechlike(frames * SPF / 16000, seed)
    partner = speechlike(frames * SPF / 16000, seed + 1) * 0.5
    mask = (np.arange(frames) % 7 < 4).astype(np.float32)  # talking, then listening
    return torch.from_numpy(np.stack([own, partner]))[None], torch.from_numpy(mask)[None]


@pytest.mark.parametrize("c", [1, 2, 4, 5])
def test_streaming_equals_sequence_at_60ms(c):
    model = seeded_model(MICRO)
    assert model.audio.whole == 1 and model.audio.part == 2  # one frame and half the next
    pcm, mask = clip(20)
    with torch.no_grad():
        whole = model.audio.encode_sequence(pcm, mask)
    enc = model.for_streaming(MICRO.with_streaming(chunk=c)).audio
    streamed = stream(enc, pcm, mask, c)
    assert torch.allclose(streamed, whole[:, : streamed.shape[1]], atol=1e-5)


def token_change(model, c: int, t: int, start: int, stop: int) -> float:
    """How much token t moves (streaming with chunk c) when audio[start:stop] changes."""
    pcm, mask = clip(24, seed=3)
    enc = model.for_streaming(model.cfg.with_streaming(chunk=c)).audio
    base = stream(enc, pcm, mask, c)
    moved = pcm.clone()
    moved[:, :, start:stop] += 0.3 * torch.randn(moved[:, :, start:stop].shape)
    return (stream(enc, moved, mask, c) - base)[0, t].abs().max().item()


@pytest.mark.parametrize("t", [8, 9, 10, 11])  # every place in a chunk of 4
def test_each_token_hears_exactly_the_lookahead(t):
    """Token t may use audio up to 60 ms after its frame's end (40t + 100 ms), and nothing later.
    Fails on the whole-frame design (80 ms: the audio just after 60 ms still moves the token)."""
    torch.manual_seed(t)
    model = seeded_model(MICRO)
    edge = (t + 1) * SPF + 960  # 60 ms past the end of frame t
    assert token_change(model, 4, t, edge, 24 * SPF) == 0.0
    assert token_change(model, 4, t, edge - 160, edge) > 1e-4  # its last 10 ms are heard


def test_perturbation_test_catches_80ms():
    """The check above can fail: the old whole-frame encoder hears 20 ms more."""
    model = seeded_model(with_lookahead(MICRO, 2 * SPF))
    edge = 10 * SPF + 960
    assert token_change(model, 4, 9, edge, 24 * SPF) > 1e-4


def old_tokens(enc, pcm, mask, pcm_state, conv_state) -> torch.Tensor:
    """The whole-frame encoder as it was before the lookahead was counted in samples."""
    b, c = mask.shape
    full = torch.cat([pcm_state, pcm], dim=2)
    x = enc.features(full.reshape(2 * b, full.shape[2]))
    for i, (conv, norm) in enumerate(zip(enc.convs, enc.norms, strict=True)):
        xin = torch.cat([conv_state[i], x], dim=2)
        x = x + F.gelu(norm(conv(xin).transpose(1, 2)).transpose(1, 2))
    y = enc.lookahead_conv(x).reshape(b, 2, -1, c).transpose(2, 3)
    m = mask.unsqueeze(2)
    return enc.mix(torch.cat([y[:, 0] * m, y[:, 1] * (1.0 - m), m], dim=2))


def test_frame_lookahead_checkpoint_loads_with_the_same_tokens(tmp_path):
    """A checkpoint whose config says `lookahead: 2` (frames) is the 80 ms encoder, bit for bit
    (written before the mel normalization too: no mel_norm_s, raw log-mels)."""
    cfg = with_lookahead(MICRO, 2 * SPF)
    old = seeded_model(dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, mel_norm_s=0)))
    conf = old.cfg.to_dict()
    del conf["audio"]["lookahead_samples"]
    del conf["audio"]["mel_norm_s"]
    conf["audio"]["lookahead"] = 2  # as files written before this change say it
    path = tmp_path / "old.safetensors"
    meta = {"format": "edgetalk-checkpoint", "format_version": "1", "config": json.dumps(conf)}
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path), metadata=meta)
    model, _ = load_checkpoint(path)
    assert model.cfg.lookahead_samples == 1280 and model.cfg.lookahead_ms == 80
    assert model.audio.part == 0 and not hasattr(model.audio, "part_in")
    pcm, mask = clip(12)
    a = MICRO.audio
    c = MICRO.chunk
    pcm = pcm[:, :, : c * SPF + 1280]
    ps, cs = (
        torch.randn(1, 2, a.n_fft - a.hop),
        torch.randn(a.conv_layers, 2, a.hidden, a.kernel - 1),
    )
    with torch.no_grad():
        got = model.audio(pcm, mask[:, :c], ps, cs)["audio_tokens"]
        want = old_tokens(old.audio, pcm, mask[:, :c], ps, cs)
    assert torch.equal(got, want)
    # ... and it still streams like its whole-clip encoding
    pcm, mask = clip(20)
    with torch.no_grad():
        whole = model.audio.encode_sequence(pcm, mask)
    streamed = stream(model.audio, pcm, mask, c)
    assert torch.allclose(streamed, whole[:, : streamed.shape[1]], atol=1e-5)


def test_config_counts_the_lookahead_in_samples():
    old = MICRO.to_dict()
    del old["audio"]["lookahead_samples"]
    old["audio"]["lookahead"] = 2
    cfg = ModelConfig.from_dict(old)
    assert cfg.lookahead_samples == 1280 and cfg.chunk_samples == (MICRO.chunk + 2) * SPF
    # an 80 ms bundle's audio input keeps its old shape, so such bundles still open
    assert module_io(cfg)["audio"].inputs[0].shape == (1, 2, (MICRO.chunk + 2) * SPF)
    assert module_io(MICRO)["audio"].inputs[0].shape == (1, 2, MICRO.chunk * SPF + 960)
    assert _lookahead_samples({"lookahead": 2}) == 1280
    assert _lookahead_samples({"lookahead_samples": 960}) == 960
    both = MICRO.to_dict()
    both["audio"]["lookahead"] = 2
    with pytest.raises(ValueError, match="both"):
        ModelConfig.from_dict(both)
    odd = MICRO.to_dict()
    odd["audio"]["lookahead_samples"] = 1000  # not on a 10 ms hop
    with pytest.raises(ValueError, match="multiple of the hop"):
        ModelConfig.from_dict(odd)
    with pytest.raises(ValueError, match="60 ms"):
        MICRO.with_streaming(lookahead_ms=80)


def test_shipped_weights_hear_60ms_and_the_floor_at_chunk_1_is_100ms():
    conf = json.loads(read_metadata(default_checkpoint())["config"])
    cfg = ModelConfig.from_dict(conf).with_streaming(chunk=1)
    assert cfg.lookahead_samples == 960
    assert first_frame_floor_ms(cfg.chunk, cfg.lookahead_samples) == pytest.approx(100.0)
    pacer = Pacer(True, "drop", cfg.chunk, cfg.lookahead_samples, clock=lambda: 0.0)
    assert pacer.floor_s == pytest.approx(0.100)


def test_bench_reports_from_before_read_the_lookahead_in_ms():
    """Schema version 1 reports said `lookahead` in frames; `bench report` still reads them."""
    from pathlib import Path

    from edgetalk.benchmarks.report import load_report

    old = Path(__file__).parent / "data" / "bench_report_v1.json"  # the README's table until v2
    rows = load_report(old)["results"]
    assert rows and all(r["lookahead_ms"] == 80 and "lookahead" not in r for r in rows)
