"""What the MLX port needs that torch has and MLX lacks (models/sampling.py and torch.nn's).

Conv1d/Conv2d that `mlx.nn.quantize` turns into 8-bit `QuantizedConv` (im2col + quantized
matmul), exact GELU, F.grid_sample (border, align_corners=False; a Metal kernel on a Mac GPU),
F.interpolate (bilinear, align_corners=False) and F.pixel_shuffle, all channels-last; and
`Module`, the base that carries a module's compute dtype.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

F32 = mx.float32


def pixel_centres(n: int) -> np.ndarray:
    """Pixel-centre coordinates in [-1, 1] (align_corners=False), float32 op for op as torch's."""
    return (np.arange(n, dtype=np.float32) * 2 + 1) / n - 1


class Module(nn.Module):
    """Base: a compute dtype (float32, or float16 for fp16 bundles). I/O is always float32."""

    dtype = F32
    fp32_params: tuple[str, ...] = ()  # parameters that stay float32 in an fp16 file
    # Fixed arrays that are not parameters (names start with "_") but travel in the file.
    constant_names: tuple[str, ...] = ()

    @staticmethod
    def constant_shapes(cfg) -> dict[str, tuple[int, ...]]:
        return {}

    def constants(self) -> dict[str, mx.array]:
        return {k: getattr(self, k) for k in self.constant_names}

    def c(self, x: mx.array) -> mx.array:
        return x.astype(self.dtype)


class Conv1d(nn.Conv1d):
    """nn.Conv1d (weight [O, K, I]) that nn.quantize can turn into a QuantizedConv."""

    def to_quantized(self, group_size: int = 32, bits: int = 8, mode: str = "affine", **_):
        return QuantizedConv.from_conv(self, group_size, bits, mode)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (weight [O, kh, kw, I]) that nn.quantize can turn into a QuantizedConv."""

    def to_quantized(self, group_size: int = 32, bits: int = 8, mode: str = "affine", **_):
        return QuantizedConv.from_conv(self, group_size, bits, mode)


def _pair(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),)


def im2col(x: mx.array, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...]):
    """Channels-last patches: x [N, *spatial, I] -> [N, *out_spatial, prod(kernel) * I], ordered
    (tap, channel) like an MLX conv weight [O, *kernel, I] flattened to [O, prod(kernel) * I]."""
    nd = len(kernel)
    if any(padding):
        x = mx.pad(x, [(0, 0)] + [(p, p) for p in padding] + [(0, 0)])
    sizes = x.shape[1 : 1 + nd]
    out = [(s - k) // st + 1 for s, k, st in zip(sizes, kernel, stride, strict=True)]
    taps = []
    for offs in np.ndindex(*kernel):
        idx = (slice(None),) + tuple(
            slice(o, o + st * (n - 1) + 1, st) for o, st, n in zip(offs, stride, out, strict=True)
        )
        taps.append(x[idx])
    patches = mx.stack(taps, axis=-2)  # [N, *out, taps, I]
    return patches.reshape(*patches.shape[:-2], -1)


class QuantizedConv(nn.Module):
    """A 1-D or 2-D convolution on 8-bit (or any mx.quantize width) weights: im2col, then
    mx.quantized_matmul. The reduction dimension (taps * in_channels) is zero-padded up to a
    multiple of the group size so every convolution can be quantized."""

    def __init__(self, in_ch, out_ch, kernel, stride, padding, group_size, bits, mode="affine"):
        super().__init__()
        self.kernel, self.stride, self.padding = tuple(kernel), tuple(stride), tuple(padding)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.k_dim = int(np.prod(self.kernel)) * in_ch
        self.k_pad = -(-self.k_dim // group_size) * group_size
        self.weight, self.scales, self.biases = mx.quantize(
            mx.zeros((out_ch, self.k_pad)), group_size, bits, mode=mode
        )
        self.bias = mx.zeros((out_ch,))
        self.freeze()

    @classmethod
    def from_conv(cls, conv: nn.Module, group_size: int, bits: int, mode: str = "affine"):
        w = conv.weight  # [O, *kernel, I]
        if conv.groups != 1 or any(d != 1 for d in _pair(conv.dilation)):
            raise ValueError("QuantizedConv supports groups=1, dilation=1 only")
        nd = w.ndim - 2
        ks = tuple(w.shape[1:-1])
        st = _pair(conv.stride) * (nd if len(_pair(conv.stride)) == 1 else 1)
        pd = _pair(conv.padding) * (nd if len(_pair(conv.padding)) == 1 else 1)
        q = cls(w.shape[-1], w.shape[0], ks, st, pd, group_size, bits, mode)
        flat = w.astype(F32).reshape(w.shape[0], -1)
        flat = mx.pad(flat, [(0, 0), (0, q.k_pad - q.k_dim)])
        q.weight, q.scales, q.biases = mx.quantize(flat, group_size, bits, mode=mode)
        q.bias = conv.bias if "bias" in conv else mx.zeros((w.shape[0],))
        q.freeze()
        return q

    def __call__(self, x):
        cols = im2col(x, self.kernel, self.stride, self.padding)
        if self.k_pad != self.k_dim:
            cols = mx.pad(cols, [(0, 0)] * (cols.ndim - 1) + [(0, self.k_pad - self.k_dim)])
        y = mx.quantized_matmul(
            cols,
            self.weight,
            scales=self.scales,
            biases=self.biases,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        return y + self.bias


def gelu(x):
    """Exact GELU (erf), as torch's F.gelu / nn.GELU default."""
    return nn.gelu(x)


