"""Appearance encoder (models/appearance.py): the photo -> features and its own motion."""

from __future__ import annotations

import mlx.nn as nn

from ...models.config import ModelConfig
from .layers import F32, Conv2d, Module, gelu


class ResConv(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = Conv2d(ch, ch, 3, padding=1)
        self.conv2 = Conv2d(ch, ch, 3, padding=1)

    def __call__(self, x):
        return x + self.conv2(gelu(self.conv1(gelu(x))))


class AppearanceEncoder(Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ca = cfg.render.app_channels
        self.down1 = Conv2d(3, ca // 2, 3, stride=2, padding=1)
        self.down2 = Conv2d(ca // 2, ca, 3, stride=2, padding=1)
        self.res = [ResConv(ca), ResConv(ca)]
        self.ref_head = nn.Linear(ca, cfg.motion_dim)

    def __call__(self, image):
        x = self.c(image.transpose(0, 2, 3, 1) * 2.0 - 1.0)  # [1, R, R, 3]
        x = self.down2(gelu(self.down1(x)))
        for blk in self.res:
            x = blk(x)
        x = x.astype(F32)
        ref = self.ref_head(self.c(x.mean(axis=(1, 2))))
        return {"app_feat": x.transpose(0, 3, 1, 2), "ref_motion": ref.astype(F32)}
