"""The scheduler's overlap: chunk k's decoder on a worker thread while the caller computes chunk
k+1's audio and motion. The frames are the serial scheduler's, one chunk later; nothing is lost
on flush, reset or interrupt, and a failure on the worker reaches the caller. A live Session
overlaps only while the next chunk's audio is in hand, so no frame waits for audio to come."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.scheduler import StreamScheduler

from .conftest import MICRO, seeded_model, speechlike


class ThreadTap(TorchBackend):
    """Notes the thread each module runs on."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.threads: dict[str, set[int]] = {}

    def run(self, module, inputs):
        self.threads.setdefault(module, set()).add(threading.get_ident())
        return super().run(module, inputs)


class InTurn(TorchBackend):
    concurrent_modules = False


@pytest.fixture(scope="module")
def model():
    return seeded_model(MICRO, seed=3)


def avatar_for(backend):
    res = backend.cfg.render.resolution
    return np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8)


def stream(backend, overlap, pcm, partner=None, piece=777):
    s = StreamScheduler(backend, avatar_for(backend), seed=5, overlap=overlap)
    out = []
    for i in range(0, pcm.shape[0], piece):
        out += s.push_audio(pcm[i : i + piece], None if partner is None else partner[i : i + piece])
    out += s.flush()
    s.close()
    return out


def same(a, b):
    assert [f.index for f in a] == [f.index for f in b] == list(range(len(a)))
    for x, y in zip(a, b, strict=True):
        assert x.pts == y.pts
        assert np.array_equal(x.rgb, y.rgb) and np.array_equal(x.audio, y.audio)
        assert (x.partner is None) == (y.partner is None)
        if x.partner is not None:
            assert np.array_equal(x.partner, y.partner)


def test_overlap_gives_the_serial_frames_and_decodes_on_another_thread(model):
    pcm = speechlike(2.3)
    partner = speechlike(2.3, seed=1) * 0.5
    serial = stream(TorchBackend(model), False, pcm, partner)
    tap = ThreadTap(model)
    overlapped = stream(tap, True, pcm, partner)
    same(serial, overlapped)
    assert len(serial) == int(np.ceil(pcm.shape[0] / 640))  # the partial last chunk too
    caller = tap.threads["generator"]
    assert tap.threads["audio"] == caller and len(caller) == 1
    assert not tap.threads["decoder"] & caller  # the decoder ran on the worker


def test_frames_come_one_chunk_later_and_flush_returns_the_rest(model):
    backend = TorchBackend(model)
    need, c = backend.cfg.chunk_samples, backend.cfg.chunk
    pcm = speechlike(need * 3 / 16000 + 0.01)
    serial = StreamScheduler(backend, avatar_for(backend), overlap=False)
    ov = StreamScheduler(backend, avatar_for(backend), overlap=True)
    assert ov.overlapping and not serial.overlapping
    first, second = pcm[:need], pcm[need : need + c * 640]
    a = serial.push_audio(first)
    assert [f.index for f in a] == list(range(c))
    b = ov.push_audio(first)
    assert b == []  # its decoder is still on the worker
    a += serial.push_audio(second)
    got = ov.push_audio(second)
    assert [f.index for f in got] == list(range(c))  # the first chunk, one push later
    b += got
    a += serial.flush()
    b += ov.flush()
    same(a, b)
    ov.close()


def test_a_backend_that_runs_modules_in_turn_is_not_overlapped(model):
    pcm = speechlike(1.1)
    s = StreamScheduler(InTurn(model), avatar_for(InTurn(model)), overlap=True)
    assert not s.overlapping
    same(stream(InTurn(model), True, pcm), stream(TorchBackend(model), False, pcm))
    assert OnnxRuntimeBackend.concurrent_modules and TorchBackend.concurrent_modules


def test_a_decoder_failure_on_the_worker_reaches_the_caller(model):
    class Failing(TorchBackend):
        decodes = 0

        def run(self, module, inputs):
            if module == "decoder":
                Failing.decodes += 1
                if Failing.decodes == 2:
                    raise RuntimeError("decoder broke")
            return super().run(module, inputs)

    backend = Failing(model)
    s = StreamScheduler(backend, avatar_for(backend), overlap=True)
    pcm = speechlike(1.5)
    with pytest.raises(RuntimeError, match="decoder broke"):
        for i in range(0, pcm.shape[0], 640):
            s.push_audio(pcm[i : i + 640])
        s.flush()
    s.close()


