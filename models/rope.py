"""Rotary position embedding applied from positions supplied by the host (RAPR).

Keys are cached un-rotated; every call rotates queries and all keys with the positions the
scheduler computes, so positions can be re-based without touching the cache.
"""

from __future__ import annotations

import torch


def rope_tables(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., head_dim/2] for float positions of any shape."""
    half = head_dim // 2
    inv = base ** (-torch.arange(half, dtype=torch.float32, device=pos.device) / half)
    ang = pos.to(torch.float32).unsqueeze(-1) * inv
    return torch.cos(ang), torch.sin(ang)


def full_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_tables' (cos, sin) over the whole head dim, [cos, cos] and [sin, sin]: with them
    apply_rope takes its one-product form, for graphs made once a call and used by every layer."""
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim of x by (cos, sin), which broadcast against
    x[..., :half], or against x itself when they are full_tables'. The full form gives the same
    values as x * cos + (x @ R) * sin, R the signed swap of the halves (x @ R = [-x2, x1], one
    product by +-1 per output: exact), in 4 graph nodes instead of 9; the exported generator
    rotates 36 times a call, and ONNX Runtime spends about a microsecond per node on values of
    a few hundred floats."""
    half = x.shape[-1] // 2
    if cos.shape[-1] == x.shape[-1]:
        eye = torch.eye(half, dtype=x.dtype, device=x.device)
        zero = torch.zeros_like(eye)
        r = torch.cat([torch.cat([zero, eye], 1), torch.cat([-eye, zero], 1)], 0)
        return x * cos + torch.matmul(x, r) * sin
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
