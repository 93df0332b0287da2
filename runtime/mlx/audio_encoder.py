"""Streaming audio encoder (models/audio_encoder.py): two PCM tracks -> per-frame tokens."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...models.config import SAMPLES_PER_FRAME, ModelConfig
from .layers import F32, Conv1d, Module, gelu


class AudioEncoder(Module):
    # The fixed front end: not parameters (leading underscore), always float32. The bundle file
    # carries them, made by the torch module that the export's parity gate compares against, so
    # running needs no torch (and no re-derivation: torch's linspace and pow round per CPU).
    constant_names = ("_dft", "_melfb")

    def __init__(self, cfg: ModelConfig, constants: dict | None = None):
        super().__init__()
        a = cfg.audio
        self.cfg = cfg
        self.mels_per_frame = SAMPLES_PER_FRAME // a.hop
        self.pcm_context = a.n_fft - a.hop
        constants = torch_constants(cfg) if constants is None else constants
        self._dft = mx.array(constants["_dft"], dtype=F32)  # [2F, n_fft, 1]
        self._melfb = mx.array(constants["_melfb"], dtype=F32)  # [F, mels]
        self.frame_in = nn.Linear(a.n_mels * self.mels_per_frame, a.hidden)
        self.convs = [Conv1d(a.hidden, a.hidden, a.kernel) for _ in range(a.conv_layers)]
        self.norms = [nn.LayerNorm(a.hidden, eps=1e-5) for _ in range(a.conv_layers)]
        self.lookahead_conv = Conv1d(a.hidden, a.hidden, a.lookahead + 1)
        self.mix = nn.Linear(2 * a.hidden + 1, a.token_dim)

    @staticmethod
    def constant_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        n_freq = cfg.audio.n_fft // 2 + 1
        return {"_dft": (2 * n_freq, cfg.audio.n_fft, 1), "_melfb": (n_freq, cfg.audio.n_mels)}

    def features(self, pcm):
        """[B, samples] -> per-video-frame features [B, T, H] (channels-last)."""
        n_freq = self.cfg.audio.n_fft // 2 + 1
        spec = mx.conv1d(pcm[:, :, None], self._dft, stride=self.cfg.audio.hop)  # [B, M, 2F]
        power = spec[..., :n_freq] ** 2 + spec[..., n_freq:] ** 2
        mel = mx.log(power @ self._melfb + 1e-6)  # [B, M, mels]
        b, m, n = mel.shape
        frames = mel.reshape(b, m // self.mels_per_frame, self.mels_per_frame * n)
        return self.frame_in(self.c(frames))

    def __call__(self, pcm, talk_mask, pcm_state, conv_state):
        b, c = talk_mask.shape
        full = mx.concatenate([pcm_state, pcm], axis=2)
        x = self.features(full.reshape(2 * b, full.shape[2]))  # [2B, C+L, H]
        keep = c * SAMPLES_PER_FRAME
        pcm_state_out = pcm[:, :, keep - self.pcm_context : keep]
        k = self.cfg.audio.kernel - 1
        state = self.c(conv_state.transpose(0, 1, 3, 2))  # [layers, 2B, k, H]
        states = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            xin = mx.concatenate([state[i], x], axis=1)  # [2B, k + C + L, H]
            states.append(xin[:, c : c + k])
            x = x + gelu(norm(conv(xin)))
        y = self.lookahead_conv(x).reshape(b, 2, c, -1)  # [B, 2, C, H]
        own, partner = y[:, 0], y[:, 1]
        m = self.c(talk_mask[:, :, None])
        tokens = self.mix(mx.concatenate([own * m, partner * (1.0 - m), m], axis=2))
        return {
            "audio_tokens": tokens.astype(F32),
            "pcm_state_out": pcm_state_out,
            "conv_state_out": mx.stack(states, axis=0).transpose(0, 1, 3, 2).astype(F32),
        }


def torch_constants(cfg: ModelConfig) -> dict:
    """The front end rebuilt by the torch module's own functions, for files that predate the
    constants being stored (format version 1); needs torch."""
    try:
        from ...models.audio_encoder import dft_basis, mel_filterbank
    except ImportError as e:
        raise ValueError(
            f"this audio file was written by an older EdgeTalk and needs torch to rebuild its "
            f"front end ({e}); re-export the bundle, or install torch"
        ) from None
    a = cfg.audio
    return {
        "_dft": dft_basis(a.n_fft).numpy().transpose(0, 2, 1),
        "_melfb": mel_filterbank(a.n_fft, a.n_mels).numpy(),
    }
