"""The own-voice audio of a live Session's timeline, from the next frame to hand out to its end.

The worker turns audio into frames a chunk at a time, and late when the CPU is busy. A sink that
plays audio on its own clock needs each frame's 640 samples at the frame's time whatever the
worker has reached, so the Session keeps this copy from the moment audio joins the timeline
(pushed or fed as silence) until its frame is handed out. Bounded by what the timeline holds
unrendered: the Session's input cap, its output queue and the chunk in flight.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class TimelineAudio:
    def __init__(self) -> None:
        self._parts: deque[np.ndarray] = deque()
        self.start = 0  # timeline sample of the first sample held
        self.end = 0  # timeline sample after the last one held

    def append(self, x: np.ndarray) -> None:
        if x.shape[0]:
            self._parts.append(x)
            self.end += x.shape[0]

    def release(self, upto: int) -> None:
        """Forget the samples before `upto` (their frames were handed out)."""
        while self._parts and self.start < upto:
            head = self._parts[0]
            k = min(upto - self.start, head.shape[0])
            if k == head.shape[0]:
                self._parts.popleft()
            else:
                self._parts[0] = head[k:]
            self.start += k
        self.start = max(self.start, min(upto, self.end))

    def truncate(self, end: int) -> None:
        """Forget the samples from `end` on (an interrupt discarded them)."""
        while self._parts and self.end > end:
            tail = self._parts[-1]
            k = min(self.end - end, tail.shape[0])
            if k == tail.shape[0]:
                self._parts.pop()
            else:
                self._parts[-1] = tail[: tail.shape[0] - k]
            self.end -= k
        self.end = max(min(self.end, end), self.start)

    def take(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b) of the timeline; they must be held."""
        if not (self.start <= a <= b <= self.end):
            raise ValueError(f"samples [{a}, {b}) are not held ([{self.start}, {self.end}))")
        out, pos = [], self.start
        for part in self._parts:
            lo, hi = max(a, pos), min(b, pos + part.shape[0])
            if lo < hi:
                out.append(part[lo - pos : hi - pos])
            pos += part.shape[0]
            if pos >= b:
                break
        if not out:
            return np.zeros(0, np.float32)
        return np.concatenate(out) if len(out) > 1 else out[0].copy()
