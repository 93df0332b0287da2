"""A graph split in two when it is loaded: the nodes that read the avatar only, run once per
avatar, and the nodes that read what changes, run for every call.

The decoder's graph takes the photo's tensors (image, app_feat, dec_*) with each frame's motion.
Some of its nodes read the photo only: the photo's 8-bit neighbour table, the features laid out
as rows, the lip edges' row table (models/sampling.py). ONNX Runtime cannot keep a result between
calls, so one graph redoes them for every frame: 0.33 ms of a 7.4-ms frame (fp32) and of a
6.2-ms frame (INT8) on the Intel Xeon at one thread. Split, the photo part runs when the avatar
is prepared (Backend.prepare_photo) and the frame part reads what it made. Both parts are the
graph's own nodes, partitioned: the frames are the same to the bit in fp32 and INT8; in fp16 a
few differ by one float16 step, where ONNX Runtime drops a float16 round trip of the whole graph
that crosses the cut (tests/test_photo_split.py).

The generator splits the same way: its reference token's pass through every layer (the keys
and values the sink holds) reads the avatar's reference motion only, and was one of five passes
over the layers' weights in every call: 1.12 -> 1.02 ms a call at chunk 1 on the Xeon.

The exporter writes both parts into an ONNX bundle beside the whole graph (`stored_parts`, the
manifest's "splits"), so a runtime loads them as they are: without the onnx package, whose import
(17 MB) and shape inference (11 MB, about 0.5 s) the split at load costs. A bundle exported before
that has no "splits" block and is split at load, as before. The whole graphs stay the contract's
files, which other runtimes (CUDA, TensorRT) read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Per module that splits, the graph inputs that stay the same for a whole stream: the avatar's.
# Every other input changes with each call. (A decoder's row band is the decoder's.)
AVATAR_INPUTS = {
    "decoder": None,  # all but the motion
    "generator": frozenset({"ref_motion"}),
}
VARYING_DECODER_INPUT = "motion"


def avatar_inputs(module: str, inputs: list[str]) -> set[str]:
    """The inputs among `inputs` (a graph's) that are the avatar's in `module`."""
    fixed = AVATAR_INPUTS[module]
    if fixed is None:
        return set(inputs) - {VARYING_DECODER_INPUT} if VARYING_DECODER_INPUT in inputs else set()
    return set(fixed) & set(inputs)


@dataclass(frozen=True)
class SplitGraph:
    photo: bytes  # the avatar's part (the photo's, for a decoder): a serialized ModelProto
    frame: bytes  # the part run for every call
    photo_inputs: tuple[str, ...]  # the graph inputs the avatar's part reads
    derived: tuple[str, ...]  # what the avatar's part hands the other
    frame_inputs: tuple[str, ...]  # the other part's inputs: varying ones, avatar's, derived


def split_photo_work(path: str | Path, module: str = "decoder") -> SplitGraph | None:
    """The graph at `path` (of `module`, a key of AVATAR_INPUTS) in its two parts, or None where
    there is no avatar-only node to move out, or where the onnx package (which the split needs,
    not the runtime) is missing or cannot type every tensor at the cut: the whole graph then
    runs as it is."""
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
    photo_only = avatar_inputs(module, inputs)
    per_frame = set(inputs) - photo_only
    if not photo_only or not per_frame:
        return None
    fixed = set(photo_only)
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
            n for n in inputs if n in fixed and _reads(graph, n, photo_only - set(inputs))
        )
        photo = extract(list(photo_inputs), list(derived))
        frame_inputs = (*(n for n in inputs if n not in fixed), *direct, *derived)
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


# The manifest's block of stored parts: part -> STORED_FIELDS (or no entry: that graph runs whole)
SPLITS = "splits"
STORED_FIELDS = ("avatar", "stream", "avatar_inputs", "derived", "stream_inputs")


def part_roles(part: str) -> tuple[str, str]:
    """The bundle's file roles (Bundle.files) of graph `part`'s avatar part and per-call part."""
    return f"{part}:avatar", f"{part}:stream"


def store_parts(split: SplitGraph, folder: Path, part: str) -> dict:
    """Write `split` of graph `part` into the bundle folder; its manifest entry."""
    avatar, stream = f"{part}.avatar.onnx", f"{part}.stream.onnx"
    (folder / avatar).write_bytes(split.photo)
    (folder / stream).write_bytes(split.frame)
    return {
        "avatar": avatar,
        "stream": stream,
        "avatar_inputs": list(split.photo_inputs),
        "derived": list(split.derived),
        "stream_inputs": list(split.frame_inputs),
    }


def stored_parts(bundle, part: str) -> SplitGraph | None:
    """Graph `part`'s two parts as the exporter stored them (bundle.py checked the entry and
    hashed its files), or None where it stored none: that graph runs whole."""
    entry = (bundle.manifest.get(SPLITS) or {}).get(part)
    if entry is None:
        return None
    avatar, stream = part_roles(part)
    return SplitGraph(
        bundle.file(avatar).read_bytes(),
        bundle.file(stream).read_bytes(),
        tuple(entry["avatar_inputs"]),
        tuple(entry["derived"]),
        tuple(entry["stream_inputs"]),
    )


def _reads(graph, name: str, photo_tensors: set[str]) -> bool:
    """Whether a node that makes a photo-only tensor reads graph input `name`."""
    return any(name in node.input and set(node.output) & photo_tensors for node in graph.node)


def derived_key(part: str, name: str) -> str:
    """The name under which the photo feed carries a derived tensor of graph `part` (two graphs
    may derive tensors of the same name from different rows: the decoder's row bands)."""
    return f"{part}:{name}"
