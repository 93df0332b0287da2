"""Block-causal flow-matching motion generator with a static KV cache, a reference sink and RAPR.

Two entry points share every weight:
- `forward` is one streaming step: a chunk of C frames against a fixed-shape cache. It samples the
  chunk with N Euler steps from the supplied noise, then runs the clean chunk once more to produce
  the K/V that the scheduler writes into the cache. Keys leave un-rotated.
- `forward_parallel` runs a whole sequence in one pass with the equivalent block-causal mask
  (training, and the streaming-equivalence test).

Attention inside a chunk is bidirectional; across chunks it is causal. The reference token is an
input, recomputed each call (one token, negligible cost), so it can never be evicted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .constants import NEG
from .rope import apply_rope, full_tables, rope_tables


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow time t in [0, 1]; t has any shape, output [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = (t.to(torch.float32) * 1000.0).unsqueeze(-1) * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, D] -> q, k, v as [B, heads, T, head_dim]."""
        b, t, d = x.shape
        # heads of q, k and v side by side, then split: an unbind exports as a split and three
        # squeezes, for each of the generator's 20 block passes a call
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3 * self.heads, d // self.heads)
        q, k, v = qkv.transpose(1, 2).split(self.heads, dim=1)
        return q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual after attention ([B, heads, T, hd]) and the MLP."""
        b, h, t, hd = attn.shape
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, h * hd))
        return x + self.mlp(self.norm2(x))


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Softmax attention with an additive bias (0 or a large negative) broadcast to the scores."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class MotionGenerator(nn.Module):
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
        self.ref_type = nn.Parameter(torch.zeros(d))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(d, g.heads, g.mlp_ratio) for _ in range(g.layers))
        self.out_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, p)
        # Flow matching runs in a unit-variance motion space; the statistics come from training
        # data and travel in the checkpoint. Inputs and outputs stay in raw motion units.
        self.register_buffer("motion_mean", torch.zeros(p))
        self.register_buffer("motion_std", torch.ones(p))

    def normalize(self, motion: torch.Tensor) -> torch.Tensor:
        return (motion - self.motion_mean) / self.motion_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.motion_std + self.motion_mean

    # ---- token embeddings -------------------------------------------------------------------
    def condition(self, audio_tokens, talk_mask, prev_motion) -> torch.Tensor:
        """Per-frame conditioning [B, T, D] (audio, talk/listen, previous motion)."""
        return (
            self.in_audio(audio_tokens)
            + self.in_mask(talk_mask.unsqueeze(-1))
            + self.in_prev(prev_motion)
        )

    def tokens(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Motion x [B, T, P] at flow time t [B, T] -> tokens [B, T, D]."""
        temb = self.time_mlp(time_embedding(t, self.cfg.generator.dim))
        return self.in_x(x) + temb + cond

    def ref_token(self, ref_motion: torch.Tensor) -> torch.Tensor:
        return (self.in_ref(ref_motion) + self.ref_type).unsqueeze(1)  # [B, 1, D]

    def velocity(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.out_norm(h))

    def reference(self, ref_motion: torch.Tensor) -> tuple[list, list]:
        """The reference token's keys and values in every layer ([1, heads, 1, hd] each): the
        sink's first slot. They depend on the avatar's reference motion alone, so a backend may
        make them once per avatar and pass them to forward (`ref_kv`): one of the five passes
        over the layers' weights in a call. The reference attends only to itself (softmax over
        a single key is 1), and the last layer's output is never read."""
        ref = self.ref_token(ref_motion)
        keys, values = [], []
        for i, blk in enumerate(self.blocks):
            _, k, v = blk.qkv_heads(ref)
            keys.append(k)
            values.append(v)
            if i + 1 < len(self.blocks):
                ref = blk.finish(ref, v)
        return keys, values

    # ---- streaming step ---------------------------------------------------------------------
    def forward(
        self,
        audio_tokens: torch.Tensor,  # [1, C, A]
        talk_mask: torch.Tensor,  # [1, C]
        ref_motion: torch.Tensor,  # [1, P]
        prev_motion: torch.Tensor,  # [1, P]
        noise: torch.Tensor,  # [1, C, P]
        k_cache: torch.Tensor,  # [layers, 1, heads, S, hd], un-rotated
        v_cache: torch.Tensor,  # [layers, 1, heads, S, hd]
        cache_valid: torch.Tensor,  # [1, S]: 1 = slot holds a frame
        cache_pos: torch.Tensor,  # [1, S]: RAPR position of each slot
        query_pos: torch.Tensor,  # [1, C]: RAPR position of each frame of the chunk
        ref_kv: tuple[list, list] | None = None,  # reference(ref_motion), made beforehand
    ) -> dict[str, torch.Tensor]:
        g = self.cfg.generator
        c = audio_tokens.shape[1]
        hd = self.cfg.head_dim
        prev = self.normalize(prev_motion).unsqueeze(1).expand(-1, c, -1)
        cond = self.condition(audio_tokens, talk_mask, prev)

        # Reference token: attends only to itself, position 0.
        ref_k, ref_v = self.reference(ref_motion) if ref_kv is None else ref_kv

        # Keys for every layer: [ref, cache, chunk]; rotate ref+cache once for all passes.
        zero = torch.zeros_like(cache_pos[:, :1])
        cos_q, sin_q = rope_tables(query_pos, hd, g.rope_base)  # [1, C, hd/2]
        cos_q, sin_q = cos_q.unsqueeze(1), sin_q.unsqueeze(1)
        cos_k, sin_k = rope_tables(torch.cat([zero, cache_pos], dim=1), hd, g.rope_base)
        cos_k, sin_k = cos_k.unsqueeze(1), sin_k.unsqueeze(1)
        if torch.onnx.is_in_onnx_export():  # the rotation's few-node form (rope.apply_rope)
            cos_q, sin_q = full_tables(cos_q, sin_q)
            cos_k, sin_k = full_tables(cos_k, sin_k)
        ctx_k, ctx_v = [], []
        for i, (rk, rv) in enumerate(zip(ref_k, ref_v, strict=True)):
            keys = torch.cat([rk, k_cache[i]], dim=2)
            ctx_k.append(apply_rope(keys, cos_k, sin_k))
            ctx_v.append(torch.cat([rv, v_cache[i]], dim=2))
        bias = 1.0 - torch.cat([torch.ones_like(zero), cache_valid, torch.ones_like(query_pos)], 1)
        bias = (bias * NEG).reshape(1, 1, 1, -1)

        def run(x_tokens: torch.Tensor, collect: bool):
            h = x_tokens
            new_k, new_v = [], []
            for i, blk in enumerate(self.blocks):
                q, k, v = blk.qkv_heads(h)
                if collect:
                    new_k.append(k)
                    new_v.append(v)
                q = apply_rope(q, cos_q, sin_q)
                keys = torch.cat([ctx_k[i], apply_rope(k, cos_q, sin_q)], dim=2)
                vals = torch.cat([ctx_v[i], v], dim=2)
                h = blk.finish(h, masked_attention(q, keys, vals, bias))
            return h, new_k, new_v

        x = noise
        steps = g.steps
        for n in range(steps):
            t = torch.full_like(talk_mask, n / steps)
            h, _, _ = run(self.tokens(x, t, cond), collect=False)
            x = x + self.velocity(h) / steps
        _, new_k, new_v = run(self.tokens(x, torch.ones_like(talk_mask), cond), collect=True)
        return {
            "motion": self.denormalize(x),
            "new_k": torch.stack(new_k, 0),
            "new_v": torch.stack(new_v, 0),
        }

    # ---- whole sequence, block-causal mask (training and equivalence tests) ------------------
    def forward_parallel(
        self,
        audio_tokens: torch.Tensor,  # [B, T, A]
        talk_mask: torch.Tensor,  # [B, T]
        ref_motion: torch.Tensor,  # [B, P]
        clean: torch.Tensor,  # [B, T, P]: context motion, raw units (teacher or own outputs)
        x_t: torch.Tensor,  # [B, T, P]: noisy motion in the normalized space
        t: torch.Tensor,  # [B, T]: flow time of each frame of x_t
    ) -> torch.Tensor:
        """Velocity (normalized space) for every noisy frame; each chunk sees what streaming shows it."""
        b, n_frames, _ = clean.shape
        hd = self.cfg.head_dim
        layout = block_causal_layout(
            n_frames,
            self.cfg.chunk,
            self.cfg.generator.window,
            self.cfg.max_position,
            device=clean.device,
        )
        clean = self.normalize(clean)
        prev = previous_motion(clean, self.cfg.chunk, self.normalize(torch.zeros_like(clean[:, 0])))
        cond = self.condition(audio_tokens, talk_mask, prev)
        h = torch.cat(
            [
                self.ref_token(ref_motion),
                self.tokens(clean, torch.ones_like(t), cond),
                self.tokens(x_t, t, cond),
            ],
            dim=1,
        )
        g = self.cfg.generator
        cos_k, sin_k = (z[None, None] for z in rope_tables(layout["k_pos"], hd, g.rope_base))
        cos_q, sin_q = (z[None, None] for z in rope_tables(layout["q_pos"], hd, g.rope_base))
        cos_s, sin_s = (z[None, None] for z in rope_tables(layout["q_pos_sink"], hd, g.rope_base))
        bias_sink = layout["bias_sink"][None, None]
        bias_rest = layout["bias_rest"][None, None]
        for blk in self.blocks:
            q, k, v = blk.qkv_heads(h)
            kr = apply_rope(k, cos_k, sin_k)
            # Sink keys (reference, first chunk) keep raw positions while the query is re-based
            # by RAPR; all other keys move with the query. Two score sets reproduce both.
            scale = hd**-0.5
            s_sink = torch.matmul(apply_rope(q, cos_s, sin_s), kr.transpose(-1, -2)) * scale
            s_rest = torch.matmul(apply_rope(q, cos_q, sin_q), kr.transpose(-1, -2)) * scale
            scores = torch.where(layout["is_sink"], s_sink + bias_sink, s_rest + bias_rest)
            attn = torch.matmul(torch.softmax(scores, dim=-1), v)
            h = blk.finish(h, attn)
        return self.velocity(h[:, 1 + n_frames :])


