"""The decoder's composite, fused: its last per-pixel steps in one compiled pass.

The decoder's gather form (models/decoder.py, Decoder._render_gather) ends with the photo's
bilinear sample from its 8-bit neighbour table, the blend with the refinement's colour, the clamp
and the frame's RGB layout: the nodes of its `Composite` module. ONNX Runtime runs them node by
node, about 30 passes over a frame's memory per row band. The exporter cuts them off each decoder
graph that has them (`cut_composite`) and stores the rest, the head, beside it; the ONNX
Runtime backend runs the head and composites its outputs with runtime/composite.c, which reads
each pixel once and writes it once, as floats or directly as 8-bit levels.

The same float32 operations in the same order: the frames are the whole graph's to the bit
(tests/test_composite.py). Without the compiled library (an install without a C compiler), or
with EDGETALK_FUSED_COMPOSITE=0, the backend runs the whole graph as before.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from dataclasses import dataclass
from functools import cache

import numpy as np

ENV_SWITCH = "EDGETALK_FUSED_COMPOSITE"  # "0": run the decoder's whole graph (an A/B, a fallback)
SCOPE = "/composite/"  # the exported nodes of models/decoder.py's Composite
ROLES = ("xs", "ys", "colour", "alpha")  # a row band's inputs (cut_composite finds each)
COMPOSITES = "composites"  # the manifest's block: part -> its head's file and boundary


@dataclass(frozen=True)
class CompositeCut:
    """A decoder graph without its composite: what its head outputs, and how they map."""

    head: bytes  # the head: a serialized ModelProto whose outputs are the composite's inputs
    table: str  # the photo's neighbour table (an input of the head's graph: the photo part's)
    bands: tuple[tuple[str, str, str, str], ...]  # per row band, in row order: ROLES' tensors

    def outputs(self) -> list[str]:
        return [name for band in self.bands for name in band]


def disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip() == "0"


@cache
def library() -> ctypes.CDLL | None:
    """The compiled composite, or None where the install built none (or it does not load)."""
    spec = importlib.util.find_spec("edgetalk.runtime._composite")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    f32 = ctypes.POINTER(ctypes.c_float)
    u8 = ctypes.POINTER(ctypes.c_uint8)
    common = [u8, ctypes.c_int, ctypes.c_int, f32, f32, f32, f32, ctypes.c_long]
    lib.edgetalk_composite_floats.argtypes = [*common, f32]
    lib.edgetalk_composite_levels.argtypes = [*common, u8]
    for fn in (lib.edgetalk_composite_floats, lib.edgetalk_composite_levels):
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the backend composites with the compiled library."""
    return not disabled() and library() is not None


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


def composite_into(
    table: np.ndarray,
    size: tuple[int, int],
    xs: np.ndarray,
    ys: np.ndarray,
    colour: np.ndarray,
    alpha: np.ndarray,
    out: np.ndarray,
) -> None:
    """One row band's frame rows into `out` ([1, rows, W, 3]; float32 in [0, 1], or uint8
    levels), from the head's outputs for it: xs, ys, alpha [1, 1, rows, W] and colour
    [1, 3, rows, W] (float32, C-ordered). `table` is the photo's [h*w, 12] uint8 neighbour
    table, `size` the photo's (w, h). Checked here: the C side trusts its pointers."""
    if out.ndim != 4 or (out.shape[0], out.shape[3]) != (1, 3) or not out.flags.c_contiguous:
        raise ValueError(f"composite output must be C-ordered [1, rows, W, 3], not {out.shape}")
    _, rows, width, _ = out.shape
    pixels = rows * width
    for name, a in (("xs", xs), ("ys", ys), ("alpha", alpha), ("colour", colour)):
        want = (1, 3 if name == "colour" else 1, rows, width)
        if a.shape != want or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"composite {name}: want C-ordered float32 {want}, not {a.shape}")
    w, h = size
    if table.shape != (w * h, 12) or table.dtype != np.uint8 or not table.flags.c_contiguous:
        raise ValueError(f"composite table: want C-ordered uint8 ({w * h}, 12), not {table.shape}")
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled composite is not installed")
    args = (
        _ptr(table, ctypes.c_uint8),
        w,
        h,
        *(_ptr(a, ctypes.c_float) for a in (xs, ys, colour, alpha)),
        pixels,
    )
    if out.dtype == np.uint8:
        lib.edgetalk_composite_levels(*args, _ptr(out, ctypes.c_uint8))
    elif out.dtype == np.float32:
        lib.edgetalk_composite_floats(*args, _ptr(out, ctypes.c_float))
    else:
        raise ValueError(f"composite output must be float32 or uint8, not {out.dtype}")


