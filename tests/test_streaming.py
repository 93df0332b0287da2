"""The static-cache streaming path is exactly the block-causal model, and its buffers stay fixed."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from edgetalk.models.config import preset
from edgetalk.models.io_spec import module_io
from edgetalk.runtime.backend import Backend
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.cache import KVCache
from edgetalk.runtime.scheduler import StreamScheduler

from .conftest import MICRO, seeded_model, speechlike


class RecordingBackend(TorchBackend):
    """Keeps every generator call's inputs and outputs."""

    def __init__(self, *a, cache_pos_offset: float = 0.0, **k):
        super().__init__(*a, **k)
        self.calls = []
        self.cache_pos_offset = cache_pos_offset

    def run(self, module, inputs):
        if module == "generator" and self.cache_pos_offset:
            inputs = dict(inputs, cache_pos=inputs["cache_pos"] + self.cache_pos_offset)
        out = super().run(module, inputs)
        if module == "generator":
            self.calls.append((inputs, out))
        return out


def stream_then_parallel(cfg, seconds: float, cache_pos_offset: float = 0.0) -> float:
    """Stream audio chunk by chunk, then recompute the same frames in one block-causal pass."""
    model = seeded_model(cfg, seed=1)
    backend = RecordingBackend(model, cache_pos_offset=cache_pos_offset)
    res = cfg.render.resolution
    avatar = np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8)
    sched = StreamScheduler(backend, avatar, seed=7)
    pcm = speechlike(seconds)
    for i in range(0, pcm.shape[0], 777):  # odd piece size: pieces never align with chunks
        sched.push_audio(pcm[i : i + 777])
    sched.flush()

    def cat(key, io="in"):
        return torch.from_numpy(
            np.concatenate([(c[0] if io == "in" else c[1])[key] for c in backend.calls], axis=1)
        )

    tokens, mask, noise = cat("audio_tokens"), cat("talk_mask"), cat("noise")
    streamed = cat("motion", "out")
    ref = torch.from_numpy(backend.calls[0][0]["ref_motion"])
    steps = cfg.generator.steps
    x = noise.clone()
    gen = model.generator
    with torch.no_grad():
        for n in range(steps):
            t = torch.full(mask.shape, n / steps)
            x = x + gen.forward_parallel(tokens, mask, ref, streamed, x, t) / steps
        x = gen.denormalize(x)
    # The stream must be long enough for RAPR to re-base positions and the window to wrap.
    assert streamed.shape[1] > cfg.max_position + 2 * cfg.generator.window
    return float((x - streamed).abs().max())


@pytest.mark.parametrize("cfg", [preset("tiny"), MICRO], ids=["tiny", "micro"])
def test_streaming_matches_block_causal_pass(cfg):
    assert stream_then_parallel(cfg, seconds=2.4) <= 1e-4


def test_equivalence_check_detects_wrong_positions():
    # The same comparison fails when cached positions are off by one: the test has teeth.
    assert stream_then_parallel(preset("tiny"), seconds=2.4, cache_pos_offset=1.0) > 1e-3


def test_sink_never_evicted_and_positions_capped():
    cfg = preset("tiny")
    cache = KVCache(cfg)
    c, d = cfg.chunk, cfg.max_position
    g = cfg.generator
    for k in range(10_000):
        start = k * c
        cache_pos, query_pos = cache.positions(start)
        assert query_pos.max() <= d and cache_pos.max() <= d
        # Relative offsets inside chunk + window are the true frame distances.
        held = cache.slot_frame >= c
        if held.any():
            off = query_pos[0, 0] - cache_pos[0, held]
            assert np.array_equal(off, start - cache.slot_frame[held])
        new = np.full((g.layers, 1, g.heads, c, cfg.head_dim), k, dtype=np.float32)
        cache.write(new, new, start)
        assert np.array_equal(cache.slot_frame[:c], np.arange(c))  # the sink stays
        assert cache.k.shape == (g.layers, 1, g.heads, cfg.cache_slots, cfg.head_dim)
    assert np.all(cache.k[:, :, :, :c] == 0)  # written once, by chunk 0
    assert cache.valid.min() == 1.0


class ShapeOnlyBackend(Backend):
    """Pure-numpy stand-in with the contract's shapes: isolates the scheduler's own memory."""

    name = "shape-only"

    def run(self, module, inputs):
        out = {}
        for t in self.io[module].outputs:
            arr = np.zeros(t.shape, dtype=t.dtype)
            arr.flat[0] = float(np.sum(inputs[self.io[module].inputs[0].name]))  # depends on input
            out[t.name] = arr
        return out


