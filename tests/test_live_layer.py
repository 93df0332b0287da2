"""The live layer's shape: frames carry exactly the audio they show (so nothing downstream keeps
a copy of the audio to re-attach it), and the live modules import without cycles."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest

from edgetalk.errors import InputError
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.pacing import Pacer
from edgetalk.runtime.scheduler import StreamScheduler
from edgetalk.runtime.session import Session

from .conftest import MICRO, seeded_model, speechlike

SPF = 640
PACKAGE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend():
    return TorchBackend(seeded_model(MICRO))


def padded(x: np.ndarray) -> np.ndarray:
    return np.pad(x, (0, -x.shape[0] % SPF))


def cat(frames, attr):
    return np.concatenate([getattr(f, attr) for f in frames])


def test_scheduler_frames_tile_the_pushed_audio(backend):
    """Own and partner audio, odd piece sizes, an interrupt and a flush: the frames' audio,
    concatenated, is the audio pushed, less exactly what the interrupt dropped."""
    res = MICRO.render.resolution
    sched = StreamScheduler(backend, np.zeros((res, res, 3), np.uint8))
    own, par = speechlike(0.8), speechlike(0.8, seed=5)
    cut, frames = 6000, []
    for i in range(0, cut, 777):
        frames += sched.push_audio(own[i : min(i + 777, cut)], par[i : min(i + 777, cut)])
    kept = len(frames) * SPF  # the interrupt drops everything not yet shown
    assert 0 < kept < cut
    assert sched.interrupt() == cut - kept
    frames += sched.push_audio(own[cut:], par[cut:])
    frames += sched.flush()
    assert [f.index for f in frames] == list(range(len(frames)))
    want_own = padded(np.concatenate([own[:kept], own[cut:]]))
    want_par = padded(np.concatenate([par[:kept], par[cut:]]))
    assert all(f.audio.shape == (SPF,) and f.partner.shape == (SPF,) for f in frames)
    np.testing.assert_array_equal(cat(frames, "audio"), want_own)
    np.testing.assert_array_equal(cat(frames, "partner"), want_par)
    # Without a partner stream the frames say so, and the flushed tail is zero-padded.
    sched.reset()
    frames = sched.push_audio(own[:3000]) + sched.flush()
    assert all(f.partner is None for f in frames)
    np.testing.assert_array_equal(cat(frames, "audio"), padded(own[:3000]))


@pytest.mark.parametrize("paired", [True, False])
def test_session_frames_tile_the_pushed_audio(backend, paired):
    """Through a Session (its queues, its worker, an interrupt, close()): the delivered frames'
    audio is the pushed audio, own and partner, sample for sample."""
    own, par = speechlike(1.0), speechlike(1.0, seed=3)
    with Session(backend=backend, realtime=False) as s:
        if paired:
            s.push_audio(own, par)
        else:
            s.push_partner(par)
            s.push_audio(own)
        s.close()
        first = list(s.frames())
    assert len(first) == 25
    np.testing.assert_array_equal(cat(first, "audio"), own)
    np.testing.assert_allclose(cat(first, "partner_audio"), par, atol=1e-6)

    # An interrupt before anything was read: the first speech is gone, the second one tiles.
    with Session(backend=backend, realtime=False) as s:
        s.push_audio(own[:8000], par[:8000])
        s.interrupt()
        end = s.push_audio(own[8000:], par[8000:])
        s.close()
        frames = list(s.frames())
    assert end == 8000  # where the pushed audio ends on the timeline (frames 0..12.5)
    assert [f.index for f in frames] == list(range(len(frames)))
    np.testing.assert_array_equal(cat(frames, "audio"), padded(own[8000:]))
    np.testing.assert_allclose(cat(frames, "partner_audio"), padded(par[8000:]), atol=1e-6)


def test_pacing_policy_on_a_fake_clock():
    """Silence up to the wall clock when idle, the presentation anchor, late frames and how many
    to skip to catch up: decided from the clocks alone (chunk 2, lookahead 1280 samples: 80 ms, floor 160 ms)."""
    t = [100.0]
    p = Pacer(True, "drop", chunk=2, lookahead_samples=1280, clock=lambda: t[0])
    p.start()
    assert p.silence_needed(0) == 0
    t[0] += 0.2  # 200 ms without audio
    assert p.silence_needed(0) == 5 * SPF and p.silence_needed(5 * SPF) == 0
    p.audio_arrived()
    t[0] += 0.05
    assert p.silence_needed(5 * SPF) == 0  # audio came 50 ms ago: not idle, not a chunk behind
    assert p.present(0) == (0.0, False)  # anchored now: after the 160 ms floor already
    wait, late = p.present(5)
    assert wait == pytest.approx(0.2) and not late
    t[0] += 0.2 + 0.1  # frame 5 is handed out 100 ms after its time: more than a chunk
    assert p.present(5) == (0.0, True) and p.drop_late
    assert p.frames_to_skip(5, waiting_frames=10) == 3  # 100 ms behind: 2.5 frames, rounded up
    assert p.frames_to_skip(8, waiting_frames=10) == 0  # frame 8 is due later: not behind
    assert p.raised_s == 0.0
    # Two frames of audio in hand, and a chunk needs four (2 + 80 ms lookahead): a skip would
    # wait for audio that comes in real time, so frame 5 would be as late. The delay grows
    # instead: frame 5 on time with half a chunk (40 ms) to spare.
    assert p.frames_to_skip(5, waiting_frames=2) == 0
    assert p.raised_s == pytest.approx(0.06)
    assert p.present(5) == (0.0, False) and p.frames_to_skip(5, waiting_frames=10) == 0
    p.computed(0.3, 2)  # one slow chunk: the estimate follows it at once (lateness is judged by it)
    assert p.compute_s == pytest.approx(0.3)
    p.computed(0.1, 2)  # and comes down gradually
    assert p.compute_s == pytest.approx(0.26)
    # The budget is judged by the typical chunk: one stalled chunk (a hypervisor pause) costs
    # frames but does not raise the delay for good; a slowness that lasts does.
    q = Pacer(True, "drop", chunk=2, lookahead_samples=1280, clock=lambda: t[0])
    q.start()
    q.audio_arrived()
    q.t0 = t[0]  # frame 0 is due now
    for _ in range(4):
        q.computed(0.02, 2)
    q.computed(0.5, 2)
    assert q.frames_to_skip(0, waiting_frames=2) == 0 and q.raised_s == 0.0
    for _ in range(3):
        q.computed(0.5, 2)
    assert q.frames_to_skip(0, waiting_frames=2) == 0
    assert q.raised_s == pytest.approx(0.5 - 0.04)  # frame 0 on time, half a chunk to spare
    # Taking it back (in pauses, frame by frame): not while the machine is as slow as when it
    # was raised; then only while the delay without that frame still covers the audio the
    # chunk needs (floor 160 ms), the typical compute and half a chunk; never more than raised.
    assert not q.can_lower()  # the last chunks still take 500 ms
    for _ in range(5):
        q.computed(0.02, 2)  # the neighbour is gone
    n = 0
    while q.can_lower():
        q.lower()
        n += 1
    # a delay of 460 ms (all of it raised) comes down to 160 + 20 + 40 = 220 ms
    assert n == 6 and q.lowered_s == pytest.approx(0.24) and q.lowered_s <= q.raised_s
    assert q.t0 - q.origin == pytest.approx(0.46 - 0.24)
    r = Pacer(True, "drop", chunk=2, lookahead_samples=1280, clock=lambda: t[0])
    r.start()
    r.audio_arrived()
    r.t0 = r.origin + r.floor_s + 0.52
    r.raised_s = 0.1  # only 100 ms of the delay was raised: two whole frames to take back
    r.computed(0.02, 2)
    while r.can_lower():
        r.lower()
    assert r.lowered_s == pytest.approx(0.08)
    p.interrupted()  # a barge-in: the avatar idles from here
    assert p.silence_needed(int(0.5 * 16000)) > 0
    mark = Pacer(True, "mark", chunk=2, lookahead_samples=1280, clock=lambda: t[0])
    mark.start()
    mark.t0 = t[0] - 1.0
    assert mark.frames_to_skip(0, 10) == 0 and mark.present(0) == (0.0, True)
    offline = Pacer(False, "drop", chunk=2, lookahead_samples=1280, clock=lambda: t[0])
    offline.start()
    offline.audio_arrived()
    t[0] += 10.0
    assert offline.silence_needed(0) == 0 and offline.present(1000) == (0.0, False)
    with pytest.raises(InputError, match="late policy"):
        Pacer(True, "skip", chunk=2, lookahead_samples=1280, clock=time.monotonic)


def _imports(path: Path) -> set[str]:
    """Modules of this package that `path` imports, at module level or inside functions."""
    mod = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    pkg = mod.rsplit(".", 1)[0].split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in names if (PACKAGE / (n.replace(".", "/") + ".py")).exists()}
            if (PACKAGE / (target.replace(".", "/") + ".py")).exists():
                out.add(target)
    return out


def test_live_modules_import_without_cycles():
    """No module of the live layer reaches itself through imports (lazy ones included), and the
    session, the sources and the socket source import on their own."""
    graph = {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts): _imports(p)
        for p in (PACKAGE / "runtime").glob("*.py")
    }
    live = ["runtime.session", "runtime.pacing", "runtime.sources", "runtime.socket_source"]
    live += ["runtime.audio_io", "runtime.netaddr"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    assert all(m in graph for m in live), sorted(graph)
    cycles = [m for m in live if reaches(m, m, set())]
    assert not cycles, f"import cycles through {cycles}"
    assert "runtime.socket_source" not in graph["runtime.sources"]
    assert "runtime.sources" not in graph["runtime.session"]


def test_two_loopback_questions():
    """The served host and Host headers are judged by their text (no DNS: rebinding); a socket
    to bind is judged by where it resolves."""
    from edgetalk.runtime.netaddr import names_loopback, resolves_to_loopback

    assert all(names_loopback(h) for h in ("localhost", "127.0.0.2", "[::1]", "LOCALHOST."))
    assert not any(names_loopback(h) for h in ("0.0.0.0", "::", "example.com", "10.0.0.1"))
    assert resolves_to_loopback("127.0.0.1") and resolves_to_loopback("localhost")
    assert not resolves_to_loopback("0.0.0.0")


def test_timeline_audio_holds_what_is_not_handed_out():
    """The Session's copy of the timeline's audio (frames(gaps=True) hands it out ahead of the
    worker): any span of what is held, across the pieces it came in; released from the front as
    frames go out, truncated from the back by an interrupt."""
    from edgetalk.runtime.timeline_audio import TimelineAudio

    x = np.arange(5000, dtype=np.float32)
    a = TimelineAudio()
    for lo, hi in ((0, 700), (700, 710), (710, 3000), (3000, 5000)):
        a.append(x[lo:hi])
    a.append(x[:0])
    assert (a.start, a.end) == (0, 5000)
    np.testing.assert_array_equal(a.take(640, 1280), x[640:1280])
    np.testing.assert_array_equal(a.take(0, 5000), x)
    assert a.take(3000, 3000).shape == (0,)
    a.release(705)
    np.testing.assert_array_equal(a.take(705, 3100), x[705:3100])
    with pytest.raises(ValueError):
        a.take(640, 1280)  # released
    a.truncate(2000)
    assert (a.start, a.end) == (705, 2000)
    with pytest.raises(ValueError):
        a.take(1280, 2560)  # past the end
    a.append(x[2000:2100])
    np.testing.assert_array_equal(a.take(1900, 2100), x[1900:2100])
    a.release(10_000)  # past the end: nothing is held, the next sample is still 2100
    assert (a.start, a.end) == (2100, 2100)
    a.truncate(0)  # an interrupt never rewinds below what was handed out
    assert (a.start, a.end) == (2100, 2100)
