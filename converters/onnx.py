"""ONNX: each module traced with static shapes at opset 17, then FP16 or INT8.

- The decoder's bilinear sampling is traced in its gather form (`gather_sampling`): ONNX
  Runtime's CPU GridSample kernel was half of the decoder's time, the gathers run several times
  faster there.

- FP16 uses onnxconverter-common with keep_io_types; grid_sample, normalisation reductions,
  Resize, Softmax and the DFT front end stay in fp32.
- INT8 uses onnxruntime.quantization: static QDQ, per-channel weights, calibrated on recorded
  real inputs. Only Conv/MatMul/Gemm with a constant weight are quantized (activation x activation
  matmuls in attention stay float), and the residual sums between quantized convolutions
  (residual_adds); the nodes that stay float are listed for the manifest, and an
  "int8" module with no 8-bit weights is an error, never a silent fp32 file.
- Which modules INT8 quantizes is a policy (INT8_MODULES), recorded per module in the manifest: the
  decoder (98% of a frame's work) is quantized; the appearance encoder (once per avatar), the audio
  encoder and the autoregressive generator stay fp32: their error reaches every later frame, for
  about 2% of the work.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..models.decoder import DecoderRows
from ..models.io_spec import (
    DECODER_BANDS,
    ModuleIO,
    band_index,
    band_part,
    band_span,
    decoder_band,
    decoder_per_frame,
)
from .graph import ModuleGraph, example_args
from .target import Target

OPSET = 17
SUFFIX = ".onnx"
# Ops whose numerics fp16 breaks (reductions, resampling, exp-heavy) or that CPU EPs lack in fp16.
# module scopes FP16 keeps float (the readout: running sums of log-mels, and a linear map over
# 800 of them that lands straight in the mouth)
FP32_SCOPES = ("/upsample/", "/sampler", "/mel_norm/", "/readout/")
FP16_KEEP = [
    "GridSample",
    "Resize",
    "ReduceMean",
    "LayerNormalization",
    "Softmax",
    "Pow",
    "Sqrt",
    "Log",
    "Exp",
    "Erf",
    "Div",
    "Sin",
    "Cos",
    "Range",
    "ConstantOfShape",
    "Expand",
    "CumSum",
]
QUANT_OPS = ("Conv", "MatMul", "Gemm")
# Input and output heads stay float in INT8 bundles: their error lands in the sampling grid (flow,
# pose affine, lip edges, the grid's upsampling: 1% is a visible shift) or in the motion fed back
# autoregressively (generator in/out). They are a small share of the compute. The refinement's
# last convolution (colour, alpha and a flow correction) is quantized: its flow comes out in
# pixels (Decoder._refine), in the range of the logits beside it, so one output scale serves all
# (shipped weights, chunk 4: frames 37.9 dB against 38.0 float, the INT8 stream 3.7% faster).
FLOAT_HEADS = (
    "/flow_out/",
    "/affine/",
    "/lip_",
    "/upsample/",
    "/out/",
    "/in_x/",
    "/in_prev/",
)
# The native form (grid_sample, TensorRT's graphs) gives that flow normalized: its head stays float.
NATIVE_FLOAT_HEADS = (*FLOAT_HEADS, "/refine_out/")
# Modules an INT8 bundle quantizes: the decoder, 98% of a frame's work. With the shipped weights,
# quantizing the others failed the gates for ~2% of the work: appearance features cos 0.953 and
# audio tokens cos 0.988 (gate 0.99); the generator passes alone (cos 0.9995), but its error feeds
# back through the previous motion and the KV cache, and at chunk 1 the stream fell to 25.7 dB.
INT8_MODULES = ("decoder",)
# The decoder graph renders one frame per call, whatever the chunk (io_spec.decoder_per_frame); the
# ONNX Runtime backends call it once per frame, the CPU one on as many sessions as it has threads.
# Measured at C=4 on an Intel Xeon (AVX-512, 2 cores), decoder-only calls: four calls of the
# one-frame graph took 32.1 ms against 36.7 for one call of the four-frame graph at one thread
# (each frame's full-resolution tensors stay in cache), and two one-thread sessions with two
# frames each took 16.3 ms against 24.7 for the four-frame graph on a two-thread pool (ONNX
# Runtime splits each small per-pixel node across its pool; frames split without overhead).
PER_FRAME_DECODER = True
# At chunk 1 there is one frame to split: a chunk-1 bundle also holds the frame in DECODER_BANDS
# row bands (models/decoder.DecoderRows, the same values as the whole frame's), which the CPU
# backend renders on as many one-thread sessions when it has the threads. Measured on the Xeon,
# the fp32 one-frame graph: whole 8.5 ms; each band 4.8 (the head's halo rows and the photo's
# neighbour table are done twice); both bands on two threads 5.3.
BAND_PARTS = {band_part(k): "decoder" for k in range(DECODER_BANDS)}


def _trace(graph, io: ModuleIO, path: Path, sample) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example_args(io, sample),
            str(path),
            input_names=list(io.input_names),
            output_names=list(io.output_names),
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def _check_static(path: Path, io: ModuleIO) -> None:
    """onnx.checker passes and every graph input/output has the contract's fixed integer shape."""
    import onnx

    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    declared = {t.name: t.shape for t in (*io.inputs, *io.outputs)}
    for v in (*m.graph.input, *m.graph.output):
        dims = v.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise ValueError(
                f"{path.name}: {v.name} has a symbolic dimension; shapes must be static"
            )
        shape = tuple(d.dim_value for d in dims)
        if declared.get(v.name) != shape:
            raise ValueError(
                f"{path.name}: {v.name} is {shape}, contract says {declared.get(v.name)}"
            )


