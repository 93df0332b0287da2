"""Rotary position embedding (models/rope.py), tables in float32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .layers import F32


def rope_tables(pos: mx.array, head_dim: int, base: float):
    half = head_dim // 2
    inv = mx.array((base ** (-np.arange(half, dtype=np.float32) / half)).astype(np.float32))
    ang = pos.astype(F32)[..., None] * inv
    return mx.cos(ang), mx.sin(ang)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