def _use_metal() -> bool:
    try:
        return bool(mx.metal.is_available()) and mx.default_device() == mx.gpu
    except AttributeError:
        return False


def grid_sample(inp: mx.array, grid: mx.array) -> mx.array:
    """F.grid_sample(mode="bilinear", padding_mode="border", align_corners=False), channels-last.

    inp [B, H, W, C] with B = 1 (shared by every grid) or B = N; grid [N, Ho, Wo, 2] holding
    (x, y) in [-1, 1]. Returns [N, Ho, Wo, C]. Gathers on the CPU; a Metal kernel on a Mac GPU.
    """
    if _use_metal():
        return _grid_sample_metal(inp, grid)
    return grid_sample_gather(inp, grid)


def grid_sample_gather(inp: mx.array, grid: mx.array) -> mx.array:
    b, h, w, ch = inp.shape
    n, ho, wo, _ = grid.shape
    grid = grid.astype(F32)
    # unnormalize (align_corners=False), then clip to the border, as torch does before weighting
    ix = mx.clip(((grid[..., 0] + 1.0) * w - 1.0) / 2.0, 0.0, w - 1)
    iy = mx.clip(((grid[..., 1] + 1.0) * h - 1.0) / 2.0, 0.0, h - 1)
    x0f, y0f = mx.floor(ix), mx.floor(iy)
    x1f, y1f = x0f + 1.0, y0f + 1.0
    nw = (x1f - ix) * (y1f - iy)
    ne = (ix - x0f) * (y1f - iy)
    sw = (x1f - ix) * (iy - y0f)
    se = (ix - x0f) * (iy - y0f)
    x0, y0 = x0f.astype(mx.int32), y0f.astype(mx.int32)
    # The far corner is out of range only when its weight is exactly 0; clamp the index.
    x1, y1 = mx.minimum(x0 + 1, w - 1), mx.minimum(y0 + 1, h - 1)
    flat = inp.reshape(b * h * w, ch)
    base = 0
    if b != 1:
        if b != n:
            raise ValueError(f"grid_sample: input batch {b} must be 1 or the grid's batch {n}")
        base = (mx.arange(n, dtype=mx.int32) * (h * w)).reshape(n, 1, 1)

    def tap(yi, xi):
        return mx.take(flat, (yi * w + xi + base).reshape(-1), axis=0).reshape(n, ho, wo, ch)

    return (
        tap(y0, x0) * nw[..., None]
        + tap(y0, x1) * ne[..., None]
        + tap(y1, x0) * sw[..., None]
        + tap(y1, x1) * se[..., None]
    )


