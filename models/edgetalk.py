"""The EdgeTalk model family: four modules that share one config."""

from __future__ import annotations

from torch import nn

from .appearance import AppearanceEncoder
from .audio_encoder import AudioEncoder
from .config import ModelConfig
from .constants import MODULES
from .decoder import Decoder
from .generator import MotionGenerator


class EdgeTalkModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.appearance = AppearanceEncoder(cfg)
        self.audio = AudioEncoder(cfg)
        self.generator = MotionGenerator(cfg)
        self.decoder = Decoder(cfg)

    def module(self, name: str) -> nn.Module:
        if name not in MODULES:
            raise KeyError(f"unknown module {name!r}; modules are {MODULES}")
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
