"""Competing load for `bench --load N`: N busy processes beside the benchmark, as a live avatar has
the call app, the browser and the TTS beside it. Each spins one core in plain Python until stopped.
"""

from __future__ import annotations

import subprocess
import sys

SPIN = "while True: pass"


class BusyLoad:
    """`with BusyLoad(n):` runs n busy processes for the duration of the block (n = 0: none)."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> BusyLoad:
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", SPIN],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """End the load now (also at the end of the block)."""
        for p in self.procs:  # only the processes this object started, by their handle
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs.clear()
