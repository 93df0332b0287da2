"""MLX port of the four streaming modules (mlx.core / mlx.nn), in the flat style of mlx-lm.

The math is the PyTorch modules' (models/*.py `forward`), op for op: exact (erf) GELU, LayerNorm
eps 1e-5, the fixed DFT-basis conv1d and mel filterbank built from the same functions, bilinear
grid_sample (border padding, align_corners=False) and bilinear resizing with torch's half-pixel
rule. MLX is channels-last, so each module transposes at its boundary: the arrays that enter and
leave `__call__` have exactly the layouts of models/io_spec.py.

Parameter names equal the torch state-dict keys; `torch_to_mlx` only transposes conv weights
(conv2d OIHW -> OHWI, conv1d OIK -> OKI).

Precision: `set_precision(module, "fp16")` makes convolutions, linears, norms and attention run in
float16 (the weights are stored in float16). The numerically fragile parts stay float32 as in the
ONNX export: the DFT/log-mel front end, RoPE and time-embedding tables, the Euler state of the
sampler, and everything that resamples (affine grid, flow, interpolation, grid_sample, blending).
For int8, `Conv1d`/`Conv2d` here define `to_quantized`, so `mlx.nn.quantize` turns them into
`QuantizedConv` (im2col + `mx.quantized_matmul` on 8-bit weights) just as it turns Linear layers
into QuantizedLinear.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.config import REFINE_OUT_CHANNELS as OUT_CHANNELS
from ..models.config import SAMPLES_PER_FRAME, ModelConfig
from ..models.decoder import LIP_PRESS, LIP_ROLL, PRESENCE_FILL, SHARP_ROWS

F32 = mx.float32
NEG = -1e4  # the generator's additive mask value (models/generator.py)
MODULE_NAMES = ("appearance", "audio", "generator", "decoder")


# ---- layers --------------------------------------------------------------------------------------
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


# ---- resampling ----------------------------------------------------------------------------------
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


# ---- modules -------------------------------------------------------------------------------------
class _Module(nn.Module):
    """Base: a compute dtype (float32, or float16 for fp16 bundles). I/O is always float32."""

    dtype = F32
    fp32_params: tuple[str, ...] = ()  # parameters that stay float32 in an fp16 file

    def c(self, x: mx.array) -> mx.array:
        return x.astype(self.dtype)


class ResConv(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = Conv2d(ch, ch, 3, padding=1)
        self.conv2 = Conv2d(ch, ch, 3, padding=1)

    def __call__(self, x):
        return x + self.conv2(gelu(self.conv1(gelu(x))))


class AppearanceEncoder(_Module):
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


class AudioEncoder(_Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from ..models.audio_encoder import dft_basis, mel_filterbank

        a = cfg.audio
        self.cfg = cfg
        self.mels_per_frame = SAMPLES_PER_FRAME // a.hop
        self.pcm_context = a.n_fft - a.hop
        # Fixed front end (not parameters: leading underscore), always float32.
        self._dft = mx.array(dft_basis(a.n_fft).numpy().transpose(0, 2, 1))  # [2F, n_fft, 1]
        self._melfb = mx.array(mel_filterbank(a.n_fft, a.n_mels).numpy())  # [F, mels]
        self.frame_in = nn.Linear(a.n_mels * self.mels_per_frame, a.hidden)
        self.convs = [Conv1d(a.hidden, a.hidden, a.kernel) for _ in range(a.conv_layers)]
        self.norms = [nn.LayerNorm(a.hidden, eps=1e-5) for _ in range(a.conv_layers)]
        self.lookahead_conv = Conv1d(a.hidden, a.hidden, a.lookahead + 1)
        self.mix = nn.Linear(2 * a.hidden + 1, a.token_dim)

    def features(self, pcm):
        """[B, samples] -> per-video-frame features [B, T, H] (channels-last)."""
        n_freq = self.cfg.audio.n_fft // 2 + 1
        spec = mx.conv1d(pcm[:, :, None], self._dft, stride=self.cfg.audio.hop)  # [B, M, 2F]
        power = spec[..., :n_freq] ** 2 + spec[..., n_freq:] ** 2
        mel = mx.log(power @ self._melfb + 1e-6)  # [B, M, mels]
        b, m, n = mel.shape
        frames = mel.reshape(b, m // self.mels_per_frame, self.mels_per_frame * n)
        return self.frame_in(self.c(frames))

    def __call__(self, pcm, talk_mask, pcm_state, conv_state):
        b, c = talk_mask.shape
        full = mx.concatenate([pcm_state, pcm], axis=2)
        x = self.features(full.reshape(2 * b, full.shape[2]))  # [2B, C+L, H]
        keep = c * SAMPLES_PER_FRAME
        pcm_state_out = pcm[:, :, keep - self.pcm_context : keep]
        k = self.cfg.audio.kernel - 1
        state = self.c(conv_state.transpose(0, 1, 3, 2))  # [layers, 2B, k, H]
        states = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            xin = mx.concatenate([state[i], x], axis=1)  # [2B, k + C + L, H]
            states.append(xin[:, c : c + k])
            x = x + gelu(norm(conv(xin)))
        y = self.lookahead_conv(x).reshape(b, 2, c, -1)  # [B, 2, C, H]
        own, partner = y[:, 0], y[:, 1]
        m = self.c(talk_mask[:, :, None])
        tokens = self.mix(mx.concatenate([own * m, partner * (1.0 - m), m], axis=2))
        return {
            "audio_tokens": tokens.astype(F32),
            "pcm_state_out": pcm_state_out,
            "conv_state_out": mx.stack(states, axis=0).transpose(0, 1, 3, 2).astype(F32),
        }


def rope_tables(pos: mx.array, head_dim: int, base: float):
    half = head_dim // 2
    inv = mx.array((base ** (-np.arange(half, dtype=np.float32) / half)).astype(np.float32))
    ang = pos.astype(F32)[..., None] * inv
    return mx.cos(ang), mx.sin(ang)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def time_embedding(t: mx.array, dim: int) -> mx.array:
    half = dim // 2
    freqs = mx.array(np.exp(-math.log(1000.0) * np.arange(half, dtype=np.float32) / half))
    ang = (t.astype(F32) * 1000.0)[..., None] * freqs.astype(F32)
    return mx.concatenate([mx.sin(ang), mx.cos(ang)], axis=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = [nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)]

    def qkv_heads(self, x):
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def finish(self, x, attn):
        b, h, t, hd = attn.shape
        x = x + self.proj(attn.transpose(0, 2, 1, 3).reshape(b, t, h * hd))
        y = self.norm2(x)
        for layer in self.mlp:
            y = layer(y)
        return x + y


def masked_attention(q, k, v, bias):
    scores = (q @ k.swapaxes(-1, -2)) * (q.shape[-1] ** -0.5) + bias
    return mx.softmax(scores, axis=-1, precise=True) @ v


class MotionGenerator(_Module):
    fp32_params = ("motion_mean", "motion_std")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        g = cfg.generator
        self.cfg = cfg
        p, d = cfg.motion_dim, g.dim
        self.in_x = nn.Linear(p, d)
        self.in_audio = nn.Linear(cfg.audio.token_dim, d)
        self.in_prev = nn.Linear(p, d)
        self.in_mask = nn.Linear(1, d)
        self.in_ref = nn.Linear(p, d)
        self.ref_type = mx.zeros((d,))
        self.time_mlp = [nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d)]
        self.blocks = [Block(d, g.heads, g.mlp_ratio) for _ in range(g.layers)]
        self.out_norm = nn.LayerNorm(d, eps=1e-5)
        self.out = nn.Linear(d, p)
        self.motion_mean = mx.zeros((p,))
        self.motion_std = mx.ones((p,))

    def tokens(self, x, t, cond):
        temb = self.c(time_embedding(t, self.cfg.generator.dim))
        for layer in self.time_mlp:
            temb = layer(temb)
        return self.in_x(self.c(x)) + temb + cond

    def __call__(
        self,
        audio_tokens,
        talk_mask,
        ref_motion,
        prev_motion,
        noise,
        k_cache,
        v_cache,
        cache_valid,
        cache_pos,
        query_pos,
    ):
        g = self.cfg.generator
        c = audio_tokens.shape[1]
        hd = self.cfg.head_dim
        mean, std = self.motion_mean.astype(F32), self.motion_std.astype(F32)
        prev = mx.broadcast_to(((prev_motion - mean) / std)[:, None], (1, c, prev_motion.shape[1]))
        cond = (
            self.in_audio(self.c(audio_tokens))
            + self.in_mask(self.c(talk_mask[..., None]))
            + self.in_prev(self.c(prev))
        )

        ref = (self.in_ref(self.c(ref_motion)) + self.ref_type)[:, None]  # [1, 1, D]
        ref_kv = []
        for blk in self.blocks:
            _, k, v = blk.qkv_heads(ref)
            ref_kv.append((k, v))
            ref = blk.finish(ref, v)

        zero = mx.zeros_like(cache_pos[:, :1])
        cos_q, sin_q = (self.c(z[:, None]) for z in rope_tables(query_pos, hd, g.rope_base))
        cos_k, sin_k = rope_tables(mx.concatenate([zero, cache_pos], axis=1), hd, g.rope_base)
        cos_k, sin_k = self.c(cos_k[:, None]), self.c(sin_k[:, None])
        k_cache, v_cache = self.c(k_cache), self.c(v_cache)
        ctx_k, ctx_v = [], []
        for i, (rk, rv) in enumerate(ref_kv):
            keys = mx.concatenate([rk, k_cache[i]], axis=2)
            ctx_k.append(apply_rope(keys, cos_k, sin_k))
            ctx_v.append(mx.concatenate([rv, v_cache[i]], axis=2))
        valid = mx.concatenate([mx.ones_like(zero), cache_valid, mx.ones_like(query_pos)], axis=1)
        bias = self.c(((1.0 - valid) * NEG).reshape(1, 1, 1, -1))

        def run(h, collect):
            new_k, new_v = [], []
            for i, blk in enumerate(self.blocks):
                q, k, v = blk.qkv_heads(h)
                if collect:
                    new_k.append(k)
                    new_v.append(v)
                q = apply_rope(q, cos_q, sin_q)
                keys = mx.concatenate([ctx_k[i], apply_rope(k, cos_q, sin_q)], axis=2)
                vals = mx.concatenate([ctx_v[i], v], axis=2)
                h = blk.finish(h, masked_attention(q, keys, vals, bias))
            return h, new_k, new_v

        x = noise  # the sampler's state stays float32
        steps = g.steps
        for n in range(steps):
            t = mx.full(talk_mask.shape, n / steps, dtype=F32)
            h, _, _ = run(self.tokens(x, t, cond), collect=False)
            x = x + self.out(self.out_norm(h)).astype(F32) / steps
        _, new_k, new_v = run(self.tokens(x, mx.ones_like(talk_mask), cond), collect=True)
        return {
            "motion": x * std + mean,
            "new_k": mx.stack(new_k, axis=0).astype(F32),
            "new_v": mx.stack(new_v, axis=0).astype(F32),
        }


class Decoder(_Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from ..models.decoder import base_grid

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
        self.lip_in = Conv2d(ca, hd, 3, padding=1)  # the lip head (models/decoder.py)
        self.lip_mid = Conv2d(hd, hd, 3, padding=1)
        self.lip_out = Conv2d(hd, 3, 3, padding=1)
        self.lip_reach = mx.array([-2.0])
        self._grid0 = mx.array(base_grid(self.feat, self.feat).numpy())  # [hw*hw, 3]
        feat_rows = (np.arange(self.feat, dtype=np.float32) * 2 + 1) / self.feat - 1
        self._feat_rows = mx.array(feat_rows.reshape(1, -1, 1, 1))  # channels-last: axis 1
        self._sharp = SHARP_ROWS * 2.0 / self.res
        self._identity = mx.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def __call__(self, app_feat, image, motion):
        m = motion[0]  # [C, P]
        (c, p), hw, res = m.shape, self.feat, self.res
        app = app_feat.transpose(0, 2, 3, 1)  # [1, h, w, Ca] float32
        img = image.transpose(0, 2, 3, 1)  # [1, R, R, 3] float32
        # Basis fields of the one reference, mixed by the motion (float32: it is geometry).
        basis = self.basis(self.c(app)).astype(F32).reshape(hw * hw, p, 3)
        basis = basis.transpose(1, 0, 2).reshape(p, hw * hw * 3)
        lin = (m @ basis).reshape(c, hw, hw, 3)  # [C, h, w, (flow x, flow y, alpha)]
        gamma, beta = mx.split(self.film(self.c(m))[:, None, None, :], 2, axis=-1)
        x = gelu(self.app_in(self.c(app)) * (1.0 + gamma) + beta)  # [C, h, w, Hd]
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
        grid_full = grid_full + self.closing(app, grid_full, m)
        warped = grid_sample(img, grid_full)  # [C, R, R, 3]
        alpha = mx.sigmoid(o[..., 3:4] + interpolate_bilinear(lin[..., 2:], (res, res)))
        frames = warped * (1.0 - alpha) + mx.sigmoid(o[..., :3]) * alpha
        return {"frames": mx.clip(frames, 0.0, 1.0)}

    def closing(self, app, grid_full, m):
        """The lip-closing displacement [C, R, R, 2] (models/decoder.py: Decoder.closing)."""
        feat_rows = self._feat_rows
        logits = self.lip_out(gelu(self.lip_mid(gelu(self.lip_in(self.c(app))))))
        logits = logits.astype(F32)  # [1, h, w, 3]
        up = (mx.softmax(logits[..., 0:1], axis=1) * feat_rows).sum(axis=1, keepdims=True)
        low = (mx.softmax(logits[..., 1:2], axis=1) * feat_rows).sum(axis=1, keepdims=True)
        present = _close_columns(mx.sigmoid(logits[..., 2:3].max(axis=1, keepdims=True)))
        # The edges of the photo column each output pixel looks at, read there (one-row sample).
        e = grid_sample(mx.concatenate([up, low, present], axis=-1), grid_full)  # [C, R, R, 3]
        up, low, present = e[..., 0:1], e[..., 1:2], e[..., 2:3]
        half = mx.maximum(low - up, 0.0) * 0.5
        half = (half + LIP_ROLL * mx.tanh(half / LIP_ROLL)) * present
        off = grid_full[..., 1:2] - (up + low) * 0.5  # the photo row looked at, from the midline
        reach = mx.logaddexp(self.lip_reach.astype(F32), 0.0)  # softplus
        dy = half * mx.tanh(off / self._sharp) * mx.exp(-((off / (reach + half)) ** 2))
        dy = dy * m[:, LIP_PRESS].astype(F32).reshape(-1, 1, 1, 1)
        return dy * mx.array([0.0, 1.0])


def _close_columns(x, k: int = PRESENCE_FILL):
    """decoder.close_columns for [B, 1, W, C]: a max, then a min, over 2k+1 columns."""

    def max_over(v):
        pad = mx.full(v.shape[:2] + (k,) + v.shape[3:], -mx.inf, dtype=v.dtype)
        p = mx.concatenate([pad, v, pad], axis=2)
        w = v.shape[2]
        return mx.max(mx.stack([p[:, :, i : i + w] for i in range(2 * k + 1)]), axis=0)

    return -max_over(-max_over(x))


CLASSES = {
    "appearance": AppearanceEncoder,
    "audio": AudioEncoder,
    "generator": MotionGenerator,
    "decoder": Decoder,
}


def build(part: str, cfg: ModelConfig) -> _Module:
    if part not in CLASSES:
        raise KeyError(f"unknown module {part!r}; modules are {MODULE_NAMES}")
    return CLASSES[part](cfg)


# ---- weights and precision -----------------------------------------------------------------------
def torch_to_mlx(torch_module) -> dict[str, np.ndarray]:
    """The torch module's state dict as float32 numpy arrays in MLX layouts (same key names)."""
    from torch import nn as tnn

    conv2d = {n for n, m in torch_module.named_modules() if isinstance(m, tnn.Conv2d)}
    conv1d = {n for n, m in torch_module.named_modules() if isinstance(m, tnn.Conv1d)}
    out = {}
    for key, t in torch_module.state_dict().items():
        a = t.detach().cpu().float().numpy()
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in conv2d:
            a = a.transpose(0, 2, 3, 1)  # OIHW -> OHWI
        elif leaf == "weight" and owner in conv1d:
            a = a.transpose(0, 2, 1)  # OIK -> OKI
        out[key] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def quantizable(path: str, module: nn.Module, group_size: int) -> bool:
    """Which layers int8 covers: every convolution (K is zero-padded to the group size) and every
    Linear whose input dimension is a multiple of the group size."""
    if isinstance(module, (Conv1d, Conv2d)):
        return True
    if isinstance(module, nn.Linear):
        return module.weight.shape[-1] % group_size == 0
    return False


