"""The EdgeTalk model family: four modules that share one config."""

from __future__ import annotations

from torch import nn

from .appearance import AppearanceEncoder
from .audio_encoder import AudioEncoder
from .config import ModelConfig
from .decoder import Decoder
from .generator import MotionGenerator

MODULES = ("appearance", "audio", "generator", "decoder")


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

    def set_streaming(self, cfg: ModelConfig) -> None:
        """Switch chunk/window/steps (weights are shared; only the static shapes change)."""
        self.cfg = cfg
        for name in MODULES:
            self.module(name).cfg = cfg
