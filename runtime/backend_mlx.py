"""MLX backend: the MLX port of the modules (runtime/mlx/) with a bundle's weights.

On Linux it runs mlx's CPU build; on a Mac, Metal (grid_sample then uses a Metal kernel). Each
module file says its precision; int8 files name the layers they quantized, and the same layers
are quantized here before the weights are loaded. Numpy float32 in and out, bound by name.

The KV cache is the backend's own (`new_cache`): K/V stay MLX arrays between chunks and each
chunk's new K/V go into their slots as MLX arrays, so no call converts the whole cache from numpy.
The per-chunk modules run through `mx.compile` (shapes are static; the weights are constants).
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import BackendUnavailable, BundleError
from ..models.io_spec import check_inputs
from .backend import Backend
from .cache import KVCache

KV = ("k_cache", "v_cache")
# prepare_photo's names for the generator's reference keys and values (MLX arrays), passed
# back to each generator call; no contract input has them
REFERENCE = ("generator:ref_k", "generator:ref_v")
COMPILED = ("audio", "generator", "decoder")  # appearance runs once per avatar


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

    def __init__(self, bundle, compile: bool = True):
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
        self.compiled = compile
        self.calls = {
            m: _compiled(mod, self.io[m]) if compile and m in COMPILED else mod
            for m, mod in self.modules.items()
        }
        self.returned: dict[str, dict] = {}  # the last call's outputs: numpy and MLX
        # the generator with its reference keys and values made beforehand (prepare_photo)
        gen = self.modules["generator"]
        self.reference = mx.compile(gen.reference) if compile else gen.reference
        self.generator_given_reference = (
            _compiled(gen, self.io["generator"], ("ref_k", "ref_v")) if compile else gen
        )

    @classmethod
    def from_bundle(cls, bundle):
        return cls(bundle)

    def prepare_photo(self, feed: dict, module: str = "decoder") -> dict:
        """The generator's reference keys and values, made once per avatar as MLX arrays (the
        reference token's pass through the layers, one of five in every call)."""
        if module != "generator":
            return feed
        import mlx.core as mx

        ref = mx.array(np.ascontiguousarray(feed["ref_motion"], dtype=np.float32))
        made = self.reference(ref)
        mx.eval(made)
        return {**feed, **dict(zip(REFERENCE, made, strict=True))}

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import mlx.core as mx

        spec = self.io[module]
        resident = {k: v for k, v in inputs.items() if k in KV and isinstance(v, mx.array)}
        # a cache of ours is already MLX: checked by shape through a zero-cost stand-in
        stand_in = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in resident.items()}
        check_inputs(module, spec, {**inputs, **stand_in})
        feed = {
            t.name: resident[t.name]
            if t.name in resident
            else mx.array(np.ascontiguousarray(inputs[t.name], dtype=np.float32))
            for t in spec.inputs
        }
        call = self.calls[module]
        if module == "generator" and all(k in inputs for k in REFERENCE):
            feed.update(ref_k=inputs[REFERENCE[0]], ref_v=inputs[REFERENCE[1]])
            call = self.generator_given_reference
        out = call(**feed)
        arrays = [out[t.name] for t in spec.outputs]
        mx.eval(arrays)
        got = {
            t.name: np.array(a, dtype=np.float32) for t, a in zip(spec.outputs, arrays, strict=True)
        }
        self.returned[module] = {
            "numpy": got,
            "mlx": dict(zip(spec.output_names, arrays, strict=True)),
        }
        return got

    def _cache(self) -> MlxKVCache:
        return MlxKVCache(self.cfg, self)

    def as_mlx(self, name: str, arr):
        """The MLX array the last generator call returned as `arr`, or `arr` converted."""
        import mlx.core as mx

        last = self.returned.get("generator", {})
        if last.get("numpy", {}).get(name) is arr:
            return last["mlx"][name]
        return mx.array(np.ascontiguousarray(arr, dtype=np.float32))

    def describe(self) -> str:
        return f"mlx ({self.precision}, {self.device})"


def _compiled(module, spec, extra: tuple[str, ...] = ()):
    """mx.compile over the module's call, inputs by position (compile traces positional arrays);
    `extra`: keyword inputs beyond the contract's (the generator's ref_k and ref_v)."""
    import mlx.core as mx

    names, outs = (*spec.input_names, *extra), spec.output_names

    def call(*arrays):
        out = module(**dict(zip(names, arrays, strict=True)))
        return tuple(out[n] for n in outs)

    fn = mx.compile(call)

    def run(**feed):
        return dict(zip(outs, fn(*(feed[n] for n in names)), strict=True))

    return run


class MlxKVCache(KVCache):
    """K/V as MLX arrays; the slot bookkeeping and positions are cache.py's."""

    def __init__(self, cfg, backend: MlxBackend):
        self.backend = backend
        super().__init__(cfg)

    def _allocate(self, shape):
        import mlx.core as mx

        return mx.zeros(shape, dtype=mx.float32), mx.zeros(shape, dtype=mx.float32)

    def _clear(self) -> None:
        self.k, self.v = self._allocate(self.shape)

    def _store(self, slots: np.ndarray, new_k, new_v) -> None:
        import mlx.core as mx

        k, v = self.backend.as_mlx("new_k", new_k), self.backend.as_mlx("new_v", new_v)
        for i, slot in enumerate(slots.tolist()):
            self.k[:, :, :, slot] = k[:, :, :, i]
            self.v[:, :, :, slot] = v[:, :, :, i]
        mx.eval(self.k, self.v)  # one small graph per chunk, not a chain across the stream


BACKEND = MlxBackend
