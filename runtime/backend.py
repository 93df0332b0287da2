"""The one backend interface: run a module on named numpy arrays, get named numpy arrays back.

Backends know nothing about streaming; the scheduler owns every piece of state, except where the
KV cache's K/V are stored: `new_cache()` makes the scheduler's cache, numpy by default, device
buffers on the GPU backends, so a GPU keeps its cache without a mirror. Each backend is
one file named `backend_<name>.py` in `runtime/` or `runtime_cuda/` that sets `BACKEND = <class>`;
`registry.py` discovers them, so a new backend touches no other file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..errors import InputError
from ..models.config import ModelConfig
from ..models.io_spec import ModuleIO
from .cache import KVCache

if TYPE_CHECKING:
    from .bundle import Bundle


class Backend(ABC):
    name: ClassVar[str]
    # Bundle targets this backend can execute, e.g. ("onnx",). "torch" runs checkpoints.
    targets: ClassVar[tuple[str, ...]] = ()
    # Whether two modules may run at once from two threads (the scheduler's overlap): the
    # CPU runtimes, whose sessions/modules share no mutable state between calls.
    concurrent_modules: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, io: dict[str, ModuleIO], precision: str = "fp32"):
        self.cfg = cfg
        self.io = io
        self.precision = precision

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(can run here, reason if not). Cheap: imports only, no model loading."""
        return True, ""

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Backend:
        raise NotImplementedError(f"backend {cls.name!r} does not load bundles")

    @abstractmethod
    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one module. Inputs and outputs are bound by name, per `self.io[module]`: numpy
        float32, except k_cache/v_cache, which are the storage of a cache from `new_cache()`."""

    def prepare_photo(
        self, feed: dict[str, np.ndarray], module: str = "decoder"
    ) -> dict[str, np.ndarray]:
        """`module`'s per-avatar inputs, with whatever this backend derives from them once per
        avatar rather than in every call; the scheduler keeps the result and feeds it to each
        call of the module with the inputs that change. The decoder's are the photo and what
        the appearance stage made of it; the generator's, the reference motion. The
        contract's inputs stay as they are."""
        return feed

    def decode_levels(self, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """The decoder's frames for `inputs` as 8-bit levels [N, R, R, 3], the bytes
        scheduler.to_uint8 makes of its float frames, where this backend converts each frame
        itself as it renders it; None (the default): the scheduler runs the decoder's
        contract and converts the chunk."""
        return None

    def new_cache(self, cfg: ModelConfig | None = None) -> KVCache:
        """A KV cache for one stream, stored where this backend's generator reads it. It has the
        backend's own streaming settings (its graphs' shapes); backends override `_cache`."""
        if cfg is not None and cfg != self.cfg:
            raise InputError("a backend's cache has the backend's own streaming settings")
        return self._cache()

    def _cache(self) -> KVCache:
        return KVCache(self.cfg)

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"

    def check_graph_io(
        self, module: str, graph: dict[str, tuple], file: str = "", spec: ModuleIO | None = None
    ) -> None:
        """Refuse a graph whose tensors differ from the manifest: a manifest can be edited (and
        re-hashed) without re-exporting, and a graph of other shapes would fail mid-stream.

        `graph` maps each input and output name the graph declares to its shape, or to None where
        the format leaves it undeclared (a dimension that is not a fixed integer breaks the
        static-shape contract)."""
        from ..errors import BundleError

        where = f"{module} graph {file}".rstrip()
        spec = spec or self.io[module]  # or another form of its contract (decoder_per_frame)
        want = {t.name: tuple(t.shape) for t in (*spec.inputs, *spec.outputs)}
        if set(graph) != set(want):
            extra, missing = sorted(set(graph) - set(want)), sorted(set(want) - set(graph))
            raise BundleError(
                f"{where} does not match the manifest: tensors {missing} missing from the graph, "
                f"{extra} not in the manifest; re-export the bundle"
            )
        for name, shape in want.items():
            if graph[name] is None:
                continue
            got = tuple(d if isinstance(d, int) else str(d) for d in graph[name])
            if got != shape:
                raise BundleError(
                    f"{where}: {name} has shape {list(got)} in the graph but {list(shape)} in the "
                    "manifest; re-export the bundle"
                )