def previous_motion(motion: torch.Tensor, chunk: int, start: torch.Tensor) -> torch.Tensor:
    """Per frame, the last frame of the previous chunk (`start` [B, P] for chunk 0)."""
    b, n, p = motion.shape
    idx = torch.arange(n, device=motion.device) // chunk * chunk - 1  # last frame before chunk
    padded = torch.cat([start.unsqueeze(1), motion], dim=1)
    return padded[:, idx + 1]


def block_causal_layout(
    n_frames: int, chunk: int, window: int, max_pos: int, device=None
) -> dict[str, torch.Tensor]:
    """Mask and RAPR positions of the sequence [ref, clean frames, noisy frames].

    Chunk k (frames kC..kC+C-1) sees: the reference; the first chunk (the sink, once k > 0); the
    last `window` frames of chunks 1..k-1 (the rolling window); and its own chunk (clean tokens see
    clean, noisy tokens see noisy). Raw position of frame j is j + 1, the reference is 0. A chunk's
    queries and non-sink keys are shifted down by max(0, kC + C - D) so they never exceed D.
    """
    n = 1 + 2 * n_frames
    frame = torch.arange(n_frames, device=device)
    chunk_of = frame // chunk
    allowed_clean = torch.zeros(n_frames, n_frames, dtype=torch.bool, device=device)
    qk, kk = chunk_of[:, None], chunk_of[None, :]
    j = frame[None, :]
    start = qk * chunk
    allowed_clean |= (kk == 0) & (qk > 0)  # sink
    allowed_clean |= (kk >= 1) & (j < start) & (j >= start - window)  # window
    same = qk == kk

    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    allowed[:, 0] = True  # everyone sees the reference
    allowed[0, 1:] = False
    c0, n0 = 1, 1 + n_frames  # offsets of clean and noisy tokens
    allowed[c0:n0, c0:n0] = allowed_clean | same
    allowed[n0:, c0:n0] = allowed_clean
    allowed[n0:, n0:] = same

    raw = torch.cat([torch.zeros(1, device=device), (frame + 1).float(), (frame + 1).float()])
    shift_frame = torch.clamp(chunk_of * chunk + chunk - max_pos, min=0).float()
    shift = torch.cat([torch.zeros(1, device=device), shift_frame, shift_frame])
    is_sink = torch.cat(
        [torch.ones(1, dtype=torch.bool, device=device), chunk_of == 0, chunk_of == 0]
    )
    big = torch.tensor(NEG, device=device)
    zero = torch.tensor(0.0, device=device)
    return {
        "k_pos": raw,
        "q_pos": raw,
        "q_pos_sink": raw - shift,
        "is_sink": is_sink,
        "bias_sink": torch.where(allowed & is_sink[None, :], zero, big),
        "bias_rest": torch.where(allowed & ~is_sink[None, :], zero, big),
    }
