"""MLX backend: the MLX port of the modules (runtime/mlx/) with a bundle's weights.

On Linux it runs mlx's CPU build; on a Mac, Metal (grid_sample then uses a Metal kernel). Each
module file says its precision; int8 files name the layers they quantized, and the same layers
are quantized here before the weights are loaded. Numpy float32 in and out, bound by name.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import BackendUnavailable, BundleError
from ..models.io_spec import check_inputs
from .backend import Backend


class MlxBackend(Backend):
    name = "mlx"
    targets = ("mlx",)

    @classmethod
    def availability(cls):
        try:
            import mlx.core  # noqa: F401
            import mlx.nn  # noqa: F401
        except ImportError as e:
            return False, (
                f"mlx is not importable ({e}); pip install 'edgetalk[mlx]' "
                "(mlx[cpu] on Linux, mlx on macOS)"
            )
        return True, ""

    def __init__(self, bundle):
        ok, why = self.availability()
        if not ok:
            raise BackendUnavailable(why)
        import mlx.core as mx

        from .mlx.loader import load

        super().__init__(bundle.cfg, bundle.io, bundle.precision)
        self.device = str(mx.default_device())
        self.modules = {}
        for module in self.io:
            path = bundle.file(module)
            try:
                mod, meta = load(path, bundle.cfg)
            except ValueError as e:
                raise BundleError(f"mlx cannot load {bundle.files[module]}: {e}") from None
            if meta.get("module") != module or meta.get("precision") != bundle.precision:
                raise BundleError(
                    f"{bundle.files[module]} holds the {meta.get('module')} module at "
                    f"{meta.get('precision')}, not {module} at {bundle.precision}"
                )
            listed = (bundle.manifest or {}).get("modules", {}).get(module, {}).get("info", {})
            if (
                bundle.precision == "int8"
                and "quantized_layers" in listed
                and listed["quantized_layers"] != json.loads(meta["quantized_layers"])
            ):
                raise BundleError(
                    f"{bundle.files[module]}: its quantized layers differ from the manifest's"
                )
            self.modules[module] = mod

    @classmethod
    def from_bundle(cls, bundle):
        return cls(bundle)

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import mlx.core as mx

        spec = self.io[module]
        check_inputs(module, spec, inputs)
        feed = {
            t.name: mx.array(np.ascontiguousarray(inputs[t.name], dtype=np.float32))
            for t in spec.inputs
        }
        out = self.modules[module](**feed)
        arrays = [out[t.name] for t in spec.outputs]
        mx.eval(arrays)
        return {
            t.name: np.array(a, dtype=np.float32) for t, a in zip(spec.outputs, arrays, strict=True)
        }

    def describe(self) -> str:
        return f"mlx ({self.precision}, {self.device})"


BACKEND = MlxBackend
