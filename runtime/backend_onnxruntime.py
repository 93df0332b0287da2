"""ONNX Runtime backend: CPU here; on macOS the CoreML execution provider (CPU fallback, with a note)."""

from __future__ import annotations

import platform

import numpy as np

from ..errors import BackendUnavailable
from .backend import Backend


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    targets = ("onnx",)
    providers_wanted: tuple[str, ...] = ("CPUExecutionProvider",)

    @classmethod
    def availability(cls):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed (pip install 'edgetalk[onnx]')"
        return True, ""

    @classmethod
    def choose_providers(cls) -> list[str]:
        import onnxruntime as ort

        have = ort.get_available_providers()
        wanted = list(cls.providers_wanted)
        if platform.system() == "Darwin" and "CoreMLExecutionProvider" in have:
            wanted.insert(0, "CoreMLExecutionProvider")
        elif platform.system() == "Darwin":
            print("note: onnxruntime has no CoreML execution provider here; using the CPU")
        return [p for p in wanted if p in have] or ["CPUExecutionProvider"]

    def __init__(self, bundle, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(bundle.cfg, bundle.io, bundle.precision)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            # modules run one after another: a second pool of threads would only compete
            opts.inter_op_num_threads = 1
        if threads != 1:
            # Each of the four sessions has its own pool, and an idle pool spin-waits after its
            # run: while the decoder works, the generator's and audio's workers spin beside it.
            # On 2 cores that halved ONNX throughput at 2 threads (README, "Threads").
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.threads = threads
        opts.log_severity_level = 3
        self.providers = self.choose_providers()
        self.sessions = {}
        for module in self.io:
            declared = declared_io(bundle.file(module))
            if declared is not None:  # before loading: ORT would fail on it less clearly
                self.check_graph_io(module, declared, bundle.files[module])
            try:
                self.sessions[module] = ort.InferenceSession(
                    str(bundle.file(module)), sess_options=opts, providers=self.providers
                )
            except Exception as e:  # onnxruntime raises its own exception types
                raise BackendUnavailable(
                    f"onnxruntime cannot load {bundle.files[module]}: {e}"
                ) from None
            if declared is None:  # no onnx package: ORT's view (its inferred output shapes win)
                sess = self.sessions[module]
                graph = {t.name: tuple(t.shape) for t in (*sess.get_inputs(), *sess.get_outputs())}
                self.check_graph_io(module, graph, bundle.files[module])

    @classmethod
    def from_bundle(cls, bundle):
        return cls(bundle)

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.io[module].output_names
        feed = {t.name: inputs[t.name] for t in self.io[module].inputs}
        outs = self.sessions[module].run(list(names), feed)
        return dict(zip(names, outs, strict=True))

    def describe(self) -> str:
        return f"onnxruntime ({self.precision}, {self.providers[0]})"


def declared_io(path) -> dict[str, tuple] | None:
    """The shapes an ONNX file declares for its graph inputs and outputs (None without onnx)."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # unreadable: onnxruntime's load reports it
        return None
    return {
        v.name: tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in v.type.tensor_type.shape.dim
        )
        for v in (*graph.input, *graph.output)
    }


BACKEND = OnnxRuntimeBackend
