"""Appearance encoder: runs once per avatar. Reference image -> feature map + reference motion token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class ResConv(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class AppearanceEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ca = cfg.render.app_channels
        self.down1 = nn.Conv2d(3, ca // 2, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(ca // 2, ca, 3, stride=2, padding=1)
        self.res = nn.Sequential(ResConv(ca), ResConv(ca))
        # The reference token that opens the generator's sink: an identity/style code in the
        # motion space, learned with the generator.
        self.ref_head = nn.Linear(ca, cfg.motion_dim)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image [1, 3, R, R] in [0, 1] -> app_feat [1, Ca, R/4, R/4], ref_motion [1, P]."""
        x = F.gelu(self.down1(image * 2.0 - 1.0))
        x = self.res(self.down2(x))
        return {"app_feat": x, "ref_motion": self.ref_head(x.mean(dim=(2, 3)))}
