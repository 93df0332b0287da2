"""Streaming audio encoder (models/audio_encoder.py): two PCM tracks -> per-frame tokens."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ...models.config import SAMPLE_RATE, SAMPLES_PER_FRAME, ModelConfig
from ...models.constants import (
    GATE_CENTER,
    GATE_FLOOR,
    GATE_WIDTH,
    READOUT_AHEAD,
    READOUT_NORM_S,
    READOUT_PAST,
)
from ...models.mel_mean import running_mean_weights
from ...models.motion import MOUTH
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
        self.whole = a.lookahead_samples // SAMPLES_PER_FRAME  # as the torch module
        self.part = a.lookahead_samples % SAMPLES_PER_FRAME // a.hop
        constants = torch_constants(cfg) if constants is None else constants
        self._dft = mx.array(constants["_dft"], dtype=F32)  # [2F, n_fft, 1]
        self._melfb = mx.array(constants["_melfb"], dtype=F32)  # [F, mels]
        self.frame_in = nn.Linear(a.n_mels * self.mels_per_frame, a.hidden)
        self.convs = [Conv1d(a.hidden, a.hidden, a.kernel) for _ in range(a.conv_layers)]
        self.norms = [nn.LayerNorm(a.hidden, eps=1e-5) for _ in range(a.conv_layers)]
        self.lookahead_conv = Conv1d(a.hidden, a.hidden, self.whole + 1 + (self.part > 0))
        if self.part:
            self.part_in = nn.Linear(a.n_mels * self.part, a.hidden)
        self.mix = nn.Linear(2 * a.hidden + 1, a.token_dim)
        # the running log-mel mean (models/audio_encoder.normalize_mels); 0 = none
        self.mel_decay = math.exp(-a.hop / SAMPLE_RATE / a.mel_norm_s) if a.mel_norm_s else 0.0
        self._mean_weights: dict[tuple, tuple] = {}  # per call length: fixed for a bundle
        if a.readout_mix:  # the mouth readout (models/mouth_readout.py)
            self.readout = MouthReadout(cfg)

    @staticmethod
    def constant_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        n_freq = cfg.audio.n_fft // 2 + 1
        return {"_dft": (2 * n_freq, cfg.audio.n_fft, 1), "_melfb": (n_freq, cfg.audio.n_mels)}

    def log_mel(self, pcm):
        """[B, samples] -> log-mel [B, M, mels], one per hop."""
        n_freq = self.cfg.audio.n_fft // 2 + 1
        spec = mx.conv1d(pcm[:, :, None], self._dft, stride=self.cfg.audio.hop)  # [B, M, 2F]
        power = spec[..., :n_freq] ** 2 + spec[..., n_freq:] ** 2
        return mx.log(power @ self._melfb + 1e-6)

    def _whole_frames(self, mel):
        b, m, n = mel.shape
        t = m // self.mels_per_frame
        return mel[:, : t * self.mels_per_frame].reshape(b, t, self.mels_per_frame * n)

    def _part_mels(self, mel, c: int):
        """The first r mels of frames Lw+1 .. C+Lw: [B, M, mels] -> [B, C, r*mels]."""
        b, _, n = mel.shape
        frames = self._whole_frames(mel)
        tail = mel[:, frames.shape[1] * self.mels_per_frame :].reshape(b, 1, self.part * n)
        if c == 1:
            return tail
        return mx.concatenate([frames[:, self.whole + 1 :, : self.part * n], tail], axis=1)

    def normalize_mels(self, mel, state, keep: int, decay: float | None = None):
        """models/audio_encoder.normalize_mels: mel [N, M, mels] minus its running mean, and the
        state [N, mels+1] after frame keep - 1."""
        m, n_mels = mel.shape[1], mel.shape[2]
        decay = self.mel_decay if decay is None else decay
        if (m, decay) not in self._mean_weights:
            tri, carry = running_mean_weights(m, decay)
            self._mean_weights[m, decay] = (mx.array(tri), mx.array(carry)[None, :, None])
        tri, carry = self._mean_weights[m, decay]
        gate = voice_gate(mel)
        a = GATE_FLOOR + (1.0 - GATE_FLOOR) * gate
        mean0, w0 = state[:, None, :n_mels], state[:, None, n_mels:]
        total = tri @ (a * mel) + carry * (mean0 * w0)
        weight = tri @ a + carry * w0
        mean = total / weight
        out = mx.concatenate([mean[:, keep - 1], weight[:, keep - 1]], axis=1)
        return gate * (mel - mean), out

    def __call__(
        self,
        pcm,
        talk_mask,
        pcm_state,
        conv_state,
        mel_state=None,
        readout_norm=None,
        readout_hist=None,
    ):
        b, c = talk_mask.shape
        full = mx.concatenate([pcm_state, pcm], axis=2)
        mel = self.log_mel(full.reshape(2 * b, full.shape[2]))
        extra = {}
        raw_own = mel.reshape(b, 2, *mel.shape[1:])[:, 0]  # the readout's own normalization
        if self.mel_decay:
            n = self.cfg.audio.n_mels
            mel, st = self.normalize_mels(
                mel, mel_state.astype(F32).reshape(2 * b, n + 1), c * self.mels_per_frame
            )
            extra["mel_state_out"] = st.reshape(b, 2, n + 1)
        x = self.frame_in(self.c(self._whole_frames(mel)))  # [2B, C+Lw, H]
        if self.part:
            p = self.part_in(self.c(self._part_mels(mel, c)))  # [2B, C, H]
        keep = c * SAMPLES_PER_FRAME
        pcm_state_out = pcm[:, :, keep - self.pcm_context : keep]
        k = self.cfg.audio.kernel - 1
        lw = self.whole
        state = self.c(conv_state.transpose(0, 1, 3, 2))  # [layers, 2B, k, H]
        states = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            xin = mx.concatenate([state[i], x], axis=1)  # [2B, k + C + Lw, H]
            states.append(xin[:, c : c + k])
            if self.part:  # the part-heard frame after its real history (torch: _windows)
                p = p + gelu(norm(conv(_windows(xin[:, lw + 1 :], p, k))[:, :: k + 1]))
            x = x + gelu(norm(conv(xin)))
        if self.part:
            y = self.lookahead_conv(_windows(x, p, lw + 1))[:, :: lw + 2]
        else:
            y = self.lookahead_conv(x)
        y = y.reshape(b, 2, c, -1)  # [B, 2, C, H]
        own, partner = y[:, 0], y[:, 1]
        if "readout" in self:
            mouth, weight, norm_out, hist_out = self.readout(
                raw_own,
                c,
                readout_norm.astype(F32),
                readout_hist.astype(F32),
                self.normalize_mels,
                own,
            )
            extra.update(
                mouth=mouth,
                mouth_weight=weight,
                readout_norm_out=norm_out,
                readout_hist_out=hist_out,
            )
        m = self.c(talk_mask[:, :, None])
        tokens = self.mix(mx.concatenate([own * m, partner * (1.0 - m), m], axis=2))
        return {
            "audio_tokens": tokens.astype(F32),
            "pcm_state_out": pcm_state_out,
            "conv_state_out": mx.stack(states, axis=0).transpose(0, 1, 3, 2).astype(F32),
            **extra,
        }


def voice_gate(mel):
    """models/audio_encoder.voice_gate: [N, M, mels] -> [N, M, 1]."""
    return mx.sigmoid((mx.logsumexp(mel, axis=2, keepdims=True) - GATE_CENTER) / GATE_WIDTH)


class MouthReadout(Module):
    """models/mouth_readout.MouthReadout, channels as the torch module (its own voice's log-mels,
    normalized by its own running mean, PAST + 1 + AHEAD frames side by side, then the encoder's
    own-voice features; one Linear)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.audio
        self.per = SAMPLES_PER_FRAME // a.hop
        self.n_mels = a.n_mels
        self.decay = math.exp(-a.hop / SAMPLE_RATE / READOUT_NORM_S)
        width = (READOUT_PAST + 1 + READOUT_AHEAD) * self.per * a.n_mels + a.hidden
        self.linear = nn.Linear(width, len(MOUTH))

    def __call__(self, mel, c: int, norm_state, hist, normalize, own):
        b, per, keep = mel.shape[0], self.per, c * self.per
        z, norm_out = normalize(mel, norm_state, keep, self.decay)
        seq = mx.concatenate([hist, z], axis=1)
        n = READOUT_PAST + c + READOUT_AHEAD
        frames = seq[:, : n * per].reshape(b, n, per * self.n_mels)
        x = mx.concatenate([frames[:, i : i + c] for i in range(n - c + 1)] + [own], axis=2)
        mouth = self.linear(self.c(x)).astype(F32)
        weight = voice_gate(mel[:, :keep]).reshape(b, c, per).mean(axis=2)
        hist_out = seq[:, keep : keep + READOUT_PAST * per]
        return mouth, weight, norm_out, hist_out


def _windows(real, last, n: int):
    """Channels-last models/audio_encoder._windows: window t = real[t .. t+n-1] then last[t].
    real [B, >= C+n-1, H], last [B, C, H] -> [B, C*(n+1), H]."""
    b, c, h = last.shape
    taps = [real[:, m : m + c] for m in range(n)] + [last]
    return mx.stack(taps, axis=2).reshape(b, c * (n + 1), h)


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
