"""Security and robustness regressions (issue #16): each test is an attack that worked before.

Serve-level attacks (HTTP, SDP, session secrets) are in test_security_serve.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgetalk.errors import BundleError, EdgeTalkError, InputError

from .conftest import MICRO, seeded_model


# ---- 1: a backend shared by sessions --------------------------------------------------------------
def _generator_inputs(backend, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in backend.io["generator"].inputs:
        x = rng.standard_normal(t.shape).astype(np.float32)
        if t.name in ("cache_valid", "mask"):
            x = (x > 0).astype(np.float32)
        out[t.name] = x
    return out


def _hammer(backend, module: str, inputs: list[dict], seconds: float) -> tuple[int, int]:
    """Threads, one per input, each running `module` on its own input again and again: (calls,
    calls whose outputs differ from that input's single-threaded outputs)."""
    want = [backend.run(module, x) for x in inputs]
    calls, wrong = [0], [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(i):
        while time.monotonic() < stop:
            got = backend.run(module, inputs[i])
            bad = any(not np.array_equal(got[k], want[i][k]) for k in want[i])
            with lock:
                calls[0] += 1
                wrong[0] += bad

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return calls[0], wrong[0]


def test_cuda_backend_is_safe_to_share_between_threads():
    """Two sessions on one backend: each call must get exactly its own single-threaded outputs
    (before: 62 of 112 outputs were another thread's)."""
    from edgetalk.runtime_cuda.backend_cuda import CudaBackend

    be = CudaBackend(seeded_model(MICRO), precision="fp32", device="cpu")
    inputs = [_generator_inputs(be, 1), _generator_inputs(be, 2)]
    calls, wrong = _hammer(be, "generator", inputs, seconds=3.0)
    assert calls >= 20 and wrong == 0, f"{wrong} of {calls} outputs were another thread's"