def test_ten_thousand_chunks_flat_memory():
    """10,000 chunks through the scheduler: fixed buffers and no growth in traced memory."""
    cfg = MICRO
    backend = ShapeOnlyBackend(cfg, module_io(cfg))
    sched = StreamScheduler(backend, np.zeros((32, 32, 3), np.uint8), seed=0)
    piece = np.zeros(cfg.chunk * 640, np.float32)
    piece[::7] = 0.1
    shapes = (sched.cache.k.shape, *(v.shape for v in sched.audio_state.values()))
    for _ in range(100):  # warm-up
        sched.push_audio(piece, piece)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(10_000 - 100):
        sched.push_audio(piece, piece)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert sched.stats.chunks >= 10_000 - -(-cfg.lookahead_samples // (cfg.chunk * 640))
    assert (sched.cache.k.shape, *(v.shape for v in sched.audio_state.values())) == shapes
    assert sched.cache.slot_frame.max() == sched.next_frame - 1
    assert sched.own.shape[0] < cfg.chunk_samples
    assert grown < 64 * 1024, f"traced memory grew by {grown} bytes"


def test_audio_encoder_is_causal_with_fixed_lookahead():
    cfg = preset("tiny")
    model = seeded_model(cfg)
    backend = TorchBackend(model)
    c, lk = cfg.chunk, -(-cfg.lookahead_samples // 640)  # frames the lookahead reaches into

    def tokens(pcm):
        sched = StreamScheduler(backend, np.zeros((256, 256, 3), np.uint8))
        out = []
        orig = backend.run

        def spy(module, inputs):
            o = orig(module, inputs)
            if module == "audio":
                out.append(o["audio_tokens"][0])
            return o

        backend.run = spy
        try:
            sched.push_audio(pcm)
        finally:
            backend.run = orig
        return np.concatenate(out)

    pcm = speechlike(2.0)
    base = tokens(pcm)
    hit = 30  # perturb audio from the start of frame 30 on
    changed = pcm.copy()
    changed[hit * 640 :] += 0.2
    diff = np.abs(tokens(changed) - base).max(axis=1)
    assert diff[: hit - lk].max() == 0.0  # nothing before t + L sees the future
    assert diff[hit - lk] > 1e-4  # frame t sees up to the lookahead past its end
    assert base.shape[0] % c == 0


def test_whole_clip_audio_encoding_equals_streaming():
    """Training encodes whole clips in one call; that must equal the streamed tokens."""
    cfg = preset("tiny")
    model = seeded_model(cfg)
    backend = TorchBackend(model)
    seen = []
    orig = backend.run

    def spy(module, inputs):
        out = orig(module, inputs)
        if module == "audio":
            seen.append(out["audio_tokens"][0])
        return out

    backend.run = spy
    sched = StreamScheduler(backend, np.zeros((256, 256, 3), np.uint8))
    pcm = speechlike(1.6)  # 40 frames, a multiple of C
    sched.push_audio(pcm)
    sched.flush()
    streamed = np.concatenate(seen)
    n = streamed.shape[0]
    with torch.no_grad():
        whole = model.audio.encode_sequence(
            torch.from_numpy(np.stack([pcm, np.zeros_like(pcm)]))[None], torch.ones(1, n)
        )[0].numpy()
    assert np.abs(whole - streamed).max() < 1e-4


def test_frames_to_uint8_rounds_and_clips_as_the_plain_formula():
    """The scheduler's in-place 8-bit conversion gives exactly the plain formula's levels, at the
    edges too (below 0, above 1, the half-way points), and leaves the decoder's frames as they were."""
    from edgetalk.runtime.scheduler import to_uint8

    rng = np.random.default_rng(0)
    frames = rng.uniform(-0.2, 1.2, (2, 8, 8, 3)).astype(np.float32)
    frames[0, 0, 0] = [0.0, 1.0, 0.5 / 255.0]
    frames[0, 0, 1] = [254.5 / 255.0, -0.0, 1.0 + 1e-7]
    before = frames.copy()
    want = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    scratch = np.empty(frames.shape, np.float32)
    got = to_uint8(frames, scratch)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert np.array_equal(frames, before)
    assert not np.shares_memory(got, scratch)
    # torch's frames are channels-last views: a scratch in their memory order gives the same
    strided = np.ascontiguousarray(frames.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    got = to_uint8(strided, np.empty_like(strided, dtype=np.float32))
    assert np.array_equal(got, want)


def test_the_rotations_exported_form_gives_the_same_values():
    """apply_rope with full_tables (the form ONNX export traces: one product by a signed swap)
    rotates exactly as the two-halves form, for queries, cached keys and broadcast tables."""
    from edgetalk.models.rope import apply_rope, full_tables, rope_tables

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((1, 4, 6, 32)).astype(np.float32))
    pos = torch.from_numpy(rng.uniform(0, 40, (1, 6)).astype(np.float32))
    cos, sin = (t.unsqueeze(1) for t in rope_tables(pos, 32, 10000.0))
    assert torch.equal(apply_rope(x, *full_tables(cos, sin)), apply_rope(x, cos, sin))


def test_the_torch_generator_with_its_reference_made_once_gives_the_same_outputs():
    """TorchBackend.prepare_photo(..., "generator") makes the reference token's keys and values
    once; generator calls that get them return what a call making them itself returns, and a
    whole stream renders the same frames to the bit."""
    from edgetalk.runtime.backend_torch import REFERENCE

    model = seeded_model(MICRO, seed=7)
    backend = TorchBackend(model, MICRO)
    rng = np.random.default_rng(8)
    feed = {
        t.name: rng.standard_normal(t.shape).astype(np.float32)
        for t in module_io(MICRO)["generator"].inputs
    }
    prepared = backend.prepare_photo({"ref_motion": feed["ref_motion"]}, "generator")
    assert REFERENCE in prepared and backend.prepare_photo(feed) is feed  # the decoder's: as is
    bare, again = backend.run("generator", feed), backend.run("generator", {**feed, **prepared})
    for name, value in bare.items():
        assert np.array_equal(value, again[name]), name

    class EveryCall(TorchBackend):  # the reference pass in every call, as before
        def prepare_photo(self, feed, module="decoder"):
            return feed

    frames = []
    for b in (TorchBackend(model, MICRO), EveryCall(model, MICRO)):
        avatar = np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        sched = StreamScheduler(b, avatar, seed=1)
        frames.append(np.stack([f.rgb for f in sched.push_audio(speechlike(0.6)) + sched.flush()]))
    assert REFERENCE in StreamScheduler(TorchBackend(model, MICRO), avatar, seed=1).reference
    np.testing.assert_array_equal(frames[0], frames[1])
