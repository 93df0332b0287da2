"""The pacing policy of a live Session: real time, late frames, catch-up and silence.

It keeps the clocks and answers the Session's questions; the Session owns the queues and acts.

- Real time: frame i is due at t0 + i / 25. t0 is anchored when the first frame is handed out,
  no earlier than the first frame of audio arriving in real time could exist: (C + L) frames of
  audio plus the compute of a chunk after the timeline began. Frames rendered early from a burst
  wait for that delay, and later frames keep it.
- Late frames: a frame more than one chunk past its time is late. Policy "drop" skips it (the
  Session moves its audio to the next frame it hands out), "mark" hands it out marked.
- Catch-up ("drop"): audio whose frames would be late when ready is not rendered at all.
- A short budget: when even skipping all the audio that waits would leave the next frame late,
  the lateness is not a backlog but the latency itself being too short for this machine now
  (compute slower than when t0 was set: a busy neighbour, a hypervisor taking the CPU; or input
  arriving later). Skipping cannot cure that: it would drop every frame for as long as it lasts,
  and with nothing rendered the compute time is never measured again, so the avatar froze for
  good. t0 moves later instead, by just enough (the latency grows, counted in `raised_s`). It
  comes back down only in pauses (`lower`): with frames(gaps=True) the Session drops a quiet
  frame at a time while the machine has the budget again, and each takes a frame's time off
  the delay (`lowered_s`). Elsewhere it stays, since lowering it would drop the audio between.
  Only a slowness that lasts raises it: the budget is judged by the typical compute of the last
  few chunks, not by one stalled chunk. A one-off stall (a page-fault storm, a hypervisor pause)
  costs the frames it holds up, and the stream goes on at its delay; raising it for every such
  hiccup would ratchet a conversation's delay up for good.
- Silence: while no audio comes, the audio timeline is kept up with the wall clock with silence,
  so the avatar idles and a stream never needs its length up front.

Offline (realtime=False) nothing waits, nothing is late, no silence is fed.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable

from ..errors import InputError
from ..models.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

LATE_POLICIES = ("drop", "mark")
TYPICAL_CHUNKS = 3  # the budget is judged by the median compute of this many recent chunks


def check_late_policy(late_policy: str) -> None:
    if late_policy not in LATE_POLICIES:
        raise InputError(f"late policy must be one of {LATE_POLICIES}, got {late_policy!r}")


class Pacer:
    def __init__(
        self,
        realtime: bool,
        late_policy: str,
        chunk: int,
        lookahead_samples: int,
        clock: Callable[[], float],
    ):
        check_late_policy(late_policy)
        self.realtime = realtime
        self.late_policy = late_policy
        self.chunk = chunk
        self.chunk_s = chunk / FPS
        # the audio the first chunk needs: C frames and the lookahead after them
        self.floor_s = chunk / FPS + lookahead_samples / SAMPLE_RATE
        # whole frames of audio a chunk needs in hand (its C frames and the lookahead after them)
        self.chunk_frames = math.ceil(
            (chunk * SAMPLES_PER_FRAME + lookahead_samples) / SAMPLES_PER_FRAME
        )
        self.clock = clock
        self.origin: float | None = None  # when the timeline began (its sample 0)
        self.t0: float | None = None  # frame i is due at t0 + i / FPS
        self.last_push: float | None = None
        self.compute_s = 0.0  # recent compute time of one chunk (moving average)
        self._recent: deque[float] = deque(maxlen=TYPICAL_CHUNKS)  # the last chunks' times
        self.raised_s = 0.0  # how much later t0 moved because the budget was short
        self.lowered_s = 0.0  # how much of that was taken back in pauses

    @property
    def drop_late(self) -> bool:
        return self.late_policy == "drop"

    @property
    def late_s(self) -> float:
        """A frame handed out more than this past its time is late: one chunk."""
        return self.chunk_s

    # ---- events --------------------------------------------------------------------------------
    def start(self) -> None:
        """The stream starts. In real time the timeline starts now: the avatar idles until audio
        arrives. Offline it starts with the first audio."""
        if self.realtime:
            self.origin = self.last_push = self.clock()

    def audio_arrived(self) -> None:
        now = self.clock()
        if self.origin is None:
            self.origin = now
        self.last_push = now

    def interrupted(self) -> None:
        """After a barge-in the avatar idles from here: silence may fill at once."""
        if self.realtime:
            self.last_push = self.clock() - 2 * self.chunk_s

    def computed(self, seconds: float, frames: int) -> None:
        """`frames` frames took `seconds` to render."""
        dt = seconds * self.chunk / frames
        self._recent.append(dt)
        # Up at once, down gradually: a frame judged on time by a stale, lower estimate would be
        # rendered only to be dropped as late when handed out.
        self.compute_s = dt if dt > self.compute_s else 0.8 * self.compute_s + 0.2 * dt

    # ---- decisions -----------------------------------------------------------------------------
    def silence_needed(self, timeline_samples: int) -> int:
        """Samples of silence (whole frames) to feed now, or 0: when no audio came for a chunk, or
        the audio timeline (`timeline_samples` long) fell more than a chunk behind the wall clock."""
        if not self.realtime:
            return 0
        now = self.clock()
        gap = int((now - self.origin) * SAMPLE_RATE) - timeline_samples
        idle = now - (self.last_push or self.origin) > self.chunk_s
        if gap < SAMPLES_PER_FRAME or not (idle or gap > self.chunk * SAMPLES_PER_FRAME):
            return 0
        return gap // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME

    def _behind(self, next_index: int) -> float:
        """How late the next frame would be when ready (now + the usual compute time of a
        chunk); 0 where nothing is ever skipped (offline, late frames marked, not started)."""
        if not (self.realtime and self.drop_late) or self.t0 is None:
            return 0.0
        return self.clock() + self.compute_s - (self.t0 + next_index / FPS)

    def late(self, next_index: int) -> bool:
        """Catch-up is due: the next frame would be more than a chunk late when ready."""
        return self._behind(next_index) > self.late_s

    def frames_to_skip(self, next_index: int, waiting_frames: int) -> int:
        """Catch-up: how many of the next frames (whose audio waits, `waiting_frames` of them, not
        yet rendered) would be more than a chunk late when ready. Skip them unrendered."""
        behind = self._behind(next_index)
        if behind <= self.late_s:
            return 0
        # Skipping helps only as far as the audio after the skip is already here: a chunk (and
        # its lookahead) must remain to render at once. Audio still to come arrives in real
        # time, so skipping into it leaves the frame after it just as late.
        spare = max(0, waiting_frames - self.chunk_frames)
        k = min(math.ceil(behind * FPS), spare)
        # A short budget, not a backlog, if the next frame stays late at the typical compute
        # time (the moving average jumps to a single stalled chunk's).
        rest = behind - k / FPS - max(0.0, self.compute_s - self.typical_compute_s())
        if rest > self.late_s:
            raise_s = rest - self.chunk_s / 2  # the next frame on time, half a chunk to spare
            self.t0 += raise_s
            self.raised_s += raise_s
        return k

    def typical_compute_s(self) -> float:
        """The median compute time of the last chunks (one stalled chunk does not move it)."""
        return statistics.median(self._recent) if self._recent else self.compute_s

    def can_lower(self) -> bool:
        """A frame's time can come off a raised delay: some of it is left to take back, and the
        delay without it still covers the audio the next chunk needs, its typical compute and
        half a chunk to spare (what a raise leaves)."""
        if not (self.realtime and self.drop_late) or self.t0 is None or self.origin is None:
            return False
        if self.raised_s - self.lowered_s < 1 / FPS - 1e-9:
            return False
        need = self.origin + self.floor_s + self.typical_compute_s() + self.chunk_s / 2
        return self.t0 - 1 / FPS >= need - 1e-9

    def lower(self) -> None:
        """The Session dropped a quiet frame: every later frame is due a frame's time earlier."""
        self.t0 -= 1 / FPS
        self.lowered_s += 1 / FPS

    def due(self, index: int) -> float | None:
        """When frame `index` is due on the clock (None offline, or before the anchor)."""
        if not self.realtime or self.t0 is None:
            return None
        return self.t0 + index / FPS

    def present(self, index: int) -> tuple[float, bool]:
        """Frame `index` is next to be handed out: (seconds until it is due, whether it is late)."""
        if not self.realtime:
            return 0.0, False
        now = self.clock()
        if self.t0 is None:
            self.t0 = max(now - index / FPS, self.origin + self.floor_s + self.compute_s)
        due = self.t0 + index / FPS
        if now < due:
            return due - now, False
        return 0.0, now - due > self.late_s
