"""The one export-target interface, and their discovery.

A target is one file `converters/<name>.py` that sets `TARGET = <Target subclass>`; `targets()`
finds them the way `runtime/registry.py` finds backends, so adding a target edits no list. The
export pipeline (export/pipeline.py) owns everything shared: tracing inputs, calibration, parity
by output name, the manifest and the atomic bundle write. A target only turns one torch module
into one artifact at one precision and says how to check it.

What a target needs changed for conversion is declared here, not done to shared objects: the
pipeline applies it in one patch context (export/patching.py) on a private copy of the model.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import EdgeTalkError
from ..models.io_spec import ModuleIO

PRECISIONS = ("fp32", "fp16", "int8")


class Target(ABC):
    name: ClassVar[str]  # the --target value and the manifest's "target"
    suffix: ClassVar[str]  # a module's artifact is <part><suffix>
    parity_backend: ClassVar[str]  # the backend (runtime/registry.py) that runs the gate
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS
    # packages whose code shapes this target's artifacts, hashed into the export key (the
    # target's own file and models/ always are): a changed recipe never reuses old modules
    recipe_packages: ClassVar[tuple[str, ...]] = ()
    # Trace the decoder's bilinear sampling as gathers (models/sampling.py) instead of
    # grid_sample, for runtimes whose GridSample kernel is slow. Applied to the traced copy only.
    gather_sampling: ClassVar[bool] = False

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(can export here, why not). Cheap: imports only."""
        return True, ""

    def tool_patches(self) -> contextlib.AbstractContextManager:
        """Fixes to the converter's own tools, in force only while `convert` runs (entered by
        export/patching.py, never at import) and undone after it, error or not."""
        return contextlib.nullcontext()

    def extra_parts(self, cfg) -> dict[str, str]:
        """Graphs this target writes beside the four modules' for streaming settings `cfg`:
        part name -> the module whose contract it serves a share of (its recording, calibration
        and parity come from that module's). ONNX: the chunk-1 decoder's row bands."""
        return {}

    def part_share(self, part: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The share of its module's outputs (torch's, for the parity gate) that the extra
        graph `part` gives; its parity backend runs the graph with `run_part`."""
        raise NotImplementedError(f"{self.name} writes no extra graph {part!r}")

    @abstractmethod
    def convert(self, model, part: str, io: ModuleIO, path: Path, sample: dict | None) -> None:
        """Write the fp32 artifact of one module (`model.module(part)`) with static shapes.
        `model` is the export copy from export/patching.py, with this target's patches on."""

    @abstractmethod
    def apply_precision(
        self, precision: str, src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]
    ) -> dict:
        """Turn the fp32 artifact `src` into `dst` at `precision`; return what the manifest
        records about it (the ops kept float, the weight dtypes)."""

    def checks(self, path: Path, io: ModuleIO, precision: str) -> dict:
        """Spec checks on the finished artifact (static shapes, 8-bit ops present); raise when
        one fails, return what passed for the manifest."""
        return {}

    def timed_call(self, path: Path, sample: dict[str, np.ndarray]) -> Callable[[], object] | None:
        """One call of the artifact at `path` on `sample` (its module's inputs), on this machine
        as its runtime runs it (timing_setting), as a callable for export/speed.py to time
        against the fp32 artifact; None where this target's artifacts do not run here the way
        its runtime runs them."""
        return None

    def timing_setting(self) -> dict:
        """Where timed_call runs, recorded beside its figures (a CPU thread count, a device)."""
        return {"threads": 1}

    def runtime_aids(self, folder: Path, files: dict[str, str]) -> dict:
        """What the manifest records for this target's runtime beyond the contract, made from
        the finished artifacts (`files`: role -> file in `folder`); a file written here is
        added to `files`, so the manifest hashes it. ONNX: each graph's declared shapes and the
        stored parts of the graphs that split (runtime/photo_split.py)."""
        return {}

    def check_reused(self, part: str, info: dict) -> None:
        """Raise when an artifact kept from an earlier run (its manifest `info`) cannot serve
        here, e.g. an engine built for another GPU; the reuse key names no machine."""
        return None

    @abstractmethod
    def tool_versions(self) -> dict:
        """The converter tools' versions, recorded in the manifest."""


@cache
def targets() -> dict[str, type[Target]]:
    """Every target class in converters/, by name."""
    pkg = importlib.import_module("edgetalk.converters")
    found: dict[str, type[Target]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"edgetalk.converters.{info.name}")
        cls = getattr(mod, "TARGET", None)
        if isinstance(cls, type) and issubclass(cls, Target):
            found[cls.name] = cls
    return found


def target(name: str) -> Target:
    """The target called `name`, ready to use; one clear line when it is unknown or unusable."""
    found = targets()
    if name not in found:
        raise EdgeTalkError(f"unknown target {name!r}; choose from {', '.join(sorted(found))}")
    cls = found[name]
    ok, why = cls.availability()
    if not ok:
        raise EdgeTalkError(f"cannot export {name}: {why}")
    return cls()
