"""ONNX Runtime backend: CPU here; on macOS the CoreML execution provider (CPU fallback, with a note)."""

from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import BackendUnavailable, BundleError
from ..models.io_spec import (
    DECODER_BANDS,
    ModuleIO,
    band_index,
    band_part,
    band_span,
    decoder_band,
    decoder_per_frame,
    frames_per_call,
)
from . import composite
from .backend import Backend
from .photo_split import (
    AVATAR_INPUTS,
    SPLITS,
    SplitGraph,
    derived_key,
    split_photo_work,
    stored_parts,
)
from .scheduler import to_uint8_into


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    targets = ("onnx",)
    concurrent_modules = True
    providers_wanted: tuple[str, ...] = ("CPUExecutionProvider",)

    @classmethod
    def availability(cls):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed (pip install 'edgetalk[ort]')"
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
        super().__init__(bundle.cfg, bundle.io, bundle.precision)
        opts = session_options(threads)
        self.threads = threads
        self.providers = self.choose_providers()
        self.sessions = {}
        # A one-frame decoder graph (converters/onnx.py, PER_FRAME_DECODER) runs frame by frame:
        # one session of one thread per worker, each rendering a share of the chunk's frames.
        self.frame_sessions: list = []
        self.pool: ThreadPoolExecutor | None = None
        # A chunk-1 bundle's frame in row bands (converters/onnx.py, BAND_PARTS): with two
        # threads, one one-thread session per band renders a share of the one frame.
        self.band_sessions: dict[str, object] = {}
        self.band_pool: ThreadPoolExecutor | None = None
        # Each decoder graph (the whole frame's, or a band's) split in its photo part, run once
        # per avatar (prepare_photo), and its frame part, which the sessions above run; the
        # generator's likewise, its reference token's pass the avatar's part
        # (runtime/photo_split.py); a graph that cannot be split is absent and runs whole.
        self.splits: dict[str, SplitGraph] = {}
        self.photo_sessions: dict[str, object] = {}
        self._whole: set[str] = set()  # graphs found not to split: not read again per worker
        # Of each split decoder graph whose head the exporter stored, the cut: its per-call part
        # runs as that head, and its composite fused (runtime/composite.py)
        self.cuts: dict[str, composite.CompositeCut] = {}
        self.bundle = bundle
        bands = self._bands_wanted(bundle, threads)
        # per module: one thread where a call is too small to split (module_threads)
        self.module_threads = {m: module_threads(threads, bundle.flops.get(m)) for m in self.io}
        for module in self.io:
            if module == "decoder" and bands:
                continue  # the bands render every frame: the whole-frame graph is not loaded
            declared = self._declared(module)
            if declared is not None:  # before loading: ORT would fail on it less clearly
                self.check_graph_io(
                    module, declared, bundle.files[module], self.graph_spec(module, declared)
                )
            if declared is not None and self._per_frame(module, declared):
                # its own sessions: no session to discard
                self._frame_workers(bundle, threads, declared)
                continue
            own = self.module_threads[module]
            o = opts if own == threads else session_options(own)
            # a decoder whole per call (chunk 1 without bands; older bundles), and the
            # generator: split where they can
            split = (
                module in AVATAR_INPUTS
                and declared is not None
                and self._split(module, o, declared)
            )
            sess = split or self._load(bundle, module, o)
            if not split and GRAPH_IO in bundle.manifest:
                self._check_recorded(module, declared, sess)
            if declared is None:  # no onnx package: ORT's view (its inferred output shapes win)
                graph = ort_view(sess)
                self.check_graph_io(
                    module, graph, bundle.files[module], self.graph_spec(module, graph)
                )
                declared = graph
            self.sessions[module] = sess
            if self._per_frame(module, declared):  # known only now, from ORT's view of the graph
                self._frame_workers(bundle, threads, declared)
        if bands:
            self.band_sessions = {p: self._load_part(p) for p in bands}
            # the caller renders the first band itself (side_by_side): one fewer thread to wake
            self.band_pool = ThreadPoolExecutor(len(bands) - 1, thread_name_prefix="edgetalk-band")

    def _declared(self, part: str) -> dict[str, tuple] | None:
        """The shapes graph `part` declares for its inputs and outputs: as the exporter recorded
        them in the manifest (GRAPH_IO), else read from the graph with the onnx package (a bundle
        exported before), else None (ONNX Runtime's view is checked after loading)."""
        recorded = self.bundle.manifest.get(GRAPH_IO)
        if recorded is None:
            return declared_io(self.bundle.file(part))
        graph = recorded.get(part) if isinstance(recorded, dict) else None
        ok = isinstance(graph, dict) and all(
            isinstance(v, list) and all(isinstance(d, int | str) for d in v) for v in graph.values()
        )
        if not ok:
            raise BundleError(
                f"{self.bundle.path}: the manifest's {GRAPH_IO!r} block has no valid entry for "
                f"{part}; re-export the bundle"
            )
        return {str(k): tuple(v) for k, v in graph.items()}

    def _check_recorded(self, part: str, declared: dict[str, tuple], sess) -> None:
        """The graph loaded whole takes and gives the tensors the manifest recorded for it."""
        if ort_view(sess) != declared:
            raise BundleError(
                f"{self.bundle.path}: {self.bundle.files[part]} does not take and give the "
                f"tensors the manifest's {GRAPH_IO!r} records for it; re-export the bundle"
            )

    def _per_frame(self, module: str, graph: dict[str, tuple]) -> bool:
        """Whether `graph` is a decoder exported one frame per call for a chunk of several."""
        return module == "decoder" and self.graph_spec(module, graph) is not self.io[module]

    def _load(self, bundle, module: str, opts):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(
                str(bundle.file(module)), sess_options=opts, providers=self.providers
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendUnavailable(
                f"onnxruntime cannot load {bundle.files[module]}: {e}"
            ) from None

    def _split(self, part: str, opts, declared: dict[str, tuple]):
        """The session of graph `part`'s frame part (a decoder graph's, or the generator's), its
        avatar's part loaded beside it; None where the graph does not split
        (runtime/photo_split.py). `declared`: the whole graph's tensors, checked against the
        contract, which the two parts must take and give between them."""
        import onnxruntime as ort

        if part in self._whole:
            return None
        split, stored = self.splits.get(part), SPLITS in self.bundle.manifest
        if split is None and stored:  # stored by the exporter
            split = stored_parts(self.bundle, part)
        elif split is None:  # a bundle exported before: split at load
            split = split_photo_work(self.bundle.file(part), _module(part))
        if split is None:
            self._whole.add(part)
            return None
        cut = self.cuts.get(part)
        if cut is None and stored and _module(part) == "decoder" and composite.available():
            cut = composite.stored_cut(self.bundle, part)
        try:
            graph = split.frame if cut is None else cut.head
            frame = ort.InferenceSession(graph, sess_options=opts, providers=self.providers)
            if part not in self.photo_sessions:
                self.photo_sessions[part] = ort.InferenceSession(
                    split.photo, sess_options=session_options(1), providers=self.providers
                )
        except Exception:  # onnxruntime's own types: the whole graph, which loaded, runs instead
            self._whole.add(part)
            return None
        view = split_view(split, self.photo_sessions[part], frame)
        if cut is not None:  # the head gives the composite's inputs, the composite the frames
            view = self._cut_view(part, cut, view, declared)
        if stored and view != declared:
            raise BundleError(
                f"{self.bundle.path}: the stored parts of {self.bundle.files[part]} do not take "
                "and give that graph's tensors; re-export the bundle"
            )
        self.splits[part] = split
        if cut is not None:
            self.cuts[part] = cut
        return frame

    def _cut_view(self, part: str, cut, view: dict, declared: dict) -> dict:
        """`view` of a head with the whole graph's output in place of the head's, once the head's
        outputs are checked to be row bands that tile that output."""
        (out,) = self.io["decoder"].output_names
        shape = declared.get(out)
        rows = 0
        for xs, ys, colour, alpha in cut.bands:
            band = view.get(xs)
            ok = shape is not None and band is not None and len(band) == 4
            ok = ok and view.get(ys) == band and view.get(alpha) == band
            ok = ok and view.get(colour) == (1, 3, *band[2:]) and band[3] == shape[2]
            if not ok:
                raise BundleError(
                    f"{self.bundle.path}: the stored head of {self.bundle.files[part]} does not "
                    "give that graph's frames in row bands; re-export the bundle"
                )
            rows += band[2]
        if rows != shape[1]:
            raise BundleError(
                f"{self.bundle.path}: the stored head of {self.bundle.files[part]} covers {rows} "
                f"of the frame's {shape[1]} rows; re-export the bundle"
            )
        own = {k: v for k, v in view.items() if k not in cut.outputs()}
        return {**own, out: shape}

    def prepare_photo(
        self, feed: dict[str, np.ndarray], module: str = "decoder"
    ) -> dict[str, np.ndarray]:
        """`module`'s per-avatar feed with what each of its split graphs' avatar part makes of it."""
        out = dict(feed)
        for part in self.splits:
            if _module(part) == module:
                out.update(self._derived(part, feed))
        return out

    def _derived(self, part: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What `part`'s photo part makes of these inputs, under derived_key names: taken from
        the inputs where prepare_photo put it there, else made now (a caller that feeds the
        decoder's contract alone, as the export's parity check does)."""
        split = self.splits[part]
        keys = [derived_key(part, name) for name in split.derived]
        if all(k in inputs for k in keys):
            return {k: inputs[k] for k in keys}
        feed = {name: inputs[name] for name in split.photo_inputs}
        made = self.photo_sessions[part].run(list(split.derived), feed)
        return dict(zip(keys, made, strict=True))

    def _feed(self, part: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feed of graph `part`'s session: the contract's inputs, or its frame part's."""
        split = self.splits.get(part)
        if split is None:
            return {t.name: inputs[t.name] for t in self.io[_module(part)].inputs}
        derived = self._derived(part, inputs)
        return {
            name: inputs[name] if name not in split.derived else derived[derived_key(part, name)]
            for name in split.frame_inputs
        }

    def graph_spec(self, module: str, graph: dict[str, tuple]) -> ModuleIO:
        return graph_spec(self.io[module], module, graph)

    def _frame_workers(self, bundle, threads: int | None, declared: dict[str, tuple]) -> None:
        """min(threads, C) one-thread sessions of the one-frame decoder, and a pool to run them."""
        from .threads import resolve

        workers = max(1, min(resolve(threads), frames_per_call(self.io["decoder"])))
        one = session_options(1)
        self.frame_sessions = [
            self._split("decoder", one, declared) or self._load(bundle, "decoder", one)
            for _ in range(workers)
        ]
        self.sessions["decoder"] = self.frame_sessions[0]
        if workers > 1:
            # the caller renders the first share itself (side_by_side)
            self.pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="edgetalk-decoder")

    @classmethod
    def from_bundle(cls, bundle):
        return cls(bundle)

    def _bands_wanted(self, bundle, threads: int | None) -> list[str]:
        """The row-band graphs to render each frame with: where the bundle has them (chunk 1)
        and there are threads to render them side by side; else none."""
        from .threads import resolve

        parts = [band_part(k) for k in range(DECODER_BANDS)]
        if frames_per_call(self.io["decoder"]) != 1 or resolve(threads) < len(parts):
            return []
        # exported before bands, or by a target without them: the whole frame
        return parts if all(p in bundle.files for p in parts) else []

    def _load_part(self, part: str):
        """The session of an extra graph (a row band), its declared tensors checked first."""
        spec = decoder_band(self.io["decoder"], band_index(part))
        declared = self._declared(part)
        if declared is not None:
            self.check_graph_io("decoder", declared, self.bundle.files[part], spec)
            split = self._split(part, session_options(1), declared)
            if split is not None:
                return split
        sess = self._load(self.bundle, part, session_options(1))
        if GRAPH_IO in self.bundle.manifest:
            self._check_recorded(part, declared, sess)
        if declared is None:
            graph = ort_view(sess)
            self.check_graph_io("decoder", graph, self.bundle.files[part], spec)
        return sess

    def run_part(self, part: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one extra graph on its module's inputs (the export's parity gate for each band)."""
        if part not in self.band_sessions:
            if part not in self.bundle.files:
                raise KeyError(f"this bundle has no {part} graph")
            self.band_sessions[part] = self._load_part(part)
        spec = decoder_band(self.io["decoder"], band_index(part))
        (out,) = spec.outputs
        rows = np.empty(out.shape, np.float32)
        self._render_rows(part, self.band_sessions[part], self._feed(part, inputs), rows)
        return {out.name: rows}

    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.io[module].output_names
        if module == "decoder" and self.band_pool is not None:
            return {names[0]: self._run_bands(inputs)}
        if module == "decoder" and self.frame_sessions:
            return {names[0]: self._decode_frames(self._feed(module, inputs), names[0])}
        feed = self._feed(module, inputs)
        if module == "decoder" and module in self.cuts:  # the whole frame per call, its head
            return {names[0]: self._whole_frame(feed, np.float32)}
        outs = self.sessions[module].run(list(names), feed)
        return dict(zip(names, outs, strict=True))

    def decode_levels(self, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """The one-frame decoder's frames as 8-bit levels, each frame converted by the worker
        that rendered it, right after it (scheduler.to_uint8_into): its 0.8 MB of floats are
        still in that core's cache, and with two workers the conversion runs on both cores.
        In row bands (chunk 1, two threads), each band's worker converts its rows. A frame
        rendered whole per call is converted here where its composite runs fused (into levels
        directly); else None, and the scheduler converts it."""
        if self.band_pool is not None:
            (spec,) = self.io["decoder"].outputs
            return self._run_bands(inputs, np.empty(spec.shape, np.uint8))  # chunk 1: one frame
        if not self.frame_sessions and "decoder" not in self.cuts:
            return None
        feed = self._feed("decoder", inputs)
        if not self.frame_sessions:
            return self._whole_frame(feed, np.uint8)
        (spec,) = self.io["decoder"].outputs
        levels = np.empty((feed["motion"].shape[1], *spec.shape[1:]), np.uint8)
        self._decode_frames(feed, spec.name, levels)
        return levels

    def _run_bands(self, inputs: dict[str, np.ndarray], levels=None) -> np.ndarray:
        """The frame, each row band on its own session and worker (ONNX Runtime releases the
        GIL while each runs; bound in place like the frames below: no faster for two half
        frames, measured), as floats, or into `levels` (its 8-bit levels), each band's rows
        converted by the worker that rendered them."""
        (spec,) = self.io["decoder"].outputs
        frame = np.empty(spec.shape, np.float32) if levels is None else levels
        res, bands = self.cfg.render.resolution, len(self.band_sessions)

        def work(item):
            part, sess = item
            r0, r1 = band_span(res, band_index(part), bands)
            self._render_rows(part, sess, self._feed(part, inputs), frame[:, r0:r1])

        side_by_side(self.band_pool, work, list(self.band_sessions.items()))
        return frame

    def _whole_frame(self, feed: dict[str, np.ndarray], dtype) -> np.ndarray:
        """The frame of a decoder graph rendered whole per call, as floats or 8-bit levels."""
        (spec,) = self.io["decoder"].outputs
        frame = np.empty(spec.shape, dtype)
        self._render_rows("decoder", self.sessions["decoder"], feed, frame)
        return frame

    def _render_rows(self, part: str, sess, feed: dict[str, np.ndarray], dest) -> None:
        """Graph `part`'s output (a band's rows, or a frame) into `dest`: float32, or uint8
        for its 8-bit levels; composited from the head's outputs where it was cut."""
        cut = self.cuts.get(part)
        if cut is not None:
            outs = dict(zip(cut.outputs(), sess.run(cut.outputs(), feed), strict=True))
            composite.composite_bands(cut, outs, feed[cut.table], dest)
            return
        (name,) = self.io["decoder"].output_names
        rows = sess.run([name], feed)[0]
        if dest.dtype == np.uint8:
            to_uint8_into(rows, dest)
        else:
            dest[...] = rows

    def _decode_frames(
        self, feed: dict[str, np.ndarray], out: str, levels: np.ndarray | None = None
    ) -> np.ndarray:
        """The chunk's frames from the one-frame decoder: worker j renders the j-th contiguous
        share of the frames on its own session; ONNX Runtime releases the GIL while it runs.
        Each frame is written in place into the chunk's array (run_into); with `levels`, each
        is then converted into it by the same worker (decode_levels)."""
        motion = feed["motion"]
        frames = self._frames_out(motion.shape[1])
        shares = np.array_split(np.arange(motion.shape[1]), len(self.frame_sessions))

        def work(j: int) -> None:
            run_into(
                self.frame_sessions[j],
                feed,
                out,
                [frames[i : i + 1] for i in shares[j]],
                [np.ascontiguousarray(motion[:, i : i + 1]) for i in shares[j]],
                None if levels is None else [levels[i : i + 1] for i in shares[j]],
                self.cuts.get("decoder"),
            )

        if self.pool is None:
            work(0)
        else:
            side_by_side(self.pool, work, list(range(len(shares))))
        return frames

    def _frames_out(self, n: int) -> np.ndarray:
        """A new array for n frames, which the decoder's sessions write into."""
        (spec,) = self.io["decoder"].outputs
        return np.empty((n, *spec.shape[1:]), np.float32)

    def describe(self) -> str:
        frames = len(self.frame_sessions)
        per_frame = f", decoder per frame on {frames} thread{'s' * (frames > 1)}" if frames else ""
        if self.band_pool is not None:
            per_frame = f", decoder in {len(self.band_sessions)} row bands on as many threads"
        one = [m for m in ("audio", "generator") if self.module_threads[m] == 1]
        if one and (self.threads is None or self.threads > 1):
            per_frame += f", {' and '.join(one)} on 1 thread"
        once = [m for m in AVATAR_INPUTS if any(_module(p) == m for p in self.splits)]
        if once:
            work = {"decoder": "the decoder's photo work", "generator": "the reference token"}
            per_frame += f", {' and '.join(work[m] for m in once)} once per avatar"
        if self.cuts:
            per_frame += ", composite fused"
        return f"onnxruntime ({self.precision}, {self.providers[0]}{per_frame})"