def to_fp16(src: Path, dst: Path) -> dict:
    import onnx
    from onnxconverter_common import float16

    m = onnx.load(str(src))
    # The converter places its casts from complete type annotations; afterwards the annotations
    # of intermediate values are stale, so drop them and let onnxruntime infer types.
    _strip_identities(m)
    _split_consumed_outputs(m)
    m = onnx.shape_inference.infer_shapes(m)
    keep_nodes = sorted(
        _upstream_of(m, "Log")
        | _upstream_of(m, "Sin")
        | _upstream_of(m, "Cos")
        # the sampling grid's upsampling, fp32 as Resize was before it became two matmuls, and
        # the gathers' pixel indices (up to H*W, beyond fp16's exact integers)
        # and the audio encoder's running log-mel mean (sums of up to ~200 log-mels)
        | {n.name for n in m.graph.node if any(k in n.name for k in FP32_SCOPES)}
    )
    kept = set(keep_nodes)
    _unshare_initializers(m, lambda n: n.op_type in FP16_KEEP or n.name in kept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m16 = float16.convert_float_to_float16(
            m, keep_io_types=True, op_block_list=FP16_KEEP, node_block_list=keep_nodes
        )
    del m16.graph.value_info[:]
    _outputs_as_declared(m16, {o.name: o.type.tensor_type.elem_type for o in m.graph.output})
    onnx.save(m16, str(dst))
    kept = sorted({n.op_type for n in m.graph.node if n.op_type in FP16_KEEP})
    return {"fp32_op_types": kept}


class _Reader:
    """onnxruntime CalibrationDataReader over recorded real inputs."""

    def __init__(self, samples: list[dict[str, np.ndarray]], names):
        self.it = iter([{k: s[k] for k in names} for s in samples])

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # newer onnxruntime calls this between passes
        pass


def to_int8(
    src: Path,
    dst: Path,
    calibration: list[dict[str, np.ndarray]],
    float_heads: tuple[str, ...] = FLOAT_HEADS,
) -> dict:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    m = onnx.load(str(pre))
    if fuse_gelu(m):
        onnx.save(m, str(pre))
    consts = {i.name for i in m.graph.initializer}
    consts |= {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    front_end = _upstream_of(m, "Log")
    exclude = [
        n.name
        for n in m.graph.node
        if n.op_type in QUANT_OPS and _float_reason(n, consts, front_end, float_heads) is not None
    ]
    residual = residual_adds(m, set(exclude))
    exclude += [n.name for n in m.graph.node if n.op_type == "Add" and n.name not in residual]
    names = [i.name for i in m.graph.input]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calibration, names)
    quantize_static(
        str(pre),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=[*QUANT_OPS, "Add"] if residual else list(QUANT_OPS),
        nodes_to_exclude=exclude,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    pre.unlink(missing_ok=True)
    info = int8_report(dst, float_heads)
    if info["int8_weight_tensors"] == 0 or info["quantized_compute_nodes"] == 0:
        raise RuntimeError(f"{dst.name}: INT8 quantization produced no 8-bit weights")
    return info


def graph_index(m) -> tuple[dict, dict[str, list]]:
    """The node that produces each tensor of graph `m`, and the nodes that read each."""
    produced = {o: n for n in m.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return produced, readers


def residual_adds(m, floating: set[str]) -> set[str]:
    """The Adds x + gelu(conv(x)) whose sum feeds a quantized Conv: quantized too, the residual
    stream stays 8-bit from one convolution to the next (QLinearAdd)."""
    produced, readers = graph_index(m)
    out = set()

    def feeds_conv(name: str) -> bool:
        return any(r.op_type == "Conv" and r.name not in floating for r in readers.get(name, []))

    for add in (n for n in m.graph.node if n.op_type == "Add" and len(n.input) == 2):
        for x, g in (add.input, add.input[::-1]):
            gelu = produced.get(g)
            conv = gelu is not None and gelu.op_type == "Gelu" and produced.get(gelu.input[0])
            if not conv or conv.op_type != "Conv" or conv.input[0] != x or conv.name in floating:
                continue
            if feeds_conv(add.output[0]):
                out.add(add.name)
    return out


def fuse_gelu(m) -> int:
    """Replace each exact GELU the tracer spells out (x/sqrt2 -> Erf -> +1 -> *x -> *0.5) with
    one com.microsoft Gelu node (ONNX Runtime only, as a QDQ graph is); returns how many.

    ONNX Runtime fuses the pattern itself in float graphs, but not after a quantized conv: it
    gives each consumer of a DequantizeLinear its own copy, so the pattern's two reads of x
    no longer match and the GELU runs as five kernels (6 ms of a 4-frame decoder call, 1 thread)."""
    import numpy as np
    from onnx import helper, numpy_helper

    produced, readers = graph_index(m)
    inits = {i.name: i for i in m.graph.initializer}

    def scalar(name):
        if name in inits:
            v = numpy_helper.to_array(inits[name])
        elif name in produced and produced[name].op_type == "Constant":
            v = numpy_helper.to_array(produced[name].attribute[0].t)
        else:
            return None
        return float(v) if v.size == 1 else None

    def only_reader(name, op):
        r = readers.get(name, [])
        return r[0] if len(r) == 1 and r[0].op_type == op else None

    def is_const(n, value):
        return any(scalar(i) is not None and np.isclose(scalar(i), value) for i in n.input)

    drop, fused = set(), []
    for erf in [n for n in m.graph.node if n.op_type == "Erf"]:
        div = produced.get(erf.input[0])
        if div is None or div.op_type != "Div" or not np.isclose(scalar(div.input[1]) or 0, 2**0.5):
            continue
        x = div.input[0]
        add = only_reader(erf.output[0], "Add")
        mul = add and only_reader(add.output[0], "Mul")
        half = mul and only_reader(mul.output[0], "Mul")
        if not (add and mul and half and is_const(add, 1.0) and is_const(half, 0.5)):
            continue
        if x not in mul.input or readers.get(div.output[0], []) != [erf]:
            continue
        drop |= {id(div), id(erf), id(add), id(mul), id(half)}
        gelu = helper.make_node("Gelu", [x], [half.output[0]], domain="com.microsoft")
        gelu.name = f"{erf.name}_gelu"
        fused.append((half, gelu))
    if not fused:
        return 0
    at = {id(half): gelu for half, gelu in fused}
    nodes = [at.get(id(n), n) for n in m.graph.node if id(n) not in drop or id(n) in at]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | {o.name for o in m.graph.output}
    unused = [i for i in m.graph.initializer if i.name not in used]  # the pattern's constants
    for i in unused:
        m.graph.initializer.remove(i)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def _float_reason(
    node, consts: set[str], front_end: set[str], float_heads: tuple[str, ...] = FLOAT_HEADS
) -> str | None:
    """Why a Conv/MatMul/Gemm stays float in an INT8 module (None: it is quantized). The one
    definition of the per-op policy, used to quantize and to audit the result."""
    if not any(i in consts for i in node.input[1:2]):
        return "activation x activation"
    if node.name in front_end:
        return "DFT/mel front end (feeds a log, which magnifies its error)"
    head = next((h for h in float_heads if h in node.name), None)
    if head is not None:
        return f"float head {head}"
    return None


def _strip_identities(m) -> None:
    """Remove Identity aliases (the tracer's way of sharing one weight between uses) so every
    consumer reads the tensor itself; otherwise the fp16 pass types an alias and its source apart."""
    outputs = {o.name for o in m.graph.output}
    alias = {}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.output[0] not in outputs:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del m.graph.node[:]
    m.graph.node.extend(keep)


def _split_consumed_outputs(m) -> None:
    """A graph output that nodes also read (the appearance stage's app_feat feeds the decoder's
    photo layers) gets an internal name for its readers and an Identity to the output: with
    keep_io_types the fp16 pass would otherwise hand those readers the float32 output."""
    from onnx import helper

    outputs = {o.name for o in m.graph.output}
    read = {name for n in m.graph.node for name in n.input}
    for name in sorted(outputs & read):
        inner = f"{name}__internal"
        for n in m.graph.node:
            for i, x in enumerate(n.output):
                if x == name:
                    n.output[i] = inner
            for i, x in enumerate(n.input):
                if x == name:
                    n.input[i] = inner
        m.graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}__out"))


def _outputs_as_declared(m16, types: dict[str, int]) -> None:
    """Graph outputs back to their float32 type. With keep_io_types the converter leaves an
    output float16 when a node it kept float32 (the readout's scope) produces it: it casts that
    node's output to float16 for readers that are the graph's output. A Cast to float32 closes
    it, so every output keeps the contract's dtype."""
    from onnx import TensorProto, helper

    for out in m16.graph.output:
        want, got = types.get(out.name), out.type.tensor_type.elem_type
        if got != TensorProto.FLOAT16 or want != TensorProto.FLOAT:
            continue
        inner = f"{out.name}__fp16"
        for n in m16.graph.node:
            for i, x in enumerate(n.output):
                if x == out.name:
                    n.output[i] = inner
            for i, x in enumerate(n.input):
                if x == out.name:
                    n.input[i] = inner
        m16.graph.node.append(
            helper.make_node(
                "Cast", [inner], [out.name], to=TensorProto.FLOAT, name=inner + "_cast"
            )
        )
        out.type.tensor_type.elem_type = TensorProto.FLOAT


def _unshare_initializers(m, stays_fp32) -> None:
    """The tracer merges equal constants (all zero biases become one tensor). Where one tensor
    feeds both an fp32-kept node and an fp16 node, give the fp32 side its own copy."""
    import copy

    inits = {i.name: i for i in m.graph.initializer}
    users: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            if i in inits:
                users.setdefault(i, []).append(n)
    for name, nodes in users.items():
        fp32_side = [n for n in nodes if stays_fp32(n)]
        if fp32_side and len(fp32_side) < len(nodes):
            twin = copy.deepcopy(inits[name])
            twin.name = f"{name}__fp32"
            m.graph.initializer.append(twin)
            for n in fp32_side:
                for k, i in enumerate(n.input):
                    if i == name:
                        n.input[k] = twin.name


def _upstream_of(m, op_type: str) -> set[str]:
    """Names of every node that feeds (directly or not) a node of op_type."""
    produced_by = {o: n for n in m.graph.node for o in n.output}
    todo = [n for n in m.graph.node if n.op_type == op_type]
    seen: set[str] = set()
    while todo:
        n = todo.pop()
        for i in n.input:
            src = produced_by.get(i)
            if src is not None and src.name not in seen:
                seen.add(src.name)
                todo.append(src)
    return seen


def int8_report(path: Path, float_heads: tuple[str, ...] = FLOAT_HEADS) -> dict:
    """Which compute nodes read 8-bit weights (through DequantizeLinear) and which stayed float."""
    import onnx

    m = onnx.load(str(path))
    int8_inits = [i.name for i in m.graph.initializer if i.data_type in (2, 3)]  # uint8, int8
    produced_by, readers = graph_index(m)
    consts = {i.name for i in m.graph.initializer}
    consts |= {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    front_end = _upstream_of(m, "Log")
    sizes = {i.name: int(np.prod(i.dims)) if i.dims else 1 for i in m.graph.initializer}
    quantized, floating = [], []
    q_elems = f_elems = 0
    for n in m.graph.node:
        if n.op_type not in QUANT_OPS:
            continue
        w = produced_by.get(n.input[1]) if len(n.input) > 1 else None
        if w is not None and w.op_type == "DequantizeLinear":
            quantized.append(n)
            q_elems += sizes.get(w.input[0], 0)
        else:
            floating.append(n)
            if "/upsample/" not in n.name:  # fixed interpolation matrices, not learned weights
                f_elems += sizes.get(n.input[1], 0) if len(n.input) > 1 else 0
    # Adds between 8-bit tensors (residual_adds): each input read through a DequantizeLinear,
    # the sum read through a QuantizeLinear only
    adds = [
        n
        for n in m.graph.node
        if n.op_type == "Add"
        and all(getattr(produced_by.get(i), "op_type", None) == "DequantizeLinear" for i in n.input)
        and {r.op_type for r in readers.get(n.output[0], [])} == {"QuantizeLinear"}
    ]
    quantized_adds = {id(n) for n in adds}
    return {
        "int8_weight_tensors": len(int8_inits),
        "quantized_compute_nodes": len(quantized),
        "quantized_adds": [n.name for n in adds],
        # share of the learned Conv/MatMul/Gemm weight elements stored in 8 bits
        "int8_weight_share": round(q_elems / (q_elems + f_elems), 4) if q_elems + f_elems else 0.0,
        "float_compute_nodes": [f"{n.op_type}:{n.name}" for n in floating],
        # Every float node with the policy's reason; "unexplained" means the quantizer skipped a
        # node the policy meant to quantize.
        "float_reasons": {
            f"{n.op_type}:{n.name}": _float_reason(n, consts, front_end, float_heads)
            or "unexplained"
            for n in floating
        },
        "float_op_types": dict(
            Counter(
                n.op_type
                for n in m.graph.node
                if n.op_type not in ("QuantizeLinear", "DequantizeLinear", *QUANT_OPS)
                and id(n) not in quantized_adds
            )
        ),
    }


def per_frame_feeds(calls: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Decoder calls of C frames as calls of one frame each (calibration of the one-frame graph)."""
    return [
        {**c, "motion": c["motion"][:, i : i + 1]}
        for c in calls
        for i in range(c["motion"].shape[1])
    ]


def _part(path: Path) -> str:
    return path.name.removesuffix(SUFFIX)  # the pipeline names module files <part>.onnx


class OnnxTarget(Target):
    name = "onnx"
    suffix = SUFFIX
    parity_backend = "onnxruntime"
    gather_sampling = True

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnx and onnxruntime are not installed (pip install 'edgetalk[onnx]')"
        return True, ""

    per_frame_decoder = PER_FRAME_DECODER

    def extra_parts(self, cfg) -> dict[str, str]:
        return dict(BAND_PARTS) if self.per_frame_decoder and cfg.chunk == 1 else {}

    def part_share(self, part: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = outputs["frames"]  # one frame: the band's rows of it
        r0, r1 = band_span(frames.shape[1], band_index(part))
        return {"frames": frames[:, r0:r1]}

    def graph_io(self, part: str, io: ModuleIO) -> ModuleIO:
        """The contract of the graph written for `part`: the chunk's, one frame's (decoder) or
        one band's of one frame (the decoder's row bands)."""
        if part in BAND_PARTS:
            return decoder_band(io, band_index(part))
        return decoder_per_frame(io) if part == "decoder" and self.per_frame_decoder else io

    def convert(self, model, part: str, io: ModuleIO, path: Path, sample: dict | None) -> None:
        graph_io = self.graph_io(part, io)
        if sample is not None and graph_io is not io:
            sample = {**sample, "motion": sample["motion"][:, :1]}
        inner = None
        if part in BAND_PARTS:
            res = model.cfg.render.resolution
            rows = band_span(res, band_index(part))
            inner = DecoderRows(model.decoder, *rows)
        module = BAND_PARTS.get(part, part)
        _trace(ModuleGraph(model, module, graph_io, inner).eval(), graph_io, path, sample)
        _check_static(path, graph_io)

    def apply_precision(self, precision: str, src: Path, dst: Path, calibration) -> dict:
        if precision == "fp32":
            src.replace(dst)
            return {}
        if precision == "fp16":
            return to_fp16(src, dst)
        module = BAND_PARTS.get(_part(dst), _part(dst))
        if module not in INT8_MODULES:
            src.replace(dst)
            return {"weights": "fp32", "why": "kept float by the INT8 module policy (INT8_MODULES)"}
        if module == "decoder" and self.per_frame_decoder:
            calibration = per_frame_feeds(calibration)
        return to_int8(src, dst, calibration, self.float_heads()) | {"weights": "int8"}

    def float_heads(self) -> tuple[str, ...]:
        """The INT8 policy's float heads for this target's form of the decoder: the gather form
        gives the refinement's flow in pixels, which an 8-bit output scale serves."""
        return FLOAT_HEADS if self.gather_sampling else NATIVE_FLOAT_HEADS

    def checks(self, path: Path, io: ModuleIO, precision: str) -> dict:
        graph_io = self.graph_io(_part(path), io)
        _check_static(path, graph_io)
        int8 = precision == "int8" and BAND_PARTS.get(_part(path), _part(path)) in INT8_MODULES
        if int8 and int8_report(path)["quantized_compute_nodes"] == 0:
            raise RuntimeError(f"{path.name}: no 8-bit compute nodes in an int8 export")
        info = {"static_shapes": "pass", "opset": OPSET}
        if graph_io is not io:
            info["frames_per_call"] = 1
        if _part(path) in BAND_PARTS:
            info["rows"] = list(band_span(graph_io.outputs[0].shape[2], band_index(_part(path))))
        return info

    def runtime_aids(self, folder: Path, files: dict[str, str]) -> dict:
        """Each graph's declared shapes, and the two parts of every graph that splits (the
        decoder's, its bands', the generator's), stored so that the runtime loads them without
        the onnx package (runtime/photo_split.py); of each decoder graph's per-call part, its
        head: all but the composite, which the runtime runs fused (runtime/composite.py)."""
        from ..runtime.backend_onnxruntime import GRAPH_IO, declared_io
        from ..runtime.composite import COMPOSITES, cut_composite, head_role, store_cut
        from ..runtime.photo_split import (
            AVATAR_INPUTS,
            SPLITS,
            part_roles,
            split_photo_work,
            store_parts,
        )

        graphs = dict(files)
        splits, composites = {}, {}
        for part, fname in graphs.items():
            module = BAND_PARTS.get(part, part)
            split = split_photo_work(folder / fname, module) if module in AVATAR_INPUTS else None
            if split is not None:
                splits[part] = store_parts(split, folder, part)
                for role, key in zip(part_roles(part), ("avatar", "stream"), strict=True):
                    files[role] = splits[part][key]
            cut = cut_composite(split.frame) if split and module == "decoder" else None
            if cut is not None:
                composites[part] = store_cut(cut, folder, part)
                files[head_role(part)] = composites[part]["head"]
        shapes = {part: declared_io(folder / fname) for part, fname in graphs.items()}
        return {
            GRAPH_IO: {part: {k: list(v) for k, v in io.items()} for part, io in shapes.items()},
            SPLITS: splits,
            COMPOSITES: composites,
        }

    def timed_call(self, path: Path, sample: dict[str, np.ndarray]):
        import onnxruntime as ort

        from ..runtime.backend_onnxruntime import session_options

        # the runtime's own session settings, so the graph is optimized as a bundle runs it
        sess = ort.InferenceSession(str(path), session_options(1), ["CPUExecutionProvider"])
        feed = {}
        for t in sess.get_inputs():
            x = sample[t.name]
            if x.shape != tuple(t.shape):  # a one-frame decoder graph: the chunk's first frame
                x = x[tuple(slice(0, d) for d in t.shape)]
            feed[t.name] = np.ascontiguousarray(x)
        return lambda: sess.run(None, feed)

    def tool_versions(self) -> dict:
        import onnx
        import onnxruntime

        try:
            import onnxconverter_common

            occ = onnxconverter_common.__version__
        except ImportError:
            occ = None
        return {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxconverter_common": occ,
        }


TARGET = OnnxTarget
