"""The live path: Session (idle, interrupt, late policy, long streams), sources, sinks, `live` CLI.

Network tests use 127.0.0.1 only, with bounded loops and timeouts. The model is MICRO throughout.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

from edgetalk.cli import main
from edgetalk.errors import InputError
from edgetalk.models.checkpoint import save_checkpoint
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.session import QUIET_RUN, Session
from edgetalk.runtime.socket_source import CTRL_END, CTRL_INTERRUPT, MAX_FRAME_BYTES, SocketSource
from edgetalk.runtime.sources import PcmStdinSource, feed

from .conftest import MICRO, as_from_a_terminal, av_ends, seeded_model, speechlike

SPF = 640
CHUNK_S = MICRO.chunk / 25


@pytest.fixture(scope="module")
def micro_model():
    return seeded_model(MICRO)


@pytest.fixture
def backend(micro_model):
    return TorchBackend(micro_model)


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "micro.safetensors"
    save_checkpoint(seeded_model(MICRO), path)
    return path


def collect(session, limit_s: float = 20.0, stop=None):
    """Frames until the stream ends (or `stop(frame, t)` is true, or the time limit)."""
    out, t0 = [], time.monotonic()
    for f in session.frames():
        out.append((time.monotonic() - t0, f))
        if (stop and stop(f, out[-1][0])) or time.monotonic() - t0 > limit_s:
            break
    return out


def from_a_microphone(session, audio) -> list:
    """Push `audio` paced in real time, 40 ms at a time, as a microphone delivers it, then
    close; meanwhile read frames(gaps=True). -> [(monotonic time handed out, frame)]"""

    def mic():
        t0 = time.monotonic()
        for i in range(0, audio.shape[0], SPF):
            time.sleep(max(0.0, t0 + i / 16000 - time.monotonic()))
            session.push_audio(audio[i : i + SPF])
        session.close()

    pusher = threading.Thread(target=mic, daemon=True)
    pusher.start()
    items = [(time.monotonic(), f) for f in session.frames(gaps=True)]
    pusher.join(5.0)
    return items


# ---- Session ------------------------------------------------------------------------------------
def test_offline_session_frames_carry_their_audio(backend):
    pcm = speechlike(1.3)
    with Session(backend=backend, realtime=False) as s:
        s.push_audio((pcm[:9000] * 32767).astype(np.int16))  # int16 is accepted too
        s.push_audio(pcm[9000:])
        s.close()
        frames = [f for _, f in collect(s)]
    assert len(frames) == int(np.ceil(pcm.shape[0] / SPF))  # the partial last chunk is flushed
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(abs(f.t - f.index / 25) < 1e-9 for f in frames)
    t, rgb = frames[0]  # plain (timestamp, rgb) pairs
    assert t == 0.0 and rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    audio = np.concatenate([f.audio for f in frames])
    assert audio.shape[0] == len(frames) * SPF
    np.testing.assert_allclose(audio[9000:], np.pad(pcm, (0, audio.shape[0] - pcm.shape[0]))[9000:])
    st = s.stats
    assert st.frames == len(frames) and st.late == st.dropped == st.interruptions == 0
    assert "first-frame delay" in st.summary()


def test_other_rates_are_resampled(backend):
    pcm = speechlike(1.0, rate=44100)
    with Session(backend=backend, realtime=False) as s:
        for i in range(0, pcm.shape[0], 4410):
            s.push_audio(pcm[i : i + 4410], sample_rate=44100)
        s.close()
        n = len(collect(s))
    assert abs(n - 25) <= 1


def test_bad_input_is_a_clear_error(backend):
    with Session(backend=backend, realtime=False) as s:
        with pytest.raises(InputError, match="NaN"):
            s.push_audio(np.full(100, np.nan, np.float32))
        with pytest.raises(InputError, match="float32 or int16"):
            s.push_audio(np.zeros(100, np.int32))
        with pytest.raises(InputError, match=r"raw bytes: pass np\.frombuffer\(data, np\.int16\)"):
            s.push_audio(b"\x00\x00" * 100)  # a TTS's PCM bytes: said how, not "dtype |S200"
        # channels-first stereo, at the model's rate and through the resampler: not 2 samples
        # of 16000-channel noise
        for rate in (16000, 22050):
            with pytest.raises(InputError, match=r"\(2, 16000\).*transposed \(x\.T\)"):
                s.push_audio(np.zeros((2, 16000), np.float32), sample_rate=rate)
        s.push_audio(np.zeros((1600, 2), np.float32))  # [samples, channels] is fine
        s.close()
        s.close()  # idempotent
        with pytest.raises(InputError, match="closed"):
            s.push_audio(np.zeros(100, np.float32))
    with pytest.raises(InputError, match="late policy"):
        Session(backend=backend, late_policy="skip")
    for seed in (-1, 1.5, 2**32):
        with pytest.raises(InputError, match="seed must be a whole number in 0.."):
            Session(backend=backend, seed=seed)
    with pytest.raises(InputError, match="chunk must be a whole number in 1..64"):
        Session(checkpoint=None, chunk=0)


def test_partner_voice_paired_and_separate(backend):
    own, partner = speechlike(0.8), speechlike(0.8, seed=3)
    for paired in (True, False):
        with Session(backend=backend, realtime=False) as s:
            if paired:
                for i in range(0, own.shape[0], 3000):
                    s.push_audio(own[i : i + 3000], partner[i : i + 3000])
            else:  # a separate stream (a second mic): aligned as the own voice is consumed
                s.push_partner(partner)
                s.push_audio(own)
            s.close()
            frames = [f for _, f in collect(s)]
        assert len(frames) == 20 and s.scheduler.partner_seen
        got = np.concatenate([f.partner_audio for f in frames])
        np.testing.assert_allclose(got, partner, atol=1e-6)


class FailingBackend(TorchBackend):
    def run(self, module, inputs):
        if module == "decoder":
            raise InputError("decoder exploded")
        return super().run(module, inputs)


def test_worker_errors_reach_the_reader(micro_model):
    with Session(backend=FailingBackend(micro_model), realtime=False) as s:
        s.push_audio(speechlike(0.5))
        s.close()
        with pytest.raises(InputError, match="decoder exploded"):
            collect(s)


def test_silence_keeps_the_avatar_alive(backend):
    """Realtime with no audio at all: silence is fed at real-time rate and frames keep coming."""
    with Session(backend=backend, realtime=True) as s:
        frames = collect(s, stop=lambda f, t: t > 1.0)
        st = s.stats
    assert len(frames) >= 15, len(frames)  # ~25 expected in 1 s; slack for a busy machine
    assert all(not np.any(f.audio) for _, f in frames)
    assert st.silence_s > 0.5 and st.first_frame_delay_s is not None
    assert st.first_frame_delay_s >= st.floor_s  # (C + L) * 40 ms of audio are needed first


def test_interrupt_stops_the_avatar_within_one_chunk(backend):
    """Push 5 s of speech at once (a TTS), interrupt after ~1 s of playback: no frame of that
    speech is delivered more than one chunk after interrupt(); idle frames follow at once."""
    speech = speechlike(5.0) + 0.05  # every frame's audio is non-zero
    events = {}
    with Session(backend=backend, realtime=True) as s:
        s.push_audio(speech)

        def stop(f, t):
            if "t_int" not in events and t > 1.0:
                events["t_int"] = time.monotonic()
                events["discarded"] = s.interrupt()
            return t > 1.8

        t_start = time.monotonic()
        frames = collect(s, stop=stop)
        st = s.stats
    t_int = events["t_int"] - t_start
    speech_after = [t - t_int for t, f in frames if t > t_int and np.any(f.audio)]
    idle_after = [t - t_int for t, f in frames if t > t_int and not np.any(f.audio)]
    why = st.summary()  # what the session counted, should an assertion fail
    assert not speech_after or max(speech_after) <= CHUNK_S, (speech_after, why)
    assert idle_after and idle_after[0] < 4 * CHUNK_S, (idle_after[:3], why)
    # The timeline continues from the last delivered frame: no gap, no jump. A reader stalled
    # past a chunk on a loaded machine (a garbage collection) drops late frames, counted.
    index = [f.index for _, f in frames]
    assert index == sorted(set(index)) and index[-1] + 1 - len(index) == st.dropped, (index, why)
    assert st.interruptions == 1 and st.interrupted_frames >= events["discarded"] > 0
    assert st.interrupted_audio_s > 1.0
    print(
        f"interrupt: last speech frame {max(speech_after, default=0) * 1000:.0f} ms after, "
        f"first idle frame {idle_after[0] * 1000:.0f} ms after ({idle_after[0] / CHUNK_S:.2f} chunks)"
    )


class SlowBackend(TorchBackend):
    """Renders at half real time (a decoder that sleeps two chunks' worth per chunk)."""

    def run(self, module, inputs):
        if module == "decoder":
            time.sleep(2 * CHUNK_S)
        return super().run(module, inputs)


def test_interrupt_drops_the_audio_of_frames_skipped_before_it(micro_model):
    """A stream that falls behind skips frames and hands their audio to the next frame shown.
    A barge-in from another thread (a voice agent's VAD) while such audio waits must drop it
    too: the first frames after the interrupt carry silence, not a burst of the old speech."""
    speech = speechlike(4.0) + 0.05  # every frame's audio is non-zero
    at_interrupt = {}
    with Session(backend=SlowBackend(micro_model), realtime=True) as s:
        s.push_audio(speech)

        def barge_in():
            end = time.monotonic() + 10.0
            while time.monotonic() < end and not at_interrupt:
                with s._cond:  # the session's own lock (re-entrant): no frame moves meanwhile
                    if s._carry:  # a skipped frame's audio waits for the next frame shown
                        at_interrupt["carried"] = sum(a.shape[0] for a in s._carry)
                        at_interrupt["audio_s"] = s._stats.interrupted_audio_s
                        at_interrupt["delivered"] = s._stats.frames
                        s.interrupt()
                        at_interrupt["audio_s"] = (
                            s._stats.interrupted_audio_s - at_interrupt["audio_s"]
                        )
                time.sleep(0.002)

        t = threading.Thread(target=barge_in)
        t.start()
        frames = collect(s, stop=lambda f, t: "delivered" in at_interrupt and t > 3.0)
        t.join()
    assert at_interrupt, "the stream never skipped a frame: SlowBackend no longer falls behind"
    after = [f for _, f in frames[at_interrupt["delivered"] :]]
    assert after, "no frame after the interrupt"
    assert not any(np.any(f.audio) for f in after), [
        (f.index, f.audio.shape[0]) for f in after if np.any(f.audio)
    ]
    # the dropped audio is counted with the rest of what the interrupt discarded
    assert at_interrupt["audio_s"] >= at_interrupt["carried"] / 16000


@pytest.mark.parametrize("policy", ["drop", "mark"])
def test_late_policy_is_explicit_and_counted(micro_model, policy):
    with Session(backend=SlowBackend(micro_model), realtime=True, late_policy=policy) as s:
        frames = collect(s, stop=lambda f, t: t > 2.5)
        st = s.stats
    assert frames
    if policy == "mark":
        assert st.late > 0 and st.dropped == 0
        assert any(f.late for _, f in frames)
    else:
        assert st.dropped > 0 and st.late == 0
        assert not any(f.late for _, f in frames)
        # the timeline still advances over dropped frames, and their audio is not lost
        last = frames[-1][1]
        assert st.dropped >= last.index + 1 - len(frames) > 0
        assert sum(f.audio.shape[0] for _, f in frames) == (last.index + 1) * SPF
    assert f"{policy}:" in st.summary()


def test_gaps_hand_out_the_audio_of_dropped_frames_when_they_are_dropped(micro_model):
    """frames(gaps=True), for sinks that play audio on its own clock (serve's WebRTC track): a
    frame dropped as late, or a run of frames skipped to catch up, comes as a gap (rgb None)
    with exactly its own audio, in timeline order, before the compute of the next frame shown.
    Carried to that frame instead, the audio left a chunk's compute late, in a burst."""
    speech = speechlike(3.0) + 0.05
    items = []
    with Session(backend=SlowBackend(micro_model), realtime=True) as s:
        s.push_audio(speech)
        s.close()  # the whole stream, so that every count is final
        t0 = time.monotonic()
        for f in s.frames(gaps=True):
            items.append((time.monotonic() - t0, f))
        st = s.stats
    gaps = [(t, f) for t, f in items if f.rgb is None]
    shown = [(t, f) for t, f in items if f.rgb is not None]
    assert gaps and shown, "SlowBackend no longer falls behind"
    assert st.frames == len(shown) and st.late == 0
    # every frame of the timeline once, in order; each shown frame with its own span only
    index = 0
    for _, f in items:
        assert f.index == index
        assert f.audio.shape[0] % SPF == 0 and f.audio.shape[0] > 0
        index += f.audio.shape[0] // SPF
    assert st.dropped == sum(f.audio.shape[0] // SPF for _, f in gaps)
    assert all(f.audio.shape[0] == SPF for _, f in shown)
    audio = np.concatenate([f.audio for _, f in items])
    np.testing.assert_array_equal(audio, speech[: audio.shape[0]])
    assert audio.shape[0] == speech.shape[0] // SPF * SPF  # nothing lost (a part-frame is cut)
    # a gap is on the presentation clock like a frame (which only ever moves later) ...
    for (_, a), (_, b) in zip(items, items[1:], strict=False):
        assert b.due - a.due >= (b.index - a.index) / 25 - 1e-6
    # ... and is handed out when dropped: a chunk's compute (two chunks' time here) before the
    # frame shown after it
    ahead = [items[i + 1][0] - t for i, (t, f) in enumerate(items[:-1]) if f.rgb is None]
    print("gap lead over the next frame shown (s):", np.round(ahead, 3))
    assert max(ahead) >= CHUNK_S, ahead


class StallBackend(TorchBackend):
    """Real time, except that one decoder call stalls for `stall_s` (a hypervisor taking the
    CPU, a page fault storm) once the stream runs."""

    def __init__(self, model, after_calls: int, stall_s: float):
        super().__init__(model)
        self.calls, self.after, self.stall_s = 0, after_calls, stall_s

    def run(self, module, inputs):
        if module == "decoder":
            self.calls += 1
            if self.calls == self.after:
                time.sleep(self.stall_s)
        return super().run(module, inputs)


def test_gaps_hand_out_audio_at_its_time_while_the_worker_stalls(micro_model):
    """frames(gaps=True) does not wait for the worker: when a chunk's compute stalls for five
    chunks' time, the audio of the frames it holds up still leaves at most a chunk after its
    time (the late bound), each frame's own span, in order, with nothing lost; the pictures
    rendered after their audio left are dropped, not shown. Before, that audio left only when
    the stalled chunk came out, and the pacer raised the stream's delay for good by the stall
    (measured: 354-361 ms here)."""
    speech = speechlike(3.0) + 0.05
    stall_s = 5 * CHUNK_S
    with Session(backend=StallBackend(micro_model, 8, stall_s), realtime=True) as s:
        items = from_a_microphone(s, speech)
        st = s.stats
    why = st.summary()
    assert st.audio_ahead > 0, f"no audio went ahead of the worker: {why}"
    # every frame of the timeline once, in order, with exactly its own audio
    index = 0
    for _, f in items:
        assert f.index == index, (f.index, index, why)
        index += f.audio.shape[0] // SPF
    audio = np.concatenate([f.audio for _, f in items])
    start = int(np.argmax(audio != 0))  # idle silence before the first push
    np.testing.assert_array_equal(audio[start : start + speech.shape[0]], speech)
    shown = [f for _, f in items if f.rgb is not None]
    assert st.frames == len(shown) and len(shown) + st.dropped == index, why
    # no audio later than the late bound (a frame's time plus a chunk), give or take the
    # reader's wake-up on a busy machine; the stalled chunk alone would make it five chunks
    lateness = [t - (f.due + k / 25) for t, f in items for k in range(f.audio.shape[0] // SPF)]
    print(
        f"stall {stall_s * 1000:.0f} ms: audio late at most {max(lateness) * 1000:.0f} ms "
        f"(bound {CHUNK_S * 1000:.0f} ms); {why}"
    )
    assert max(lateness) < CHUNK_S + 0.1, (max(lateness), why)
    # and the delay stays: a one-off stall is not a slower machine (pacing.py)
    assert st.latency_raised_s < CHUNK_S, why


def test_an_interrupt_while_audio_goes_ahead_of_a_stalled_worker(micro_model):
    """A barge-in while the worker is stalled and frames(gaps=True) hands the audio out ahead of
    it: the speech stops at once (nothing of it after the interrupt, not even the stalled
    chunk's frames when they come), the timeline goes on from the first frame not handed out,
    each index once, and the delay is not raised for it."""
    speech = speechlike(3.0) + 0.05
    items, at = [], {}
    # The worker renders up to MAX_QUEUED_FRAMES ahead, so when its sixth call stalls it is
    # already ~10 frames (5 chunks) ahead of the presentation: the stall must outlast that lead
    # and the late bound by several frames (8 chunks left 2 frames to hand out ahead on one VM).
    with Session(backend=StallBackend(micro_model, 6, 12 * CHUNK_S), realtime=True) as s:
        s.push_audio(speech)  # a TTS: all of it at once
        for f in s.frames(gaps=True):
            items.append(f)
            if "n" not in at and s.stats.audio_ahead >= 3:
                at["n"] = len(items)
                s.interrupt()
            if len(items) > at.get("n", 10**6) + 30 or len(items) > 200:
                break
        st = s.stats
    why = st.summary()
    assert at, f"no audio went ahead of the stalled worker: {why}"
    after = items[at["n"] :]
    assert after and not any(np.any(f.audio) for f in after), why
    # each index once, in order, up to where the pause after the interrupt could begin to give
    # a raised delay back (QUIET_RUN quiet frames; then quiet frames may be dropped)
    span = items[: at["n"] + QUIET_RUN]
    for a, b in zip(span, span[1:], strict=False):
        assert b.index == a.index + a.audio.shape[0] // SPF, (a.index, b.index, why)
    assert st.interruptions == 1 and st.interrupted_audio_s > 1.0, why
    # The first idle frames after it are already near their late bound: the session feeds
    # their silence before it judges them, and skips what would be late. Judged with no audio in
    # hand, they raised the delay (40-75 ms here) for the rest of the session.
    assert st.latency_raised_s < 0.02, why


class SlowSpellBackend(TorchBackend):
    """Real time except for a spell (a busy neighbour, a hypervisor taking the CPU) in which each
    chunk takes three chunks' worth of time."""

    def __init__(self, model, start_s: float, end_s: float):
        super().__init__(model)
        self.t0, self.spell = None, (start_s, end_s)

    def run(self, module, inputs):
        if module == "decoder":
            now = time.monotonic()
            self.t0 = self.t0 or now
            if self.spell[0] <= now - self.t0 < self.spell[1]:
                time.sleep(3 * CHUNK_S)
        return super().run(module, inputs)


def test_a_slow_spell_costs_frames_then_the_stream_recovers(micro_model):
    """Compute slower than real time after the start (the latency was set on a fast machine):
    frames are dropped while it lasts, some are still shown, and full speed returns after it.
    A pacer that judged lateness by a compute time it stops measuring froze the avatar for good."""
    audio = speechlike(9.0)
    with Session(backend=SlowSpellBackend(micro_model, 2.0, 4.0), realtime=True) as s:

        def speak():
            for i in range(0, audio.shape[0], 320):  # 20 ms pieces at the microphone's pace
                s.push_audio(audio[i : i + 320])
                time.sleep(0.02)
            s.close()

        threading.Thread(target=speak, daemon=True).start()
        frames = collect(s, limit_s=15.0)
        st = s.stats
    times = np.array([t for t, _ in frames])
    during = ((times > 2.5) & (times < 4.0)).sum() / 1.5
    after = ((times > 5.5) & (times < 8.5)).sum() / 3.0
    print(f"slow spell: {during:.1f} FPS during it, {after:.1f} after; {st.summary()}")
    assert st.dropped > 0
    assert during >= 2, during  # slowed, not frozen
    assert after >= 20, after  # and back to real time (25 FPS)


def test_a_raised_delay_comes_back_down_in_the_pause_after_it(micro_model):
    """frames(gaps=True): a slow spell in the middle of speech raises the delay (pacing.py). In
    the pause after it, once the machine is fast again, quiet frames are dropped (at most one in
    three) until the delay is back near what the machine needs: a conversation does not keep the
    spell's delay for good. No speech is lost for it: only quiet frames of the pause go."""
    speech = speechlike(4.0) + 0.05  # every sample loud
    pause = np.zeros(int(4.0 * 16000), np.float32)  # a microphone in a quiet room
    audio = np.concatenate([speech, pause])
    with Session(backend=SlowSpellBackend(micro_model, 1.0, 2.5), realtime=True) as s:
        items = from_a_microphone(s, audio)
        st = s.stats
    why = st.summary()
    print(why)
    assert st.latency_raised_s > 0, f"the slow spell no longer raises the delay: {why}"
    assert st.trimmed > 0 and st.latency_lowered_s == pytest.approx(st.trimmed / 25), why
    # all that was raised comes back but what the machine needs (about half a chunk; the
    # queue must hold more than a chunk to drop one)
    assert st.latency_raised_s - st.latency_lowered_s <= 2 * CHUNK_S, why
    # at most one frame in three, and only in the pause: every frame of speech is there
    index = [f.index for _, f in items]
    spans = {f.index + k for _, f in items for k in range(f.audio.shape[0] // SPF)}
    missing = sorted(set(range(index[-1] + 1)) - spans)
    assert len(missing) == st.trimmed, (missing, why)
    got = np.concatenate([f.audio for _, f in items])
    start = int(np.argmax(got != 0))
    np.testing.assert_array_equal(got[start : start + speech.shape[0]], speech)
    first_pause = start // SPF + speech.shape[0] // SPF + 1
    assert all(i >= first_pause for i in missing), (missing[:5], first_pause)
    assert all(b - a >= 3 for a, b in zip(missing, missing[1:], strict=False)), missing


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_ten_minute_stream_flat_memory_no_drift(micro_model):
    """600 s of audio through a Session, faster than real time: memory is flat and the frame
    count matches the consumed audio to within one frame."""
    backend = TorchBackend(micro_model, MICRO.with_streaming(chunk=25))
    minutes, piece = 10, speechlike(2.0)  # pushed in 0.2 s pieces
    total = minutes * 60 * 16000
    s = Session(backend=backend, realtime=False)

    consumed = [0]

    def produce():  # a streaming TTS: stays at most 2 s ahead of what has been rendered
        for i in range(0, total, 3200):
            while i - consumed[0] > 2 * 16000 and not s.done:
                time.sleep(0.002)
            j = i % piece.shape[0]
            s.push_audio(piece[j : j + 3200][: total - i])
        s.close()

    producer = threading.Thread(target=produce, daemon=True)
    tracemalloc.start()
    t0 = time.monotonic()
    producer.start()
    frames = samples = 0
    traced, rss = [], []
    for f in s.frames():
        frames += 1
        samples += f.audio.shape[0]
        consumed[0] = samples
        if frames % (25 * 60) == 0:  # once per stream minute
            traced.append(tracemalloc.get_traced_memory()[0])
            rss.append(rss_bytes())
    wall = time.monotonic() - t0
    tracemalloc.stop()
    producer.join(5)
    s.abort()
    assert frames == int(np.ceil(total / SPF)) == s.stats.frames
    assert abs(samples - total) <= SPF  # A/V: consumed audio and frames agree within one frame
    minutes_axis = np.arange(len(traced))
    slope = np.polyfit(minutes_axis[2:], np.array(traced[2:]) / 1e6, 1)[0]  # MB per minute
    rss_slope = np.polyfit(minutes_axis[2:], np.array(rss[2:]) / 1e6, 1)[0]
    print(
        f"10-minute stream: {wall:.1f} s wall ({frames / wall:.0f} FPS), traced slope "
        f"{slope * 1000:.1f} kB/min, RSS slope {rss_slope * 1000:.1f} kB/min, "
        f"drift {(samples - total) / SPF:+.2f} frames"
    )
    # Faster than real time with room to spare: 4x (the 300 s test timeout would cut off any
    # bound looser than 2x before it could fail).
    assert wall < minutes * 60 / 4, f"{wall:.0f} s for a {minutes}-minute stream"
    print("traced MB per minute:", [round(t / 1e6, 3) for t in traced])
    # A leak grows. The traced memory also holds the audio the producer queued ahead (up to 2 s),
    # which drains at the end: a CI run read 1.27 -> 0.85 MB over the last minutes (slope -0.055
    # MB/min), the queue emptying, not a leak. The range bound still catches memory that moves
    # either way.
    assert slope < 0.05 and max(traced[2:]) - min(traced[2:]) < 1e6
    assert rss_slope < 1.0


def test_run_realtime_mp4_durations_match(tmp_path, wav_file, micro_ckpt, capsys):
    """`run --realtime` plays the file in real time through a Session into an mp4 whose video and
    audio durations agree within one frame."""
    wav, out = wav_file(seconds=1.5), tmp_path / "o.mp4"
    code = main(["run", "--realtime", "--audio", str(wav), "--checkpoint", str(micro_ckpt),
                 "--out", str(out)])  # fmt: skip
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "Traceback" not in cap.out + cap.err and "summary: frames" in cap.out
    n, v_end, a_end = av_ends(out)
    assert abs(v_end - a_end) <= 1024 / 16000 + 1e-6, (n, v_end, a_end)  # AAC's last frame
    assert abs(n - 1.5 * 25) <= 1


def test_play_joins_its_threads(backend, wav_file):
    """play() returns with no thread of its own alive: a leftover thread that drops the last
    reference to the session at exit frees tensors during finalization, and torch aborts the
    process ("terminate called without an active exception", pytorch#38228)."""
    from edgetalk.runtime.cli_live import play
    from edgetalk.runtime.sinks import NullSink
    from edgetalk.runtime.sources import FileSource

    class SlowToStop(FileSource):  # a source whose thread takes a moment to wind down
        def __iter__(self):
            yield from super().__iter__()
            time.sleep(0.3)

    before = set(threading.enumerate())
    session = Session(backend=backend, realtime=False)
    assert play(session, NullSink(), [SlowToStop(wav_file(seconds=0.5), realtime=False)],
                seconds=30) == 0  # fmt: skip
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, left


# ---- sources ------------------------------------------------------------------------------------
def test_stdin_source_handles_split_samples():
    pcm = (speechlike(0.3) * 32767).astype("<i2")
    data = pcm.tobytes() + b"\x07"  # a trailing half sample

    class Chunky(io.RawIOBase):  # a pipe that returns odd-sized reads
        def __init__(self):
            self.pos = 0

        def read1(self, n):
            k = min(777, len(data) - self.pos)
            self.pos += k
            return data[self.pos - k : self.pos]

    src = PcmStdinSource(Chunky())
    got = np.concatenate(list(src))
    np.testing.assert_array_equal(got, pcm.astype(np.float32) / 32768)
    assert "1 trailing byte" in src.notes[0]


def test_live_cli_pcm_stdin(micro_ckpt):
    pcm = (speechlike(1.0) * 32767).astype("<i2").tobytes() + b"\x01"
    r = subprocess.run(
        [sys.executable, "-m", "edgetalk", "live", "--checkpoint", str(micro_ckpt),
         "--pcm-stdin", "--null", "--seconds", "20"],
        input=pcm, capture_output=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "Traceback" not in out + r.stderr.decode()
    assert "summary: frames 25 " in out and "first-frame delay" in out and "dropped" in out
    assert "trailing byte" in out


def test_live_cli_ctrl_c_leaves_a_playable_mp4(micro_ckpt, tmp_path):
    out = tmp_path / "live.mp4"
    p = subprocess.Popen(
        [sys.executable, "-m", "edgetalk", "live", "--checkpoint", str(micro_ckpt),
         "--pcm-stdin", "--out", str(out), "--seconds", "30"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=as_from_a_terminal,
    )  # fmt: skip
    try:
        p.stdin.write((speechlike(0.5) * 32767).astype("<i2").tobytes())
        p.stdin.flush()
        deadline = time.monotonic() + 30
        while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # some frames written (speech, then idle)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr.decode()
    assert "stopped (Ctrl-C)" in stdout.decode() and "summary: frames" in stdout.decode()
    n, v_end, a_end = av_ends(out)
    assert n >= 12 and abs(v_end - a_end) <= 1024 / 16000 + 1e-6, (n, v_end, a_end)  # AAC pad


# ---- socket -------------------------------------------------------------------------------------
def connect(addr) -> tuple[socket.socket, str]:
    c = socket.create_connection(addr, timeout=5)
    return c, c.makefile("rb").readline().decode().strip()


def audio_frame(seconds: float, seed: int = 0) -> bytes:
    b = (speechlike(seconds, seed) * 32767).astype("<i2").tobytes()
    return struct.pack(">I", len(b)) + b


def read_all(c: socket.socket) -> str:
    data = b""
    while chunk := c.recv(4096):
        data += chunk
    return data.decode()


@pytest.fixture
def socket_session(backend):
    errors = []
    src = SocketSource("127.0.0.1", 0, log=errors.append)
    s = Session(backend=backend, realtime=False)
    pump = threading.Thread(target=feed, args=(s, src), daemon=True)
    pump.start()
    yield s, src, errors
    src.close()
    s.abort()
    pump.join(5)


def test_socket_client_produces_frames(socket_session):
    s, src, _ = socket_session
    c, hello = connect(src.address)
    assert hello.startswith("OK")
    for _ in range(4):
        c.sendall(audio_frame(0.25))
    c.sendall(struct.pack(">I", CTRL_END))
    c.close()
    frames = collect(s, limit_s=20)
    assert len(frames) == 25 and s.done


@pytest.mark.parametrize(
    "bad, reason",
    [
        (struct.pack(">I", 3) + b"abc", "bad length prefix 3"),  # odd byte count
        (struct.pack(">I", 0), "bad length prefix 0"),
        (struct.pack(">I", MAX_FRAME_BYTES + 2), f"bad length prefix {MAX_FRAME_BYTES + 2}"),
        (struct.pack(">I", 6400) + b"\0" * 100, "connection closed 100 bytes into"),
    ],
)
def test_malformed_socket_frames_end_only_that_connection(socket_session, bad, reason):
    s, src, log = socket_session
    c, _ = connect(src.address)
    c.sendall(audio_frame(0.2))  # good audio first: it is kept
    c.sendall(bad)
    if "closed" in reason:
        c.shutdown(socket.SHUT_WR)
    reply = read_all(c)
    c.close()
    if "closed" not in reason:
        assert f"ERROR {reason}" in reply
    assert reason in src.errors[-1] and src.protocol_errors == 1
    assert any("still listening" in line for line in log)
    # the session is alive: a following good client works
    c2, hello = connect(src.address)
    assert hello.startswith("OK")
    c2.sendall(audio_frame(0.8, seed=1) + struct.pack(">I", CTRL_END))
    c2.close()
    assert len(collect(s, limit_s=20)) == 25  # 0.2 s + 0.8 s


def test_second_client_is_refused(socket_session):
    s, src, _ = socket_session
    c1, hello1 = connect(src.address)
    c2, hello2 = connect(src.address)
    assert hello1.startswith("OK") and hello2.startswith("BUSY")
    assert read_all(c2) == "" and src.refused == 1  # then closed by the server
    c2.close()
    c1.sendall(audio_frame(0.4) + struct.pack(">I", CTRL_END))
    c1.close()
    assert len(collect(s, limit_s=20)) == 10


def test_socket_interrupt_message(socket_session):
    s, src, _ = socket_session
    c, _ = connect(src.address)
    c.sendall(audio_frame(0.4) + struct.pack(">I", CTRL_INTERRUPT))
    deadline = time.monotonic() + 10
    while s.stats.interruptions == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.stats.interruptions == 1
    c.sendall(struct.pack(">I", CTRL_END))
    c.close()


def test_socket_token_and_remote_binding():
    with pytest.raises(InputError, match="--allow-remote"):
        SocketSource("0.0.0.0", 0)
    with pytest.raises(InputError, match="--token"):
        SocketSource("0.0.0.0", 0, allow_remote=True)
    src = SocketSource("127.0.0.1", 0, token="s3cret", log=lambda m: None)
    try:
        c, _ = connect(src.address)
        c.sendall(audio_frame(0.1))
        assert "ERROR this server needs a token" in read_all(c)
        c.close()
        c, _ = connect(src.address)
        c.sendall(struct.pack(">IB", 0xFFFFFFFD, 6) + b"s3cret" + audio_frame(0.1))
        c.sendall(struct.pack(">I", CTRL_END))
        pieces = list(src)
        assert sum(p.shape[0] for p in pieces) == 1600
        c.close()
    finally:
        src.close()


def test_live_cli_rejects_non_loopback_listen(capsys):
    code = main(["live", "--listen", "0.0.0.0:0", "--null"])
    err = capsys.readouterr().err
    assert code == 2 and "--allow-remote" in err and "Traceback" not in err


# ---- sinks --------------------------------------------------------------------------------------
def test_virtualcam_device():
    from edgetalk.runtime.sinks import VirtualCamSink

    try:
        sink = VirtualCamSink(32)
    except InputError as e:
        print(f"skipped: {e}")
        pytest.skip(f"no virtual camera here: {e}")
    with sink:
        from edgetalk.runtime.scheduler import Frame

        sink.write(Frame(0, 0.0, np.zeros((32, 32, 3), np.uint8)))


@pytest.mark.parametrize("flag, words", [("--virtualcam", "virtual"), ("--preview", "preview")])
def test_live_cli_sink_errors_are_one_line(micro_ckpt, capsys, flag, words):
    from edgetalk.runtime.sinks import PreviewSink, VirtualCamSink

    try:  # where the device or display exists, there is no error to check
        (VirtualCamSink(32) if flag == "--virtualcam" else PreviewSink()).close()
    except InputError:
        pass
    else:
        pytest.skip(f"{flag} works on this machine")
    argv = ["live", "--checkpoint", str(micro_ckpt), "--listen", "127.0.0.1:0", flag]
    code = main([*argv, "--seconds", "5"])
    out = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out.out + out.err
    line = out.err.strip()
    assert line.startswith("edgetalk live: error:") and "\n" not in line and words in line


def test_live_cli_mic_error_is_one_line(capsys):
    try:
        import sounddevice  # noqa: F401

        pytest.skip("sounddevice is installed; a device may exist")
    except (ImportError, OSError):
        pass
    code = main(["live", "--mic", "--null", "--seconds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--mic" in err and "Traceback" not in err


def test_import_edgetalk_stays_cheap():
    code = (
        "import sys, edgetalk; assert 'torch' not in sys.modules and 'numpy' not in sys.modules; "
        "assert edgetalk.Session.__name__ == 'Session'; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
