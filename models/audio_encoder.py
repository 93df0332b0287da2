"""Streaming audio encoder: causal except for a fixed lookahead of `lookahead_samples`.

Each call takes the PCM of the chunk's C frames and the lookahead after them (C*640 + lookahead
samples, starting at the first frame of the chunk; the lookahead overlaps the next call) and
returns one token per frame of the chunk. Token t depends on audio up to lookahead samples after
the end of frame t and on nothing later. The state it returns describes the history up to the end
of frame s + C only, so the overlap is never counted twice.

A lookahead of Lw whole frames and a part of r mel hops (60 ms: Lw = 1, r = 2 of 4) works so:
the causal conv stack runs over whole frames up to t + Lw; the part-heard frame j = t + Lw + 1 gets
a pseudo feature from its r mel frames (`part_in`) that goes through the same conv stack as a last
frame (each layer sees the real history before it), and the lookahead conv takes it in place of
frame j. Every token thus sees exactly the lookahead, whatever its place in the chunk, and
streaming equals encoding the whole sequence. With r = 0 (checkpoints from before, 80 ms) it is the
plain whole-frame encoder.

Features are log-mel from a conv1d with a fixed DFT basis, which exports to ONNX, CoreML and MLX.
Own voice and partner voice share the encoder; a talk/listen mask gates them after extraction.

With `mel_norm_s` > 0, each log-mel frame has the running mean of the frames before it (and itself)
subtracted: an exponential average of time constant mel_norm_s, expanding until it has that much
history (cepstral mean normalization), over sound only, and silence is gated to zero
(`voice_gate`). Its state (the mean and the weight of the history) is one more static tensor,
`mel_state`, and it advances by the chunk's mel frames only, like pcm_state; within a call the
recurrence is a fixed [M, M] matrix (`mel_mean.py`), a constant in every export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import SAMPLE_RATE, SAMPLES_PER_FRAME, ModelConfig
from .constants import GATE_CENTER, GATE_FLOOR, GATE_WIDTH, READOUT_PAST
from .mel_mean import running_mean_weights
from .meta import shapes_only


def mel_filterbank(n_fft: int, n_mels: int, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """HTK-style triangular mel filters [n_freq, n_mels]."""

    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    n_freq = n_fft // 2 + 1
    if shapes_only():
        return torch.empty(n_freq, n_mels)
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
    if shapes_only():
        return torch.empty(2 * n_freq, 1, n_fft)
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_freq, dtype=torch.float64)[:, None]
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
    ang = 2 * math.pi * k * n / n_fft
    basis = torch.cat([torch.cos(ang) * window, -torch.sin(ang) * window], dim=0)
    return basis.float().unsqueeze(1)


def _windows(real: torch.Tensor, last: torch.Tensor, n: int) -> torch.Tensor:
    """Kernel windows side by side: window t = real[t .. t+n-1] then last[t], so that a stride-1
    conv of kernel n+1 gives window t's output at position t*(n+1) (the rest is discarded).
    real [B, H, >= C+n-1], last [B, H, C] -> [B, H, C*(n+1)]. Calling the conv module itself, not
    slices of its weight, keeps it one quantizable layer in every exported form."""
    b, h, c = last.shape
    taps = [real[:, :, m : m + c] for m in range(n)] + [last]
    return torch.stack(taps, dim=3).reshape(b, h, c * (n + 1))


def mean_weights(mels: int, decay: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """models/mel_mean.running_mean_weights as tensors (constants in a traced graph)."""
    tri, carry = running_mean_weights(mels, decay)
    return (
        torch.from_numpy(tri.copy()).to(device, dtype),
        torch.from_numpy(carry.copy()).to(device, dtype),
    )


def voice_gate(mel: torch.Tensor) -> torch.Tensor:
    """[N, M, mels] log-mel -> [N, M, 1] in (0, 1): how much each frame is sound, not silence."""
    energy = torch.logsumexp(mel, dim=2, keepdim=True)
    return torch.sigmoid((energy - GATE_CENTER) / GATE_WIDTH)


def normalize_mels(
    mel: torch.Tensor,  # [N, M, mels]
    state: torch.Tensor,  # [N, mels + 1]: running mean, weight of the history
    keep: int,  # the call's first `keep` mel frames advance the state
    decay: float,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,  # mean_weights(M, decay, ...)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated mel minus its running mean, and the state after frame keep - 1.

    The mean is of sound only: each frame counts by its voice gate (GATE_FLOOR when silent), so
    pauses, room tone and the idle stream's digital silence leave it where speech put it, and the
    mouth does not learn what the room sounds like. The output is gated too: silence is zero
    whatever its level, which a mean alone cannot say (room tone minus its own mean is zero-mean
    noise, like speech minus its own)."""
    n_mels = mel.shape[2]
    if weights is None:
        weights = mean_weights(mel.shape[1], decay, mel.device, mel.dtype)
    tri, carry = weights
    gate = voice_gate(mel)
    a = GATE_FLOOR + (1.0 - GATE_FLOOR) * gate  # [N, M, 1]
    mean0, w0 = state[:, None, :n_mels], state[:, None, n_mels:]  # [N, 1, mels], [N, 1, 1]
    total = torch.matmul(tri, a * mel) + carry[None, :, None] * (mean0 * w0)  # [N, M, mels]
    weight = torch.matmul(tri, a) + carry[None, :, None] * w0  # [N, M, 1]
    mean = total / weight
    out = torch.cat([mean[:, keep - 1], weight[:, keep - 1]], dim=1)
    return gate * (mel - mean), out


