"""Open a backend from what the user gave: a bundle (backend chosen by its manifest) or a checkpoint."""

from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import InputError
from .backend import Backend
from .registry import backend_class, backend_for_target


def open_backend(
    bundle: str | Path | None = None,
    checkpoint: str | Path | None = None,
    backend: str | None = None,
    chunk: int | None = None,
    steps: int | None = None,
    window: int | None = None,
    threads: int | None = None,
) -> Backend:
    """`threads` (None: the default, runtime/threads.py) goes to torch and to backends that take
    it (onnxruntime sessions)."""
    from .threads import apply_torch_threads, resolve

    n = resolve(threads)
    be = _open(bundle, checkpoint, backend, chunk, steps, window, n)
    apply_torch_threads(n)  # after opening: torch is configured only if something imported it
    return be


def _open(bundle, checkpoint, backend, chunk, steps, window, threads: int) -> Backend:
    if bundle is not None and checkpoint is not None:
        raise InputError("give --bundle or --checkpoint, not both")
    if bundle is not None:
        from .bundle import open_bundle

        b = open_bundle(bundle, expect_chunk=chunk)
        if backend is None:
            cls = backend_for_target(b.target)
        else:
            cls = backend_class(backend)
            if b.target not in cls.targets:
                raise InputError(
                    f"backend {backend!r} cannot run a {b.target!r} bundle "
                    f"(it runs: {', '.join(cls.targets)})"
                )
        if "threads" in inspect.signature(cls.__init__).parameters:
            return cls(b, threads=threads)
        return cls.from_bundle(b)
    cls = backend_class(backend or "torch")
    if not hasattr(cls, "from_checkpoint"):
        raise InputError(f"backend {cls.name!r} runs exported bundles; pass --bundle")
    return cls.from_checkpoint(checkpoint, chunk=chunk, steps=steps, window=window)
