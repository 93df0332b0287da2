"""One allocator state for every backend a bench run measures (glibc's malloc, Linux).

glibc serves a large block from the heap or maps it fresh, by a threshold it moves as blocks
are freed, and it gives the heap's top back to the system past another. Torch eager allocates
its tensors anew in every call, so whether they come back as reused memory or as fresh pages
(a page fault each 4 KB) depends on what the process allocated before. In one interleaved bench
process, ONNX Runtime's arenas change that history: on the Intel Xeon at C=4, one thread, torch
eager ran at 72-75 FPS in three interleaved runs and at 84-86 alone, while ONNX Runtime moved by
3%. Fixing both thresholds (large blocks mapped only from MMAP_THRESHOLD, the heap never
trimmed) gave torch 85-88 in every interleaved run. The ratios between backends then compare
the backends, not the allocator's history.

Only `edgetalk bench` does this, for its own process; `run`, `live` and `serve` leave the
allocator as the system has it (their speed did not change with it: `run` at C=4, torch 91-96
FPS, ONNX INT8 131-137 FPS either way). A user's own MALLOC_* or GLIBC_TUNABLES settings win,
and EDGETALK_BENCH_ALLOCATOR=system leaves it alone (the test suite, which runs bench in its
own process, sets it).
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks from 32 MB up are still mapped
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
SWITCH = "EDGETALK_BENCH_ALLOCATOR"  # "system": leave the allocator alone


def steady_allocator() -> str:
    """Fix glibc's thresholds for this process where it can; -> what was done, for the report."""
    if os.environ.get(SWITCH) == "system":
        return f"allocator as the system has it ({SWITCH}=system)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "allocator as the system has it (not glibc)"
    mine = [k for k in USER_SETTINGS if k in os.environ]
    if mine:
        return f"allocator as set by {', '.join(mine)}"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(
            M_TRIM_THRESHOLD, TRIM_THRESHOLD
        )
    except (OSError, AttributeError):
        ok = 0
    if not ok:
        return "allocator as the system has it (mallopt refused)"
    return (
        f"glibc malloc fixed for the run: blocks mapped from {MMAP_THRESHOLD >> 20} MB, "
        "the heap never trimmed (benchmarks/allocator.py)"
    )