def side_by_side(pool: ThreadPoolExecutor, work, items: list) -> None:
    """work(item) for every item at once: the first on the calling thread, the others on the
    pool's threads (ONNX Runtime releases the GIL while each runs). Handing every item to the
    pool cost a thread's wake-up and the caller's own sleep on each call: interleaved on the
    Xeon (INT8, chunk 1, two row bands), 154.9 -> 167.2 frames/s and FFD 109.05 -> 108.69 ms."""
    rest = [pool.submit(work, item) for item in items[1:]]
    try:
        work(items[0])
    finally:
        for f in rest:
            f.result()  # waited for even when the caller's own share raised: none runs on alone


def ort_view(sess) -> dict[str, tuple]:
    """ONNX Runtime's view of a session's graph: its inputs' and outputs' shapes by name."""
    return {t.name: tuple(t.shape) for t in (*sess.get_inputs(), *sess.get_outputs())}


def split_view(split: SplitGraph, photo, frame) -> dict[str, tuple]:
    """ONNX Runtime's view of a graph run in two parts: the inputs of both (but what the one
    hands the other) and the per-call part's outputs, as the whole graph declares them."""
    view = {**ort_view(photo), **ort_view(frame)}  # the photo part's outputs are the derived
    return {k: v for k, v in view.items() if k not in split.derived}