def cut_composite(frame: bytes) -> CompositeCut | None:
    """Graph `frame` (a decoder graph's per-call part, runtime/photo_split.py) without its
    composite, or None where it has none to cut, or it cannot be cut cleanly: the photo's
    table must arrive as an input (the photo part made it), the composite must be the graph's
    end, and its inputs float32 row bands of the expected shapes (an FP16 graph's are not).
    Needs the onnx package: the exporter cuts, the runtime loads what it stored.

    Each input's role is read off the graph, not off the order of its nodes (the quantizer
    sorts them anew): the bands are the inputs of the frame's last Concat, in row order; a
    band's colour has three channels; its xs and ys make the table's row index (the Gather's),
    ys the one multiplied by the photo's width there (sample_table: y0 * w + x0); alpha is
    the fourth."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load_from_string(frame)
    graph = model.graph
    nodes = [n for n in graph.node if SCOPE in n.name]
    if not nodes or len(graph.output) != 1:
        return None
    producer = {o: n for n in nodes for o in n.output}
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    head_reads = {i for n in graph.node if SCOPE not in n.name for i in n.input}
    out = graph.output[0].name
    if set(producer) & head_reads or out not in producer:
        return None  # not the graph's end
    boundary = {i for n in nodes for i in n.input if i and i not in producer and i not in constants}

    def sources(tensor: str, where: list | None = None) -> set[str]:
        """The composite's inputs that `tensor` is made from (and its nodes into `where`)."""
        seen, stack, found = set(), [tensor], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in boundary:
                found.add(t)
            elif t in producer:
                if where is not None:
                    where.append(producer[t])
                stack += [i for i in producer[t].input if i]
        return found

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError:
        return None
    types = {
        v.name: v.type.tensor_type
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }

    def kind(name: str) -> tuple[int, tuple[int, ...]]:
        t = types.get(name)
        return (0, ()) if t is None else (t.elem_type, tuple(d.dim_value for d in t.shape.dim))

    inputs = [i.name for i in graph.input if i.name not in constants]
    tables = [n for n in boundary if kind(n)[0] == onnx.TensorProto.UINT8]
    if len(tables) != 1 or tables[0] not in inputs:
        return None
    (table,) = tables
    last = producer[out]
    outs = list(last.input) if last.op_type == "Concat" else [out]
    bands = []
    for band_out in outs:
        band_nodes: list = []
        floats = sources(band_out, band_nodes) - {table}
        colour = [n for n in floats if kind(n)[1][1:2] == (3,)]
        gathers = [n for n in band_nodes if n.op_type == "Gather" and n.input[0] == table]
        if len(floats) != 4 or len(colour) != 1 or len(gathers) != 1:
            return None
        index_nodes: list = []
        xy = sources(gathers[0].input[1], index_nodes)
        scaled = [
            sources(next(i for i in n.input if i not in constants))
            for n in index_nodes
            if n.op_type == "Mul" and sum(i in constants for i in n.input) == 1
        ]
        if len(xy) != 2 or len(scaled) != 1 or len(scaled[0]) != 1 or not scaled[0] < xy:
            return None
        (ys,) = scaled[0]
        (xs,) = xy - {ys}
        (alpha,) = floats - xy - set(colour)
        bands.append((xs, ys, colour[0], alpha))
    pixels, taps = kind(table)[1] if len(kind(table)[1]) == 2 else (0, 0)
    width = None
    for band in bands:
        shapes = [kind(n) for n in band]
        if any(t != onnx.TensorProto.FLOAT for t, _ in shapes):
            return None
        xs, ys, colour, alpha = (s for _, s in shapes)
        if len(xs) != 4 or xs[:2] != (1, 1) or ys != xs or alpha != xs:
            return None
        if colour != (1, 3, *xs[2:]) or taps != 12 or width not in (None, xs[3]):
            return None
        width = xs[3]
    if pixels % width:
        return None
    heads = [n for band in bands for n in band]
    try:
        head = Extractor(inferred).extract_model(inputs, heads)
    except (ValueError, KeyError, onnx.checker.ValidationError):
        return None
    return CompositeCut(head.SerializeToString(), table, tuple(bands))


def head_role(part: str) -> str:
    """The bundle's file role (Bundle.files) of graph `part`'s head."""
    return f"{part}:head"


def store_cut(cut: CompositeCut, folder, part: str) -> dict:
    """Write `cut`'s head of graph `part` into the bundle folder; its manifest entry."""
    name = f"{part}.head.onnx"
    (folder / name).write_bytes(cut.head)
    return {"head": name, "table": cut.table, "bands": [list(b) for b in cut.bands]}


def stored_cut(bundle, part: str) -> CompositeCut | None:
    """Graph `part`'s head as the exporter stored it (bundle.py checked the entry and hashed
    its file), or None where it stored none."""
    entry = (bundle.manifest.get(COMPOSITES) or {}).get(part)
    if entry is None:
        return None
    bands = tuple(tuple(b) for b in entry["bands"])
    return CompositeCut(bundle.file(head_role(part)).read_bytes(), entry["table"], bands)


def composite_bands(cut: CompositeCut, outs: dict[str, np.ndarray], table, dest) -> None:
    """A graph's frame rows into `dest` ([1, rows, W, 3], float32 or uint8) from its head's
    outputs `outs`, band by band in row order."""
    width = dest.shape[2]
    r0 = 0
    for band in cut.bands:
        xs, ys, colour, alpha = (outs[n] for n in band)
        rows = xs.shape[2]
        composite_into(
            table, (width, table.shape[0] // width), xs, ys, colour, alpha, dest[:, r0 : r0 + rows]
        )
        r0 += rows
    if r0 != dest.shape[1]:
        raise ValueError(f"the head's bands cover {r0} rows, the frame {dest.shape[1]}")
