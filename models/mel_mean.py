"""The running log-mel mean's recurrence in closed form, shared by the torch encoder and its MLX
port (torch-free: the MLX backend imports it without torch).

S_k = d S_(k-1) + a_k x_k and W_k = d W_(k-1) + a_k over one call of M frames are
S = tri @ (a x) + carry * S_(-1) and W = tri @ a + carry * W_(-1), with tri[k, j] = d^(k-j) for
j <= k and carry[k] = d^(k+1). Both depend only on M and d, fixed for a bundle, so they are made
once (in float64) and enter every graph as constants.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=16)
def running_mean_weights(mels: int, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """(tri [M, M], carry [M]) float32, read-only."""
    k = np.arange(mels, dtype=np.float64)
    gap = k[:, None] - k[None, :]
    tri = np.where(gap >= 0, decay ** np.maximum(gap, 0.0), 0.0).astype(np.float32)
    carry = (decay ** (k + 1)).astype(np.float32)
    tri.flags.writeable = carry.flags.writeable = False
    return tri, carry