def test_reset_and_interrupt_drop_the_chunk_on_the_worker(model):
    backend = TorchBackend(model)
    pcm = speechlike(1.2)
    fresh = stream(backend, False, pcm)
    s = StreamScheduler(backend, avatar_for(backend), seed=5, overlap=True)
    s.push_audio(speechlike(0.9, seed=4))  # a stream whose last chunk is still decoding
    s.reset()
    again = []
    for i in range(0, pcm.shape[0], 777):
        again += s.push_audio(pcm[i : i + 777])
    again += s.flush()
    same(fresh, again)  # nothing of the old stream leaks into the new one
    s.push_audio(speechlike(0.9, seed=4))
    s.interrupt()
    assert all(f.index >= s.next_frame for f in s.push_audio(np.zeros(640, np.float32)))
    s.close()
    assert not s.overlapping


# ---- a live Session: overlap only while the next chunk's audio is in hand ----------------------


def session_frames(backend, overlap, pcm, piece=3200):
    from edgetalk.runtime.session import Session

    s = Session(
        avatar=avatar_for(backend),
        backend=backend,
        face_check=False,
        realtime=False,
        overlap=overlap,
        seed=5,
    )
    assert s.scheduler.overlapping == overlap
    for i in range(0, pcm.shape[0], piece):
        s.push_audio(pcm[i : i + piece])
    s.close()
    return [(f.index, f.rgb.copy(), f.audio.copy()) for f in s.frames()], s


def test_a_session_overlaps_a_backlog_and_gives_the_same_frames(model):
    """Audio pushed faster than real time (a TTS) is in hand: each chunk's decoder runs beside
    the next chunk's audio and generator, and the frames are the serial session's."""
    pcm = speechlike(1.3)
    tap = ThreadTap(model)
    got, s = session_frames(tap, True, pcm)
    want, _ = session_frames(TorchBackend(model), False, pcm)
    assert [i for i, *_ in got] == [i for i, *_ in want] == list(range(len(want)))
    assert len(want) == int(np.ceil(pcm.shape[0] / 640))
    for (_, a, x), (_, b, y) in zip(got, want, strict=True):
        assert np.array_equal(a, b) and np.array_equal(x, y)
    assert not tap.threads["decoder"] & tap.threads["audio"]  # decoded beside the audio
    assert not s.scheduler.overlapping  # the worker's end let the overlap thread go


def test_a_session_hands_a_chunk_out_without_waiting_for_more_audio(model):
    """With nothing more in hand, the chunk on the overlap thread is handed out as soon as it
    is decoded: overlap never adds a chunk of delay to a live stream (the scheduler alone,
    used by `run`, returns it with the next chunk)."""
    from edgetalk.runtime.session import Session

    backend = TorchBackend(model)
    s = Session(
        avatar=avatar_for(backend), backend=backend, face_check=False, realtime=False, overlap=True
    )
    c, need = backend.cfg.chunk, backend.cfg.chunk_samples
    got: list[int] = []
    done = threading.Event()

    def read():
        for f in s.frames():
            got.append(f.index)
            if len(got) == c:
                done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    s.push_audio(speechlike(need / 16000 + 0.001))  # one chunk and its lookahead, no more
    assert done.wait(30), f"{len(got)} of the chunk's {c} frames came out"
    assert got == list(range(c))
    s.close()
    reader.join(30)
    assert not reader.is_alive()


def test_an_interrupt_drops_the_chunk_on_the_overlap_thread(model):
    """A barge-in while a chunk decodes on the overlap thread: that chunk is counted as
    interrupted and never shown; the next utterance starts the timeline cleanly."""
    from edgetalk.runtime.session import Session

    class Slow(TorchBackend):
        def run(self, module, inputs):
            if module == "decoder":
                threading.Event().wait(0.15)
            return super().run(module, inputs)

    backend = Slow(model)
    s = Session(
        avatar=avatar_for(backend), backend=backend, face_check=False, realtime=False, overlap=True
    )
    c = backend.cfg.chunk
    s.push_audio(speechlike(0.8, seed=4))  # a backlog: several chunks in hand
    for _ in range(300):
        if s.scheduler.pending:
            break
        threading.Event().wait(0.01)
    assert s.scheduler.pending
    s.interrupt()
    after = speechlike(0.5, seed=6)
    s.push_audio(after)
    s.close()
    shown = [f.index for f in s.frames()]  # nothing was read before the interrupt
    assert shown == list(range(int(np.ceil(after.shape[0] / 640))))
    assert s.stats.interrupted_frames >= c
