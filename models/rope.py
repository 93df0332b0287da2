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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim of x by (cos, sin), which broadcast against x[..., :half]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
