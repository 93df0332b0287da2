"""The mouth readout: a deterministic path from the audio to the mouth, beside the flow.

A linear map from a few frames of normalized log-mels (the own voice's, gated running mean as
`normalize_mels`, 2 s) and the audio encoder's own-voice features of the frame to the five MOUTH
parameters, fitted by ridge regression to the motion fitted to real talking video and to espeak
clips' motion (`training/fit_readout.py`). The log-mels carry what real mouths follow (loudness,
spectral shape, speaker-normalized); the encoder's features carry the phonetic cues it learned on
espeak (closures on p/b/m), which log-mels alone, linearly, do not. On held-out real speakers such a map
follows the real mouth better than the flow sampler does (`training/audio_probe.py`): a sampled
motion carries the sampler's noise and the generator's espeak habits; the readout is the
conditional mean of what real mouths do.

The scheduler mixes it into the motion it shows (`AudioConfig.readout_mix`), weighted per frame by
the voice gate: in speech the readout leads, in silence the generator keeps the mouth where it
was. The generator's own context (previous motion, KV cache) is never mixed, so it stays on the
motion it was trained on.

Streaming: token t reads the hops of frames t - PAST .. t + AHEAD. AHEAD is inside the lookahead
(60 ms covers the whole next frame), and the normalized hops of the last PAST frames travel as
state (`readout_hist`), with the running mean (`readout_norm`); both advance by the chunk only,
so streaming equals encoding the whole clip.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import SAMPLE_RATE, SAMPLES_PER_FRAME, ModelConfig
from .constants import READOUT_AHEAD as AHEAD
from .constants import READOUT_NORM_S as NORM_S
from .constants import READOUT_PAST as PAST
from .motion import MOUTH


def readout_features(cfg: ModelConfig) -> int:
    """Input width: PAST + 1 + AHEAD frames of mels_per_frame hops of n_mels, then the encoder's
    own-voice features of the frame (hidden)."""
    return (PAST + 1 + AHEAD) * (SAMPLES_PER_FRAME // cfg.audio.hop) * cfg.audio.n_mels + (
        cfg.audio.hidden
    )


def readout_decay(cfg: ModelConfig) -> float:
    return math.exp(-cfg.audio.hop / SAMPLE_RATE / NORM_S)


def context_windows(frames: torch.Tensor, c: int) -> torch.Tensor:
    """[B, PAST + c + AHEAD, F] per-frame features -> [B, c, (PAST + 1 + AHEAD) * F]: frame t's
    window is frames t .. t + PAST + AHEAD of the sequence (oldest first), side by side."""
    return torch.cat([frames[:, i : i + c] for i in range(PAST + 1 + AHEAD)], dim=2)


class MouthReadout(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from .audio_encoder import MelNorm  # the same gated mean as the encoder's

        a = cfg.audio
        self.per = SAMPLES_PER_FRAME // a.hop
        self.n_mels = a.n_mels
        if a.lookahead_samples < AHEAD * SAMPLES_PER_FRAME:
            raise ValueError(
                f"the mouth readout reads {AHEAD} frame(s) ahead; the lookahead is "
                f"{a.lookahead_samples} samples"
            )
        self.norm = MelNorm(readout_decay(cfg))
        self.linear = nn.Linear(readout_features(cfg), len(MOUTH))
        nn.init.zeros_(self.linear.weight)  # fitted, never trained: zero until fit_readout
        nn.init.zeros_(self.linear.bias)

    def forward(self, mel, c: int, norm_state, hist, own: torch.Tensor):
        """mel [B, M, mels]: the call's raw log-mels of the own voice (the chunk's whole frames,
        then the lookahead's hops); norm_state [B, mels + 1]; hist [B, PAST * per, mels]; own
        [B, C, hidden]: the encoder's own-voice features of the chunk's frames.
        -> mouth [B, C, 5], speech weight [B, C] (the frames' mean voice gate), and the states."""
        from .audio_encoder import voice_gate

        b, per, keep = mel.shape[0], self.per, c * self.per
        z, norm_out = self.norm(mel, norm_state, keep)  # gated, normalized: silence is 0
        seq = torch.cat([hist, z], dim=1)  # [B, PAST*per + M, mels]
        n = PAST + c + AHEAD
        frames = seq[:, : n * per].reshape(b, n, per * self.n_mels)
        mouth = self.linear(torch.cat([context_windows(frames, c), own], dim=2))
        weight = voice_gate(mel[:, :keep]).reshape(b, c, per).mean(dim=2)
        hist_out = seq[:, keep : keep + PAST * per]  # the last PAST frames up to frame s + C
        return mouth, weight, norm_out, hist_out