def run_into(
    sess, feed: dict[str, np.ndarray], out: str, dests: list, motions: list, levels=None, cut=None
) -> None:
    """Run the one-frame decoder session `sess` once per array in `dests`, with `feed` and the
    matching motion of `motions`, writing output `out` into that array (float32, C-ordered, the
    output's shape). Bound in place (ONNX Runtime's I/O binding), the frames skip an array ONNX
    Runtime allocates and the copy that joined them into the chunk's: 0.4 ms of a 31-ms chunk of
    4 frames on the Intel Xeon (fp32, one thread; +1% FPS), the same values.

    With `cut` (runtime/composite.py), `sess` is the graph's head: its outputs are bound to
    arrays made once here, and each frame is composited from them, into `levels` where given
    (the float frame is then not written), else into its float array."""
    binding = sess.io_binding()
    # the binding reads these arrays' memory: they are kept referenced until the runs are done
    bound = {n: np.ascontiguousarray(v) for n, v in feed.items() if n != "motion"}
    for name, value in bound.items():
        binding.bind_cpu_input(name, value)
    if cut is not None:
        shapes = {o.name: o.shape for o in sess.get_outputs()}
        heads = {n: np.empty(shapes[n], np.float32) for n in cut.outputs()}
        for name, a in heads.items():
            binding.bind_output(name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
    for k, (motion, dest) in enumerate(zip(motions, dests, strict=True)):
        binding.bind_cpu_input("motion", motion)
        if cut is not None:
            sess.run_with_iobinding(binding)
            target = dest if levels is None else levels[k]
            composite.composite_bands(cut, heads, bound[cut.table], target)
            continue
        binding.bind_output(out, "cpu", 0, np.float32, list(dest.shape), dest.ctypes.data)
        sess.run_with_iobinding(binding)
        if levels is not None:  # the frame's 8-bit levels, while it is in this core's cache
            to_uint8_into(dest, levels[k])


def _module(part: str) -> str:
    """The module whose contract graph `part` holds (a row band is the decoder's)."""
    return "decoder" if part.startswith(band_part(0)[:-1]) else part


def graph_spec(spec: ModuleIO, module: str, graph: dict[str, tuple]) -> ModuleIO:
    """The contract a graph file holds: its module's `spec` (the chunk's), or one frame's for a
    decoder exported per frame (its motion input has one frame where the chunk has more).
    `graph` maps the file's tensor names to their declared shapes."""
    if module == "decoder" and frames_per_call(spec) > 1:
        motion = graph.get("motion")
        if motion is not None and len(motion) == 3 and motion[1] == 1:
            return decoder_per_frame(spec)
    return spec


# A module whose call is below this many FLOPs runs on one thread whatever --threads says: its
# nodes are too small to split across a pool. On the Intel Xeon (AVX-512, 2 cores), one call at
# one and two threads: tiny C=4 audio (32 MFLOP) 0.56 and 0.78 ms, generator (29 MFLOP) 1.2 and
# 1.8 ms; large C=4 audio (410 MFLOP) 5.0 and 4.4 ms, generator (2.9 GFLOP) 129 and 81 ms.
SMALL_MODULE_FLOPS = 1e8


def module_threads(threads: int | None, flops: float | None) -> int | None:
    """The threads of a module's session: `threads` (None: ONNX Runtime's default), or 1 for a
    call of fewer than SMALL_MODULE_FLOPS as the bundle's manifest records it (bundles exported
    before it was recorded keep `threads`)."""
    return 1 if flops is not None and flops < SMALL_MODULE_FLOPS else threads


def session_options(threads: int | None):
    import onnxruntime as ort

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
    opts.log_severity_level = 3
    return opts


# The manifest's record of every graph's declared input and output shapes (converters/onnx.py),
# so that a runtime checks them before loading without the onnx package.
GRAPH_IO = "graph_io"


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
