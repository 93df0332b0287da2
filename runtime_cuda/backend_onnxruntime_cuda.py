"""ONNX Runtime on an NVIDIA GPU: the TensorRT execution provider when onnxruntime has it (engines
cached on disk), else the CUDA execution provider; I/O bound on the device with io_binding().

Every input and output is an OrtValue allocated once on the GPU and bound once; a call copies the
per-chunk inputs in (`update_inplace`), runs, and copies the outputs out. The KV cache is this
backend's (`new_cache`, device_cache.py): its K/V are OrtValues on the GPU, bound to the
generator as they are, and each chunk's new K/V go from the generator's output OrtValues into
their slots through a tiny ScatterElements graph, never through the host. Per-avatar inputs are
re-uploaded only when they change.

The bound OrtValues and the IOBinding are per module and shared by every caller, so a lock per
module serialises calls from sessions that share the backend (`serve`); each session has its own
cache.

`device="cpu"` with providers=["CPUExecutionProvider"] runs the same binding and residency code
on CPU OrtValues; the registry never picks it, the tests use it to check the logic in CI.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable
from ..runtime.backend import Backend
from ..runtime.backend_onnxruntime import graph_spec
from .device_cache import OrtDeviceKVCache, OrtSlotWriter
from .gpu import probe
from .residency import TransferLog

KV = ("k_cache", "v_cache")
# per-avatar: upload only when the content changes
WHOLE = ("ref_motion", "app_feat", "image", "dec_proj", "dec_basis", "dec_lips")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def trt_cache_dir(bundle) -> Path:
    """Where the TensorRT EP keeps its engines: EDGETALK_TRT_CACHE, else inside the bundle when it
    is writable (extra files do not disturb its hashes), else the user's cache directory."""
    env = os.environ.get("EDGETALK_TRT_CACHE")
    if env:
        return Path(env)
    if os.access(bundle.path, os.W_OK):
        return bundle.path / "trt_cache"
    key = bundle.manifest.get("export_key", "bundle")
    return Path.home() / ".cache" / "edgetalk" / "ort_trt" / f"{bundle.path.name}-{key}"


