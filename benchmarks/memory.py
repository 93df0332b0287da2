"""Peak memory of one configuration: process RSS (and torch.cuda allocations when there is CUDA).

On Linux the kernel's own high-water mark (VmHWM) is reset before each configuration by writing
5 to /proc/self/clear_refs, so the peak includes transient allocations inside module calls.
Elsewhere the peak is the highest RSS sampled after each scheduler call.
"""

from __future__ import annotations

from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_bytes() -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    def __init__(self):
        from .deps import import_extra

        psutil = import_extra("psutil", "measuring peak memory")
        self.process = psutil.Process()
        self.hwm_reset = False
        self.sampled = 0
        self.cuda = False

    def start(self) -> PeakMemory:
        try:
            CLEAR_REFS.write_text("5")
            self.hwm_reset = _vm_hwm_bytes() is not None
        except OSError:
            self.hwm_reset = False
        self.sampled = self.process.memory_info().rss
        try:
            import torch

            self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
        except ImportError:
            self.cuda = False
        return self

    def sample(self) -> None:
        rss = self.process.memory_info().rss
        if rss > self.sampled:
            self.sampled = rss

    def peak_rss_mb(self) -> float:
        self.sample()
        peak = self.sampled
        if self.hwm_reset:
            peak = max(peak, _vm_hwm_bytes() or 0)
        return round(peak / 1e6, 2)

    def gpu_peak_mb(self) -> float | None:
        try:
            import torch
        except ImportError:
            return None
        if not torch.cuda.is_available():
            return None
        if not torch.cuda.is_initialized():
            return 0.0
        return round(torch.cuda.max_memory_allocated() / 1e6, 2)
