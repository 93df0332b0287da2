"""ONNX Runtime on an NVIDIA GPU: the TensorRT execution provider when onnxruntime has it (engines
cached on disk), else the CUDA execution provider; I/O bound on the device with io_binding().

Every input and output is an OrtValue allocated once on the GPU and bound once; a call copies the
per-chunk inputs in (`update_inplace`), runs, and copies the outputs out. The KV cache stays on
the GPU between chunks (OrtKVMirror): the slots that changed since the last call (residency.py)
are uploaded as one small block and written into the device cache by a tiny ScatterElements
graph on the same provider, ping-ponging between two device buffers (ORT cannot write a slice of
an OrtValue in place). Per-avatar inputs are re-uploaded only when they change.

The bound OrtValues, the IOBinding and the KV mirror are per module and shared by every caller,
so a lock per module serialises calls from sessions that share the backend (`serve`).

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
from .gpu import probe
from .residency import TransferLog, changed_slots, put_slots, take_slots

KV = ("k_cache", "v_cache")
SLOT_AXIS = 3
WHOLE = ("ref_motion", "app_feat", "image")  # per-avatar: upload only when the content changes
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


def scatter_model(kv_shape: tuple[int, ...], chunk: int):
    """ONNX graph: (k, v, rows [2, ..C..], slots [C]) -> k, v with rows written at the slots."""
    from onnx import TensorProto, helper, numpy_helper

    rows_shape = list(kv_shape)
    rows_shape[SLOT_AXIS] = chunk
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    index_shape = [1] * len(kv_shape)
    index_shape[SLOT_AXIS] = chunk
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(index_shape, np.int64), "index_shape"),
        numpy_helper.from_array(np.array(rows_shape, np.int64), "rows_shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["rows", "zero"], ["k_rows"], axis=0),
        helper.make_node("Gather", ["rows", "one"], ["v_rows"], axis=0),
        helper.make_node("Reshape", ["slots", "index_shape"], ["slot_col"]),
        helper.make_node("Expand", ["slot_col", "rows_shape"], ["index"]),
        helper.make_node("ScatterElements", ["k", "index", "k_rows"], ["k_out"], axis=SLOT_AXIS),
        helper.make_node("ScatterElements", ["v", "index", "v_rows"], ["v_out"], axis=SLOT_AXIS),
    ]
    graph = helper.make_graph(
        nodes,
        "kv_slot_write",
        [
            helper.make_tensor_value_info("k", f32, list(kv_shape)),
            helper.make_tensor_value_info("v", f32, list(kv_shape)),
            helper.make_tensor_value_info("rows", f32, [2, *rows_shape]),
            helper.make_tensor_value_info("slots", i64, [chunk]),
        ],
        [
            helper.make_tensor_value_info("k_out", f32, list(kv_shape)),
            helper.make_tensor_value_info("v_out", f32, list(kv_shape)),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's IR; onnx's newest may be ahead of the installed runtime
    return model


def _provider_name(p) -> str:
    return p[0] if isinstance(p, tuple) else p


class OrtKVMirror:
    """The KV cache as two pairs of device OrtValues (ping-pong), with a host shadow of the pair
    in use. sync() makes the device cache equal the scheduler's and returns the OrtValues to bind."""

    def __init__(self, kv_shape, chunk: int, device, providers, opts, log: TransferLog):
        import onnxruntime as ort

        def alloc(shape, dtype=np.float32):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, *device)

        self.chunk, self.log, self.device = chunk, log, device
        self.pairs = [(alloc(kv_shape), alloc(kv_shape)) for _ in range(2)]
        for k, v in self.pairs:
            zeros = np.zeros(kv_shape, np.float32)
            k.update_inplace(zeros)
            v.update_inplace(zeros)
        self.current = 0
        self.shadow = (np.zeros(kv_shape, np.float32), np.zeros(kv_shape, np.float32))
        rows_shape = list(kv_shape)
        rows_shape[SLOT_AXIS] = chunk
        self.rows_host = np.zeros((2, *rows_shape), np.float32)  # K rows, V rows
        self.rows = alloc(self.rows_host.shape)
        self.slots = alloc((chunk,), np.int64)
        model = scatter_model(tuple(kv_shape), chunk).SerializeToString()
        # The slot write is a few kernels; a TensorRT engine for it would only cost build time.
        plain = [p for p in providers if _provider_name(p) != "TensorrtExecutionProvider"]
        self.session = ort.InferenceSession(model, sess_options=opts, providers=plain)
        self.binding = self.session.io_binding()
        self.uploaded_slots = 0

    def sync(self, k: np.ndarray, v: np.ndarray):
        sk, sv = self.shadow
        slots = np.union1d(changed_slots(sk, k, SLOT_AXIS), changed_slots(sv, v, SLOT_AXIS))
        n = len(slots)
        cur_k, cur_v = self.pairs[self.current]
        if n > self.chunk:  # a new stream or another caller: replace the whole cache (rare)
            for ov, host, shadow in ((cur_k, k, sk), (cur_v, v, sv)):
                ov.update_inplace(np.ascontiguousarray(host, np.float32))
                self.log.to_device(host.nbytes)
                shadow[...] = host
        elif n:
            # Pad to C with the first slot: a duplicate write of identical data is harmless.
            padded = np.concatenate([slots, np.full(self.chunk - n, slots[0])]).astype(np.int64)
            self.rows_host[0] = np.take(k, padded, axis=SLOT_AXIS)
            self.rows_host[1] = np.take(v, padded, axis=SLOT_AXIS)
            self.rows.update_inplace(self.rows_host)
            self.slots.update_inplace(padded)
            self.log.to_device(self.rows_host.nbytes)
            self.log.to_device(padded.nbytes)
            nxt_k, nxt_v = self.pairs[1 - self.current]
            b = self.binding
            b.bind_ortvalue_input("k", cur_k)
            b.bind_ortvalue_input("v", cur_v)
            b.bind_ortvalue_input("rows", self.rows)
            b.bind_ortvalue_input("slots", self.slots)
            b.bind_ortvalue_output("k_out", nxt_k)
            b.bind_ortvalue_output("v_out", nxt_v)
            self.session.run_with_iobinding(b)
            self.current = 1 - self.current
            put_slots(sk, slots, take_slots(k, slots, SLOT_AXIS), SLOT_AXIS)
            put_slots(sv, slots, take_slots(v, slots, SLOT_AXIS), SLOT_AXIS)
        self.uploaded_slots += n
        return self.pairs[self.current]


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

        def alloc(t):
            return ort.OrtValue.ortvalue_from_shape_and_type(
                list(t.shape), np.float32, *self.device
            )

        self.locks = {module: threading.Lock() for module in self.io}
        self.inputs, self.outputs, self.bindings = {}, {}, {}
        self.shadows: dict[str, np.ndarray] = {}
        for module, spec in self.io.items():
            b = self.sessions[module].io_binding()
            self.inputs[module] = {t.name: alloc(t) for t in spec.inputs if t.name not in KV}
            self.outputs[module] = {t.name: alloc(t) for t in spec.outputs}
            for name, ov in self.inputs[module].items():
                b.bind_ortvalue_input(name, ov)
            for name, ov in self.outputs[module].items():
                b.bind_ortvalue_output(name, ov)
            self.bindings[module] = b
        kv_shape = next(t.shape for t in self.io["generator"].inputs if t.name == "k_cache")
        self.kv = OrtKVMirror(
            kv_shape, self.cfg.chunk, self.device, self.providers, opts, self.transfers
        )

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

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.locks[module]:
            return self._run(module, inputs)

    def _run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self.inputs[module]:
            self._put(module, name, inputs[name])
        b = self.bindings[module]
        if module == "generator":
            k, v = self.kv.sync(inputs["k_cache"], inputs["v_cache"])
            b.bind_ortvalue_input("k_cache", k)
            b.bind_ortvalue_input("v_cache", v)
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