class OnnxRuntimeCudaBackend(Backend):
    name = "onnxruntime-cuda"
    targets = ("onnx",)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime-gpu)"
        reasons = []
        gpu, why = probe()
        if gpu is None:
            reasons.append(why)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reasons.append(
                f"onnxruntime {ort.__version__} has no CUDA execution provider "
                "(pip install onnxruntime-gpu)"
            )
        return not reasons, "; ".join(reasons)

    @staticmethod
    def choose_providers(bundle, device_id: int = 0, tensorrt: bool = True) -> list:
        import onnxruntime as ort

        have = ort.get_available_providers()
        providers: list = []
        if tensorrt and "TensorrtExecutionProvider" in have:
            cache = trt_cache_dir(bundle)
            cache.mkdir(parents=True, exist_ok=True)
            providers.append(
                (
                    "TensorrtExecutionProvider",
                    {
                        "device_id": device_id,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": str(cache),
                        # The graph's own precision: fp16 bundles already carry fp16 weights with
                        # the sensitive ops kept fp32; QDQ int8 bundles need int8 enabled.
                        "trt_int8_enable": bundle.precision == "int8",
                    },
                )
            )
        providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
        return providers

    def __init__(
        self, bundle, device: str = "cuda", device_id: int = 0, providers=None, tensorrt=True
    ):
        import onnxruntime as ort

        if device == "cuda":
            ok, why = self.availability()
            if not ok:
                raise BackendUnavailable(f"backend 'onnxruntime-cuda' cannot run here: {why}")
        super().__init__(bundle.cfg, bundle.io, bundle.precision)
        self.device = (device, device_id)
        self.transfers = TransferLog()
        self.providers = providers or self.choose_providers(bundle, device_id, tensorrt)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.sessions, self.used = {}, {}
        for module in self.io:
            try:
                sess = ort.InferenceSession(
                    str(bundle.file(module)), opts, providers=self.providers
                )
            except Exception as e:  # onnxruntime raises its own exception types
                raise BackendUnavailable(
                    f"onnxruntime cannot load {bundle.files[module]}: {e}"
                ) from None
            self.used[module] = sess.get_providers()
            if device == "cuda" and not set(GPU_PROVIDERS) & set(self.used[module]):
                # onnxruntime falls back to the CPU silently when the CUDA libraries do not load
                raise BackendUnavailable(
                    f"onnxruntime did not start a GPU provider for {module} (it uses "
                    f"{', '.join(self.used[module])}); are the CUDA 12 and cuDNN 9 libraries installed?"
                )
            self.sessions[module] = sess
        # each graph's own contract: a decoder exported per frame runs once per frame (run)
        self.graph_io = {
            module: graph_spec(
                spec,
                module,
                {t.name: tuple(t.shape) for t in self.sessions[module].get_inputs()},
            )
            for module, spec in self.io.items()
        }

        def alloc(t):
            return ort.OrtValue.ortvalue_from_shape_and_type(
                list(t.shape), np.float32, *self.device
            )

        self.locks = {module: threading.Lock() for module in self.io}
        self.inputs, self.outputs, self.bindings = {}, {}, {}
        self.shadows: dict[str, np.ndarray] = {}
        for module, spec in self.graph_io.items():
            b = self.sessions[module].io_binding()
            # k_cache/v_cache: bound per call to the caller's cache; these take numpy K/V only
            self.inputs[module] = {t.name: alloc(t) for t in spec.inputs}
            self.outputs[module] = {t.name: alloc(t) for t in spec.outputs}
            for name, ov in self.inputs[module].items():
                if name not in KV:
                    b.bind_ortvalue_input(name, ov)
            for name, ov in self.outputs[module].items():
                b.bind_ortvalue_output(name, ov)
            self.bindings[module] = b
        kv_shape = next(t.shape for t in self.io["generator"].inputs if t.name == "k_cache")
        self.slot_writer = OrtSlotWriter(
            kv_shape, self.cfg.chunk, self.device, self.providers, opts
        )
        self.returned: dict[str, dict[str, np.ndarray]] = {}

    @classmethod
    def from_bundle(cls, bundle):
        return cls(bundle)

    def _put(self, module: str, name: str, arr: np.ndarray) -> None:
        key = f"{module}.{name}"
        if name in WHOLE:
            prev = self.shadows.get(key)
            if prev is not None and np.array_equal(prev, arr):
                return
            self.shadows[key] = np.array(arr, np.float32, copy=True)
        self.inputs[module][name].update_inplace(np.ascontiguousarray(arr, np.float32))
        self.transfers.to_device(arr.nbytes)

    def _cache(self) -> OrtDeviceKVCache:
        return OrtDeviceKVCache(self.cfg, self, self.slot_writer, self.transfers)

    def with_generator_output(self, new_k, new_v, use) -> bool:
        """use((new_k, new_v) as OrtValues) if these are what the last generator call returned
        (its output buffers still hold them); under the generator's lock. False otherwise."""
        with self.locks["generator"]:
            last = self.returned.get("generator", {})
            if last.get("new_k") is not new_k or last.get("new_v") is not new_v:
                return False
            use((self.outputs["generator"]["new_k"], self.outputs["generator"]["new_v"]))
            return True

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.locks[module]:
            if self.graph_io[module] is not self.io[module]:  # the one-frame decoder
                self.returned[module] = self._run_frames(module, inputs)
            else:
                self.returned[module] = self._run(module, inputs)
            return self.returned[module]

    def _run_frames(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        motion = inputs["motion"]
        outs = [
            self._run(module, {**inputs, "motion": motion[:, i : i + 1]})
            for i in range(motion.shape[1])
        ]
        return {name: np.concatenate([o[name] for o in outs], axis=0) for name in outs[0]}

    def _run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = self.bindings[module]
        for name in self.inputs[module]:
            if name not in KV:
                self._put(module, name, inputs[name])
            elif isinstance(inputs[name], np.ndarray):  # not a cache of ours: upload it
                self._put(module, name, inputs[name])
                b.bind_ortvalue_input(name, self.inputs[module][name])
            else:  # the device K/V of a cache from new_cache()
                b.bind_ortvalue_input(name, inputs[name])
        self.sessions[module].run_with_iobinding(b)
        out = {}
        for name, ov in self.outputs[module].items():
            # A CPU OrtValue's numpy() shares memory that the next run overwrites: copy it.
            out[name] = np.array(ov.numpy(), copy=True) if self.device[0] == "cpu" else ov.numpy()
            self.transfers.to_host(out[name].nbytes)
        return out

    def describe(self) -> str:
        return f"onnxruntime-cuda ({self.precision}, {self.used['generator'][0]})"


BACKEND = OnnxRuntimeCudaBackend
