"""CoreML backend: runs the .mlpackage files of a coreml bundle with Core ML itself (macOS only).

Each module is one ML program with fixed shapes and fp32 inputs and outputs; inputs and outputs are
bound by name. Compute units default to ALL (CPU, GPU and Neural Engine; an fp32-typed program runs
on CPU and GPU only). EDGETALK_COREML_COMPUTE_UNITS=CPU_ONLY|CPU_AND_GPU|CPU_AND_NE|ALL overrides.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings

import numpy as np

from ..errors import BackendUnavailable, BundleError
from .backend import Backend

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def _import_coremltools():
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)  # its import notes (untested torch version...) are not errors here
    try:
        import coremltools as ct
    finally:
        log.setLevel(level)
    return ct


class CoreMLBackend(Backend):
    name = "coreml"
    targets = ("coreml",)

    @classmethod
    def availability(cls):
        system = platform.system()
        if system != "Darwin":
            return False, f"CoreML runs only on macOS; this is {system or 'an unknown system'}"
        try:
            ct = _import_coremltools()
        except ImportError:
            return False, "coremltools is not installed (pip install 'edgetalk[coreml]')"
        try:
            from coremltools.models.model import _MLModelProxy
        except ImportError:
            _MLModelProxy = None
        if _MLModelProxy is None:
            return False, (
                f"coremltools {ct.__version__} has no Core ML runtime for this Python/macOS "
                "(libcoremlpython did not load); install a coremltools wheel built for it"
            )
        return True, ""

    def __init__(self, bundle, compute_units: str | None = None):
        super().__init__(bundle.cfg, bundle.io, bundle.precision)
        ct = _import_coremltools()
        units = (compute_units or os.environ.get("EDGETALK_COREML_COMPUTE_UNITS") or "ALL").upper()
        if units not in COMPUTE_UNITS:
            raise BackendUnavailable(
                f"unknown CoreML compute units {units!r}; choose from {', '.join(COMPUTE_UNITS)}"
            )
        self.compute_units = units
        self.models = {}
        for module in self.io:  # every spec first: a mismatch is the real problem on any OS
            try:
                spec = ct.utils.load_spec(str(bundle.file(module)))
            except Exception as e:  # coremltools raises its own exception types
                raise BundleError(f"cannot read {bundle.files[module]}: {e}") from None
            self.check_graph_io(module, spec_io(spec), bundle.files[module])
        for module in self.io:
            path = bundle.file(module)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    model = ct.models.MLModel(
                        str(path), compute_units=getattr(ct.ComputeUnit, units)
                    )
            except Exception as e:  # Core ML raises its own exception types
                model, error = None, e
            else:
                # coremltools warns and keeps going when Core ML cannot compile the model.
                error = getattr(model, "_framework_error", None)
            if model is None or model.__proxy__ is None:
                why = f": {error}" if error else ""
                raise BackendUnavailable(
                    f"Core ML cannot load {bundle.files[module]}{why} (the bundle needs "
                    "macOS 14 or newer)"
                )
            self.models[module] = model

    @classmethod
    def from_bundle(cls, bundle):
        return cls(bundle)

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.io[module]
        feed = {
            t.name: np.ascontiguousarray(inputs[t.name], dtype=np.float32).reshape(t.shape)
            for t in spec.inputs
        }
        out = self.models[module].predict(feed)
        result = {}
        for t in spec.outputs:
            if t.name not in out:
                raise BackendUnavailable(
                    f"Core ML returned no output {t.name!r} for {module} (got {sorted(out)})"
                )
            result[t.name] = np.asarray(out[t.name], dtype=np.float32).reshape(t.shape)
        return result

    def describe(self) -> str:
        return f"coreml ({self.precision}, {self.compute_units})"


def spec_io(spec) -> dict[str, tuple]:
    """Each input and output of a Core ML model spec with its (fixed) multi-array shape."""
    out = {}
    for f in (*spec.description.input, *spec.description.output):
        shape = tuple(int(d) for d in f.type.multiArrayType.shape)
        out[f.name] = shape or None  # ML program outputs may leave their shape undeclared
    return out


BACKEND = CoreMLBackend
