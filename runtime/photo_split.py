"""A decoder graph split in two when it is loaded: the nodes that read the photo only, run once
per avatar, and the nodes that read the motion, run for every frame.

The decoder's graph takes the photo's tensors (image, app_feat, dec_*) with each frame's motion.
Some of its nodes read the photo only: the photo's 8-bit neighbour table, the features laid out
as rows, the lip edges' row table (models/sampling.py). ONNX Runtime cannot keep a result between
calls, so one graph redoes them for every frame: 0.33 ms of a 7.4-ms frame (fp32) and of a
6.2-ms frame (INT8) on the Intel Xeon at one thread. Split, the photo part runs when the avatar
is prepared (Backend.prepare_photo) and the frame part reads what it made. Both parts are the
graph's own nodes, partitioned: the frames are the same to the bit in fp32 and INT8; in fp16 a
few differ by one float16 step, where ONNX Runtime drops a float16 round trip of the whole graph
that crosses the cut (tests/test_photo_split.py).

Done at load, not at export: every ONNX bundle gains it without a new export, and the files
other runtimes read (CUDA, TensorRT) stay the contract's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The input that changes with every call; every other graph input is the avatar's.
VARYING = "motion"


@dataclass(frozen=True)
class SplitGraph:
    photo: bytes  # the photo part: a serialized ModelProto
    frame: bytes  # the frame part
    photo_inputs: tuple[str, ...]  # the graph inputs the photo part reads
    derived: tuple[str, ...]  # what the photo part hands the frame part
    frame_inputs: tuple[str, ...]  # the frame part's inputs: the motion, photo inputs, derived


def split_photo_work(path: str | Path) -> SplitGraph | None:
    """The graph at `path` in its two parts, or None where there is no photo-only node to move
    out, or where the onnx package (which the split needs, not the runtime) is missing or cannot
    type every tensor at the cut: the whole graph then runs as it is."""
    try:
        import onnx
        from onnx.utils import Extractor
    except ImportError:
        return None
    try:
        model = onnx.load(str(path))
    except Exception:  # unreadable here: the whole graph's own load reports it, clearly
        return None
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    if VARYING not in inputs:
        return None
    photo_only = set(inputs) - {VARYING}
    per_frame = {VARYING}
    for node in graph.node:  # topologically sorted, as ONNX requires
        read = [i for i in node.input if i]
        if any(i in per_frame for i in read):
            per_frame.update(node.output)
        elif any(i in photo_only for i in read):
            photo_only.update(node.output)
    # the cut: photo-only tensors that a per-frame node reads
    cut: list[str] = []
    for node in graph.node:
        if any(i in per_frame for i in node.input if i):
            cut += [i for i in node.input if i in photo_only and i not in cut]
    derived = tuple(name for name in cut if name not in inputs)
    if not derived:
        return None
    direct = tuple(name for name in cut if name in inputs)
    try:
        # the cut's tensors become graph inputs and outputs, which need their types and shapes;
        # one that inference cannot type (a custom-domain op before it) makes Extractor raise
        extract = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model
        photo_inputs = tuple(
            n for n in inputs if n != VARYING and _reads(graph, n, photo_only - set(inputs))
        )
        photo = extract(list(photo_inputs), list(derived))
        frame_inputs = (VARYING, *direct, *derived)
        frame = extract(list(frame_inputs), [o.name for o in graph.output])
    except (
        ValueError,
        KeyError,
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
    ):
        return None
    return SplitGraph(
        photo.SerializeToString(),
        frame.SerializeToString(),
        photo_inputs,
        derived,
        frame_inputs,
    )


def _reads(graph, name: str, photo_tensors: set[str]) -> bool:
    """Whether a node that makes a photo-only tensor reads graph input `name`."""
    return any(name in node.input and set(node.output) & photo_tensors for node in graph.node)


def derived_key(part: str, name: str) -> str:
    """The name under which the photo feed carries a derived tensor of graph `part` (two graphs
    may derive tensors of the same name from different rows: the decoder's row bands)."""
    return f"{part}:{name}"
