"""The EdgeTalk model family: four modules that share one config."""

from __future__ import annotations

import torch
from torch import nn

from .appearance import AppearanceEncoder
from .audio_encoder import AudioEncoder
from .config import ModelConfig
from .constants import MODULES
from .decoder import Decoder
from .generator import MotionGenerator

# The decoder's layers that read the photo only (Decoder.prepare). The appearance stage runs
# them once per avatar, so they belong to its artifact; the decoder's artifact never runs them.
PHOTO_LAYERS = ("app_in", "basis", "lip_in", "lip_mid", "lip_out")


class AppearanceStage(nn.Module):
    """The contract's "appearance" module: the appearance encoder, then the decoder's photo-only
    work (Decoder.prepare), both once per avatar. Its children are the model's own layers
    (shared, not copied), named as the MLX port names them."""

    def __init__(self, appearance: AppearanceEncoder, decoder: Decoder):
        super().__init__()
        self.appearance = appearance
        for name in PHOTO_LAYERS:
            self.add_module(name, getattr(decoder, name))
        # unregistered: the stage runs decoder.prepare without owning the decoder's other layers
        object.__setattr__(self, "_decoder", decoder)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.appearance(image)
        return {**out, **self._decoder.prepare(out["app_feat"])}


class EdgeTalkModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.appearance = AppearanceEncoder(cfg)
        self.audio = AudioEncoder(cfg)
        self.generator = MotionGenerator(cfg)
        self.decoder = Decoder(cfg)

    def module(self, name: str) -> nn.Module:
        """The module the streaming contract calls `name` (models/io_spec.py)."""
        if name not in MODULES:
            raise KeyError(f"unknown module {name!r}; modules are {MODULES}")
        if name == "appearance":
            return AppearanceStage(self.appearance, self.decoder)
        return getattr(self, name)

    def for_streaming(self, cfg: ModelConfig) -> EdgeTalkModel:
        """A model for other streaming settings (chunk, window, steps) that shares this
        one's weights. Each backend builds its own, so two backends never share a chunk size
        through a mutable config; the weights are the same tensors, not copies."""
        if cfg.architecture() != self.cfg.architecture():
            raise ValueError("for_streaming changes streaming settings only, not the architecture")
        twin = EdgeTalkModel(cfg)
        # assign=True: the twin holds these very tensors (no copy, no extra memory); buffers that
        # are not saved (filterbanks, grids) are rebuilt for the new shapes by the constructor.
        twin.load_state_dict(self.state_dict(), assign=True)
        return twin.train(self.training)