def float_layers(module: nn.Module) -> list[str]:
    """Paths of the compute layers that are not quantized."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return sorted(p for p, m in module.named_modules() if isinstance(m, kinds) and p)


def quantized_layers(module: nn.Module) -> list[str]:
    kinds = (nn.QuantizedLinear, QuantizedConv)
    return sorted(p for p, m in module.named_modules() if isinstance(m, kinds))


def apply_precision(
    module: _Module,
    precision: str,
    group_size: int = 32,
    bits: int = 8,
    only: list[str] | None = None,
) -> _Module:
    """Turn a float32 module (weights loaded or not) into the precision's structure.

    fp16: every parameter cast to float16 and float16 compute. int8: nn.quantize over the layers
    that `quantizable` accepts (or exactly the paths in `only`, when loading a saved file)."""
    if precision == "fp32":
        return module
    if precision == "fp16":
        keep = {k: getattr(module, k) for k in module.fp32_params}
        module.set_dtype(mx.float16)
        for k, v in keep.items():
            setattr(module, k, v)
        module.dtype = mx.float16
        return module
    if precision == "int8":
        chosen = set(only) if only is not None else None

        def pred(path, m):
            if not hasattr(m, "to_quantized"):
                return False
            return path in chosen if chosen is not None else quantizable(path, m, group_size)

        nn.quantize(module, group_size=group_size, bits=bits, mode="affine", class_predicate=pred)
        return module
    raise ValueError(f"unknown precision {precision!r}")


def to_mx_inputs(inputs: dict[str, np.ndarray], names) -> dict[str, mx.array]:
    return {n: mx.array(np.ascontiguousarray(inputs[n], dtype=np.float32)) for n in names}
