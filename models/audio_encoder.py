"""Streaming audio encoder: causal except for a fixed lookahead of L video frames.

Each call takes the PCM of C + L frames starting at the first frame of the chunk (the last L
overlap the next call) and returns one token per frame of the chunk. Token t depends on audio up
to the end of frame t + L and on nothing later. The state it returns describes the history up to
the end of frame s + C only, so the overlap is never counted twice.

Features are log-mel from a conv1d with a fixed DFT basis, which exports to ONNX, CoreML and MLX.
Own voice and partner voice share the encoder; a talk/listen mask gates them after extraction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import SAMPLE_RATE, SAMPLES_PER_FRAME, ModelConfig


def mel_filterbank(n_fft: int, n_mels: int, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """HTK-style triangular mel filters [n_freq, n_mels]."""

    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    n_freq = n_fft // 2 + 1
    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sr / 2, n_freq)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).T.contiguous()


def dft_basis(n_fft: int) -> torch.Tensor:
    """Hann-windowed real DFT as conv1d weights [2*n_freq, 1, n_fft] (cos rows, then sin rows)."""
    n_freq = n_fft // 2 + 1
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_freq, dtype=torch.float64)[:, None]
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
    ang = 2 * math.pi * k * n / n_fft
    basis = torch.cat([torch.cos(ang) * window, -torch.sin(ang) * window], dim=0)
    return basis.float().unsqueeze(1)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.audio
        self.cfg = cfg
        self.mels_per_frame = SAMPLES_PER_FRAME // a.hop
        self.pcm_context = a.n_fft - a.hop  # samples of history the first STFT window needs
        self.register_buffer("dft", dft_basis(a.n_fft), persistent=False)
        self.register_buffer("melfb", mel_filterbank(a.n_fft, a.n_mels), persistent=False)
        self.frame_in = nn.Linear(a.n_mels * self.mels_per_frame, a.hidden)
        self.convs = nn.ModuleList(
            nn.Conv1d(a.hidden, a.hidden, a.kernel) for _ in range(a.conv_layers)
        )
        # Per-frame LayerNorm: statistics over channels only, so nothing leaks across time.
        self.norms = nn.ModuleList(nn.LayerNorm(a.hidden) for _ in range(a.conv_layers))
        # Lookahead head: token t sees features of frames t .. t+L.
        self.lookahead_conv = nn.Conv1d(a.hidden, a.hidden, a.lookahead + 1)
        self.mix = nn.Linear(2 * a.hidden + 1, a.token_dim)

    def features(self, pcm: torch.Tensor) -> torch.Tensor:
        """[B, samples] (with pcm_context samples of history) -> per-video-frame features [B, H, T]."""
        n_freq = self.cfg.audio.n_fft // 2 + 1
        spec = F.conv1d(pcm.unsqueeze(1), self.dft, stride=self.cfg.audio.hop)  # [B, 2F, M]
        power = spec[:, :n_freq] ** 2 + spec[:, n_freq:] ** 2
        mel = torch.log(torch.matmul(power.transpose(1, 2), self.melfb) + 1e-6)  # [B, M, mels]
        b, m, n = mel.shape
        frames = mel.reshape(b, m // self.mels_per_frame, self.mels_per_frame * n)
        return self.frame_in(frames).transpose(1, 2)  # [B, H, T]

    def forward(
        self,
        pcm: torch.Tensor,  # [B, 2, (C+L)*640]: own voice, partner voice
        talk_mask: torch.Tensor,  # [B, C]: 1 = the avatar speaks, 0 = it listens
        pcm_state: torch.Tensor,  # [B, 2, n_fft-hop]
        conv_state: torch.Tensor,  # [layers, 2B, H, kernel-1]
    ) -> dict[str, torch.Tensor]:
        b, c = talk_mask.shape
        full = torch.cat([pcm_state, pcm], dim=2)
        x = self.features(full.reshape(2 * b, full.shape[2]))  # own/partner as batch: [2B, H, C+L]
        keep = c * SAMPLES_PER_FRAME  # the state advances by the chunk, not the lookahead
        pcm_state_out = pcm[:, :, keep - self.pcm_context : keep]
        k = self.cfg.audio.kernel - 1
        states = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            xin = torch.cat([conv_state[i], x], dim=2)  # [2B, H, k + C + L]
            states.append(xin[:, :, c : c + k])  # history ending at frame s + C
            x = x + F.gelu(norm(conv(xin).transpose(1, 2)).transpose(1, 2))
        y = self.lookahead_conv(x).reshape(b, 2, -1, c).transpose(2, 3)  # [B, 2, C, H]
        own, partner = y[:, 0], y[:, 1]
        m = talk_mask.unsqueeze(2)  # [B, C, 1]
        tokens = self.mix(torch.cat([own * m, partner * (1.0 - m), m], dim=2))
        return {
            "audio_tokens": tokens,
            "pcm_state_out": pcm_state_out,
            "conv_state_out": torch.stack(states, dim=0),
        }

    def encode_sequence(self, pcm: torch.Tensor, talk_mask: torch.Tensor) -> torch.Tensor:
        """Whole clips in one call (training): pcm [B, 2, T*640], mask [B, T] -> tokens [B, T, A].

        The end is padded with L frames of silence, as the scheduler's flush does; the start has
        zero state, as a new stream does. Equal to streaming the clip chunk by chunk.
        """
        b, t = talk_mask.shape
        a = self.cfg.audio
        pad = self.cfg.lookahead * SAMPLES_PER_FRAME
        pcm = F.pad(pcm, (0, pad))
        pcm_state = pcm.new_zeros(b, 2, self.pcm_context)
        conv_state = pcm.new_zeros(a.conv_layers, 2 * b, a.hidden, a.kernel - 1)
        return self(pcm, talk_mask, pcm_state, conv_state)["audio_tokens"]