class MelNorm(nn.Module):
    """`normalize_mels` as a module, so that its exported nodes carry the scope `/mel_norm/`: the
    FP16 converter keeps them float (the running sums are log-mels times up to ~200 frames)."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        # The weights per call length and device, made once: not per chunk, and never by a host
        # copy inside a captured CUDA graph (the backend's warm-up call makes them first).
        self._weights: dict = {}

    def forward(self, mel, state, keep: int):
        key = (mel.shape[1], mel.device, mel.dtype)
        if key not in self._weights:
            self._weights[key] = mean_weights(mel.shape[1], self.decay, mel.device, mel.dtype)
        return normalize_mels(mel, state, keep, self.decay, self._weights[key])


class AudioEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.audio
        self.cfg = cfg
        self.mels_per_frame = SAMPLES_PER_FRAME // a.hop
        self.pcm_context = a.n_fft - a.hop  # samples of history the first STFT window needs
        self.whole = a.lookahead_samples // SAMPLES_PER_FRAME  # Lw: lookahead frames heard whole
        self.part = a.lookahead_samples % SAMPLES_PER_FRAME // a.hop  # r: mels of the next one
        self.register_buffer("dft", dft_basis(a.n_fft), persistent=False)
        self.register_buffer("melfb", mel_filterbank(a.n_fft, a.n_mels), persistent=False)
        self.frame_in = nn.Linear(a.n_mels * self.mels_per_frame, a.hidden)
        self.convs = nn.ModuleList(
            nn.Conv1d(a.hidden, a.hidden, a.kernel) for _ in range(a.conv_layers)
        )
        # Per-frame LayerNorm: statistics over channels only, so nothing leaks across time.
        self.norms = nn.ModuleList(nn.LayerNorm(a.hidden) for _ in range(a.conv_layers))
        # Lookahead head: token t sees features of frames t .. t+Lw, and the part-heard frame.
        self.lookahead_conv = nn.Conv1d(a.hidden, a.hidden, self.whole + 1 + (self.part > 0))
        if self.part:  # the part-heard frame's r mels -> a stand-in for its features
            self.part_in = nn.Linear(a.n_mels * self.part, a.hidden)
        self.mix = nn.Linear(2 * a.hidden + 1, a.token_dim)
        # per mel frame (one hop); 0 = no normalization (checkpoints from before)
        self.mel_decay = math.exp(-a.hop / SAMPLE_RATE / a.mel_norm_s) if a.mel_norm_s else 0.0
        if self.mel_decay:
            self.mel_norm = MelNorm(self.mel_decay)
        if a.readout_mix:  # the mouth readout, on the own voice's raw log-mels
            from .mouth_readout import MouthReadout

            self.readout = MouthReadout(cfg)

    def log_mel(self, pcm: torch.Tensor) -> torch.Tensor:
        """[B, samples] (with pcm_context samples of history) -> log-mel [B, M, mels], one per hop."""
        n_freq = self.cfg.audio.n_fft // 2 + 1
        spec = F.conv1d(pcm.unsqueeze(1), self.dft, stride=self.cfg.audio.hop)  # [B, 2F, M]
        power = spec[:, :n_freq] ** 2 + spec[:, n_freq:] ** 2
        return torch.log(torch.matmul(power.transpose(1, 2), self.melfb) + 1e-6)

    def features(self, pcm: torch.Tensor) -> torch.Tensor:
        """[B, samples] (with pcm_context samples of history) -> per-video-frame features [B, H, T]."""
        return self.frame_in(self._whole_frames(self.log_mel(pcm))).transpose(1, 2)

    def _whole_frames(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, M, mels] -> the whole video frames among them, mels side by side [B, T, 4*mels]."""
        b, m, n = mel.shape
        t = m // self.mels_per_frame
        return mel[:, : t * self.mels_per_frame].reshape(b, t, self.mels_per_frame * n)

    def _part_mels(self, mel: torch.Tensor, c: int) -> torch.Tensor:
        """The first r mels of frames Lw+1 .. C+Lw (the part-heard frame of each token): those of
        the chunk's later whole frames, then the tail of the call. [B, M, mels] -> [B, C, r*mels]."""
        b, _, n = mel.shape
        frames = self._whole_frames(mel)
        tail = mel[:, frames.shape[1] * self.mels_per_frame :].reshape(b, 1, self.part * n)
        if c == 1:
            return tail
        return torch.cat([frames[:, self.whole + 1 :, : self.part * n], tail], dim=1)

    def forward(
        self,
        pcm: torch.Tensor,  # [B, 2, C*640 + lookahead_samples]: own voice, partner voice
        talk_mask: torch.Tensor,  # [B, C]: 1 = the avatar speaks, 0 = it listens
        pcm_state: torch.Tensor,  # [B, 2, n_fft-hop]
        conv_state: torch.Tensor,  # [layers, 2B, H, kernel-1]
        mel_state: torch.Tensor | None = None,  # [B, 2, mels+1], when mel_norm_s > 0
        readout_norm: torch.Tensor | None = None,  # [B, mels+1], when readout_mix > 0
        readout_hist: torch.Tensor | None = None,  # [B, PAST*4, mels], when readout_mix > 0
        own_features: bool = False,  # return only the own voice's features [B, C, H] (fitting)
    ):
        b, c = talk_mask.shape
        full = torch.cat([pcm_state, pcm], dim=2)
        mel = self.log_mel(full.reshape(2 * b, full.shape[2]))  # own/partner as batch
        extra = {}
        readout = hasattr(self, "readout")
        if readout and (readout_norm is None or readout_hist is None):
            raise ValueError("this audio encoder has a mouth readout: pass its state")
        raw_own = mel.reshape(b, 2, *mel.shape[1:])[:, 0]  # the readout's own normalization
        if self.mel_decay:
            if mel_state is None:
                raise ValueError("this audio encoder normalizes its mels: pass mel_state")
            n = self.cfg.audio.n_mels
            mel, st = self.mel_norm(mel, mel_state.reshape(2 * b, n + 1), c * self.mels_per_frame)
            extra["mel_state_out"] = st.reshape(b, 2, n + 1)
        x = self.frame_in(self._whole_frames(mel)).transpose(1, 2)  # [2B, H, C+Lw]
        if self.part:
            p = self.part_in(self._part_mels(mel, c)).transpose(1, 2)  # [2B, H, C]
        keep = c * SAMPLES_PER_FRAME  # the state advances by the chunk, not the lookahead
        pcm_state_out = pcm[:, :, keep - self.pcm_context : keep]
        k = self.cfg.audio.kernel - 1
        lw = self.whole
        states = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            xin = torch.cat([conv_state[i], x], dim=2)  # [2B, H, k + C + Lw]
            states.append(xin[:, :, c : c + k])  # history ending at frame s + C
            if self.part:
                # Frame j = t+Lw+1 as the last frame of the causal kernel, after the real frames
                # j-k .. j-1 (xin t+Lw+1 .. t+Lw+k).
                z = _windows(xin[:, :, lw + 1 :], p, k)
                p = p + F.gelu(norm(conv(z)[:, :, :: k + 1].transpose(1, 2)).transpose(1, 2))
            x = x + F.gelu(norm(conv(xin).transpose(1, 2)).transpose(1, 2))
        if self.part:  # frames t .. t+Lw, then the stand-in for the part-heard one
            y = self.lookahead_conv(_windows(x, p, lw + 1))[:, :, :: lw + 2]
        else:
            y = self.lookahead_conv(x)
        y = y.reshape(b, 2, -1, c).transpose(2, 3)  # [B, 2, C, H]
        own, partner = y[:, 0], y[:, 1]
        if readout:  # reads the own voice's features before the speak/listen mix
            mouth, weight, norm_out, hist_out = self.readout(
                raw_own, c, readout_norm, readout_hist, own
            )
            extra.update(
                mouth=mouth,
                mouth_weight=weight,
                readout_norm_out=norm_out,
                readout_hist_out=hist_out,
            )
        if own_features:
            return own
        m = talk_mask.unsqueeze(2)  # [B, C, 1]
        tokens = self.mix(torch.cat([own * m, partner * (1.0 - m), m], dim=2))
        return {
            "audio_tokens": tokens,
            "pcm_state_out": pcm_state_out,
            "conv_state_out": torch.stack(states, dim=0),
            **extra,
        }

    def encode_sequence(
        self, pcm: torch.Tensor, talk_mask: torch.Tensor, own_features: bool = False
    ) -> torch.Tensor:
        """Whole clips in one call (training): pcm [B, 2, T*640], mask [B, T] -> tokens [B, T, A]
        (or, with own_features, the own voice's features [B, T, H] that the mouth readout reads).

        The end is padded with the lookahead in silence, as the scheduler's flush does; the start
        has zero state, as a new stream does. Equal to streaming the clip chunk by chunk.
        """
        b, t = talk_mask.shape
        a = self.cfg.audio
        pcm = F.pad(pcm, (0, a.lookahead_samples))
        pcm_state = pcm.new_zeros(b, 2, self.pcm_context)
        conv_state = pcm.new_zeros(a.conv_layers, 2 * b, a.hidden, a.kernel - 1)
        mel_state = pcm.new_zeros(b, 2, a.n_mels + 1) if self.mel_decay else None
        readout = {}
        if hasattr(self, "readout"):
            hist = pcm.new_zeros(b, self.readout.per * READOUT_PAST, a.n_mels)
            readout = {"readout_norm": pcm.new_zeros(b, a.n_mels + 1), "readout_hist": hist}
        out = self(
            pcm, talk_mask, pcm_state, conv_state, mel_state, **readout, own_features=own_features
        )
        return out if own_features else out["audio_tokens"]
