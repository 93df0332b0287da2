"""CPU threads for the model: one `--threads` option for every command that runs one, its default,
and applying it to torch (ONNX Runtime takes it per session, see backend_onnxruntime.py).

The default is half the logical cores, at most 2, at least 1. A live avatar always runs beside
other work (the call app, the browser, TTS): a thread pool as wide as the machine spin-waits and
stalls whenever one of its threads is descheduled, so one busy neighbour costs far more than its
share. Measured with `edgetalk bench --threads 1,2 --load 1` (README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import contextlib
import os

MAX_DEFAULT = 2
ENV = "EDGETALK_THREADS"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1  # the cores this process may actually use
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def spare_cores(threads: int | None = None) -> bool:
    """Room for a second set of the model's threads beside the first: the scheduler's overlap
    (a chunk's decoder on a worker beside the next chunk's audio and generator) pays only then.
    Both sides may use `threads` each (torch's OpenMP team runs on the caller too): on 2 cores
    at 2 threads that oversubscribed them, 0.71x for torch at C=4."""
    return cpu_count() >= 2 * resolve(threads)


def default_threads(cores: int | None = None) -> int:
    """min(2, cores // 2), at least 1; EDGETALK_THREADS overrides it."""
    env = os.environ.get(ENV, "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cores = cpu_count() if cores is None else cores
    return max(1, min(MAX_DEFAULT, cores // 2))


def add_threads_option(p: argparse.ArgumentParser) -> None:
    from .. import cliargs

    p.add_argument(
        "--threads",
        type=cliargs.int_in(1),
        metavar="N",
        help="CPU threads for the model (torch and onnxruntime; default: min(2, cores/2), "
        f"or ${ENV}); fewer threads hold up better beside other busy programs",
    )


_chosen: int | None = None  # the command's --threads, for backends opened deeper down


def set_threads(threads: int | None) -> None:
    """Make `threads` what every backend opened later in this process uses (None: the default)."""
    global _chosen
    _chosen = threads


def resolve(threads: int | None) -> int:
    if threads is not None:
        return threads
    return _chosen if _chosen is not None else default_threads()


def apply_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (and, once per process, its inter-op pool) to `threads`.

    Call it after the backend is open: torch is left alone when nothing has imported it (an
    ONNX, Core ML or MLX run should not pay for importing torch just to configure it)."""
    import sys

    n = resolve(threads)
    torch = sys.modules.get("torch")
    if torch is None:
        return n

    torch.set_num_threads(n)
    # The scheduler runs modules one after another: a wide inter-op pool only competes. torch
    # refuses once it is set or parallel work has started; then the first setting stands.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return n
