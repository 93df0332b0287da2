"""Motion generator (models/generator.py): flow-matching sampler over a KV-cached window."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...models.config import ModelConfig
from ...models.constants import NEG
from .layers import F32, Module
from .rope import apply_rope, rope_tables


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


class MotionGenerator(Module):
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

    def reference(self, ref_motion):
        """The reference token's keys and values, [layers, 1, heads, 1, hd] each
        (models/generator.py, MotionGenerator.reference): the avatar's alone, so the backend
        makes them once per avatar."""
        ref = (self.in_ref(self.c(ref_motion)) + self.ref_type)[:, None]  # [1, 1, D]
        keys, values = [], []
        for i, blk in enumerate(self.blocks):
            _, k, v = blk.qkv_heads(ref)
            keys.append(k)
            values.append(v)
            if i + 1 < len(self.blocks):
                ref = blk.finish(ref, v)
        return mx.stack(keys, axis=0), mx.stack(values, axis=0)

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
        ref_k=None,  # reference(ref_motion), made beforehand
        ref_v=None,
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

        if ref_k is None:
            ref_k, ref_v = self.reference(ref_motion)
        ref_kv = [(ref_k[i], ref_v[i]) for i in range(len(self.blocks))]

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
