"""Warping decoder (models/decoder.py): motion -> RGB frames, batched over a chunk."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...models.config import REFINE_OUT_CHANNELS as OUT_CHANNELS
from ...models.config import ModelConfig
from ...models.constants import LIP_PRESS, LIP_ROLL, SHARP_ROWS
from .layers import (
    F32,
    Conv2d,
    Module,
    gelu,
    grid_sample,
    interpolate_bilinear,
    pixel_centres,
    pixel_shuffle,
)


def base_grid(h: int, w: int) -> np.ndarray:
    """models/decoder.base_grid in numpy: homogeneous pixel centres [h*w, 3], the same bits."""
    gy, gx = np.meshgrid(pixel_centres(h), pixel_centres(w), indexing="ij")
    return np.stack([gx, gy, np.ones_like(gx)], axis=-1).reshape(h * w, 3)


class Decoder(Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r = cfg.render
        p, ca, hd, rc = cfg.motion_dim, r.app_channels, r.hidden, r.refine_channels
        self.res = r.resolution
        self.feat = r.resolution // 4
        self.app_in = Conv2d(ca, hd, 3, padding=1)
        self.film = nn.Linear(p, 2 * hd)
        self.blocks = [Conv2d(hd, hd, 3, padding=1) for _ in range(r.flow_blocks)]
        self.flow_out = Conv2d(hd, 2, 3, padding=1)
        self.basis = Conv2d(ca, 3 * p, 3, padding=1)  # per parameter: flow (2) + alpha (1)
        self.affine = nn.Linear(p, 6)
        self.refine_in = Conv2d(ca + hd, hd, 3, padding=1)
        self.refine_up = Conv2d(hd, 4 * rc, 3, padding=1)
        self.refine_out = Conv2d(rc, 4 * OUT_CHANNELS, 3, padding=1)
        # The photo layers: their weights are in this file (the torch decoder owns them), but
        # only the appearance stage runs them (runtime/mlx/appearance.py: AppearanceStage).
        self.lip_in = Conv2d(ca, hd, 3, padding=1)  # the lip head (models/decoder.py)
        self.lip_mid = Conv2d(hd, hd, 3, padding=1)
        self.lip_out = Conv2d(hd, 3, 3, padding=1)
        self.lip_reach = mx.array([-2.0])
        self._grid0 = mx.array(base_grid(self.feat, self.feat))  # [hw*hw, 3]
        self._sharp = SHARP_ROWS * 2.0 / self.res
        self._identity = mx.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def __call__(self, app_feat, image, motion, dec_proj, dec_basis, dec_lips):
        m = motion[0]  # [C, P]
        (c, p), hw, res = m.shape, self.feat, self.res
        app = app_feat.transpose(0, 2, 3, 1)  # [1, h, w, Ca] float32
        img = image.transpose(0, 2, 3, 1)  # [1, R, R, 3] float32
        # Basis fields of the one reference (made by the appearance stage), mixed by the motion
        # (float32: it is geometry).
        basis = dec_basis.transpose(0, 2, 3, 1).reshape(hw * hw, p, 3)
        basis = basis.transpose(1, 0, 2).reshape(p, hw * hw * 3)
        lin = (m @ basis).reshape(c, hw, hw, 3)  # [C, h, w, (flow x, flow y, alpha)]
        gamma, beta = mx.split(self.film(self.c(m))[:, None, None, :], 2, axis=-1)
        proj = self.c(dec_proj.transpose(0, 2, 3, 1))  # [1, h, w, Hd]
        x = gelu(proj * (1.0 + gamma) + beta)  # [C, h, w, Hd]
        for conv in self.blocks:
            x = x + gelu(conv(x))
        # Geometry in float32 whatever the compute dtype.
        theta = (self._identity + self.affine(self.c(m)).astype(F32)).reshape(c, 2, 3)
        grid = (self._grid0 @ theta.transpose(0, 2, 1)).reshape(c, hw, hw, 2)
        grid = grid + (self.flow_out(x).astype(F32) + lin[..., :2])
        grid_full = interpolate_bilinear(grid, (res, res))
        wfeat = grid_sample(app, grid)  # [C, h, w, Ca]
        r = gelu(self.refine_in(mx.concatenate([self.c(wfeat), x], axis=-1)))
        r = gelu(pixel_shuffle(self.refine_up(r), 2))  # [C, R/2, R/2, rc]
        o = pixel_shuffle(self.refine_out(r), 2).astype(F32)  # [C, R, R, 6]
        grid_full = grid_full + o[..., 4:]
        grid_full = grid_full + self.closing(dec_lips.transpose(0, 2, 3, 1), grid_full, m)
        warped = grid_sample(img, grid_full)  # [C, R, R, 3]
        alpha = mx.sigmoid(o[..., 3:4] + interpolate_bilinear(lin[..., 2:], (res, res)))
        frames = warped * (1.0 - alpha) + mx.sigmoid(o[..., :3]) * alpha
        return {"frames": mx.clip(frames, 0.0, 1.0)}

    def closing(self, lips, grid_full, m):
        """The lip-closing displacement [C, R, R, 2] (models/decoder.py: Decoder.closing), from
        the photo's lip edges `lips` [1, 1, w, 3] (up, low, presence; the appearance stage's)."""
        # The edges of the photo column each output pixel looks at, read there (one-row sample).
        e = grid_sample(lips, grid_full)  # [C, R, R, 3]
        up, low, present = e[..., 0:1], e[..., 1:2], e[..., 2:3]
        half = mx.maximum(low - up, 0.0) * 0.5
        half = (half + LIP_ROLL * mx.tanh(half / LIP_ROLL)) * present
        off = grid_full[..., 1:2] - (up + low) * 0.5  # the photo row looked at, from the midline
        reach = mx.logaddexp(self.lip_reach.astype(F32), 0.0)  # softplus
        # the exponent capped as in models/decoder.py: past e^-60 only denormals, which are slow
        dy = (
            half
            * mx.tanh(off / self._sharp)
            * mx.exp(-mx.minimum((off / (reach + half)) ** 2, 60.0))
        )
        dy = dy * m[:, LIP_PRESS].astype(F32).reshape(-1, 1, 1, 1)
        return dy * mx.array([0.0, 1.0])
