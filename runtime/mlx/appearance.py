"""The appearance stage (models/edgetalk.py: AppearanceStage): the appearance encoder
(models/appearance.py: the photo -> features and its own motion), then the decoder's photo-only
work (models/decoder.py: Decoder.prepare), once per avatar."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...models.config import ModelConfig
from ...models.constants import PRESENCE_FILL
from .layers import F32, Conv2d, Module, gelu, pixel_centres


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


class AppearanceStage(Module):
    """The contract's "appearance" module. Its layer names are the torch stage's: the encoder
    under `appearance`, the decoder's photo layers under their own names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r = cfg.render
        p, ca, hd = cfg.motion_dim, r.app_channels, r.hidden
        feat = r.resolution // 4
        self.appearance = AppearanceEncoder(cfg)
        self.app_in = Conv2d(ca, hd, 3, padding=1)
        self.basis = Conv2d(ca, 3 * p, 3, padding=1)  # per parameter: flow (2) + alpha (1)
        self.lip_in = Conv2d(ca, hd, 3, padding=1)
        self.lip_mid = Conv2d(hd, hd, 3, padding=1)
        self.lip_out = Conv2d(hd, 3, 3, padding=1)
        self._feat_rows = mx.array(pixel_centres(feat).reshape(1, -1, 1, 1))  # channels-last

    def __call__(self, image):
        self.appearance.dtype = (
            self.dtype
        )  # one precision for the stage (apply_precision sets ours)
        out = self.appearance(image)
        app = self.c(out["app_feat"].transpose(0, 2, 3, 1))  # [1, h, w, Ca]
        proj = self.app_in(app).astype(F32)
        basis = self.basis(app).astype(F32)
        logits = self.lip_out(gelu(self.lip_mid(gelu(self.lip_in(app))))).astype(F32)
        rows = self._feat_rows
        up = (mx.softmax(logits[..., 0:1], axis=1) * rows).sum(axis=1, keepdims=True)
        low = (mx.softmax(logits[..., 1:2], axis=1) * rows).sum(axis=1, keepdims=True)
        present = _close_columns(mx.sigmoid(logits[..., 2:3].max(axis=1, keepdims=True)))
        lips = mx.concatenate([up, low, present], axis=-1)  # [1, 1, w, 3]
        return {
            **out,
            "dec_proj": proj.transpose(0, 3, 1, 2),
            "dec_basis": basis.transpose(0, 3, 1, 2),
            "dec_lips": lips.transpose(0, 3, 1, 2),
        }


def _close_columns(x, k: int = PRESENCE_FILL):
    """decoder.close_columns for [B, 1, W, C]: a max, then a min, over 2k+1 columns."""

    def max_over(v):
        pad = mx.full(v.shape[:2] + (k,) + v.shape[3:], -mx.inf, dtype=v.dtype)
        p = mx.concatenate([pad, v, pad], axis=2)
        w = v.shape[2]
        return mx.max(mx.stack([p[:, :, i : i + w] for i in range(2 * k + 1)]), axis=0)

    return -max_over(-max_over(x))