_METAL_SOURCE = """
    uint elem = thread_position_in_grid.x;
    int B = inp_shape[0];
    int H = inp_shape[1];
    int W = inp_shape[2];
    int C = inp_shape[3];
    int gH = grid_shape[1];
    int gW = grid_shape[2];
    int total = grid_shape[0] * gH * gW * C;
    if ((int)elem >= total) return;
    int c = elem % C;
    int pix = elem / C;
    int n = pix / (gH * gW);
    float gx = grid[pix * 2];
    float gy = grid[pix * 2 + 1];
    float ix = clamp(((gx + 1.0f) * W - 1.0f) / 2.0f, 0.0f, (float)(W - 1));
    float iy = clamp(((gy + 1.0f) * H - 1.0f) / 2.0f, 0.0f, (float)(H - 1));
    float x0f = floor(ix);
    float y0f = floor(iy);
    int x0 = (int)x0f;
    int y0 = (int)y0f;
    int x1 = min(x0 + 1, W - 1);
    int y1 = min(y0 + 1, H - 1);
    float nw = (x0f + 1.0f - ix) * (y0f + 1.0f - iy);
    float ne = (ix - x0f) * (y0f + 1.0f - iy);
    float sw = (x0f + 1.0f - ix) * (iy - y0f);
    float se = (ix - x0f) * (iy - y0f);
    int b = B == 1 ? 0 : n;
    int base = b * H * W * C + c;
    float v = nw * (float)inp[base + (y0 * W + x0) * C]
            + ne * (float)inp[base + (y0 * W + x1) * C]
            + sw * (float)inp[base + (y1 * W + x0) * C]
            + se * (float)inp[base + (y1 * W + x1) * C];
    out[elem] = (T)v;
"""
_METAL_KERNEL = None


def _grid_sample_metal(inp: mx.array, grid: mx.array) -> mx.array:  # pragma: no cover - macOS
    global _METAL_KERNEL
    if _METAL_KERNEL is None:
        _METAL_KERNEL = mx.fast.metal_kernel(
            name="edgetalk_grid_sample_border",
            input_names=["inp", "grid"],
            output_names=["out"],
            source=_METAL_SOURCE,
        )
    n, ho, wo, _ = grid.shape
    shape = (n, ho, wo, inp.shape[3])
    (out,) = _METAL_KERNEL(
        inputs=[inp, grid.astype(F32)],
        template=[("T", inp.dtype)],
        output_shapes=[shape],
        output_dtypes=[inp.dtype],
        grid=(int(np.prod(shape)), 1, 1),
        threadgroup=(256, 1, 1),
    )
    return out


def _linear_taps(in_size: int, out_size: int):
    """torch's bilinear source indices/weights for align_corners=False (half-pixel centres,
    negative sources clamped to 0, the upper neighbour clamped at the edge), in float32."""
    scale = np.float32(in_size / out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int32)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    l0 = (np.float32(1.0) - l1).astype(np.float32)
    return i0, i1, l0, l1


def interpolate_bilinear(x: mx.array, size: tuple[int, int]) -> mx.array:
    """F.interpolate(mode="bilinear", align_corners=False) on channels-last x [N, H, W, C]."""
    _, h, w, _ = x.shape
    oh, ow = size
    i0, i1, l0, l1 = _linear_taps(w, ow)
    a = (
        mx.take(x, mx.array(i0), axis=2) * mx.array(l0)[:, None]
        + mx.take(x, mx.array(i1), axis=2) * mx.array(l1)[:, None]
    )
    i0, i1, l0, l1 = _linear_taps(h, oh)
    return (
        mx.take(a, mx.array(i0), axis=1) * mx.array(l0)[:, None, None]
        + mx.take(a, mx.array(i1), axis=1) * mx.array(l1)[:, None, None]
    )


def pixel_shuffle(x: mx.array, r: int) -> mx.array:
    """F.pixel_shuffle on channels-last x [N, H, W, C*r*r] -> [N, H*r, W*r, C]."""
    n, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(n, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(n, h * r, w * r, c)
