"""The decoder's composite, fused (runtime/composite.py): the exporter cuts it off each decoder
graph and stores the head; the ONNX Runtime backend runs the head and composites in one compiled
pass. The frames are the whole graph's to the bit, by every path that renders them."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import BANDED, MICRO, export_seeded, need, skip_or_fail, speechlike, with_manifest

need("onnxruntime", "the onnx extra is not installed")
torch = need("torch", "the torch extra is not installed")

from edgetalk.errors import BundleError  # noqa: E402
from edgetalk.models.decoder import Composite  # noqa: E402
from edgetalk.models.io_spec import DECODER_BANDS, band_part  # noqa: E402
from edgetalk.models.sampling import neighbour_table  # noqa: E402
from edgetalk.runtime import backend_onnxruntime as bo  # noqa: E402
from edgetalk.runtime import composite  # noqa: E402
from edgetalk.runtime.bundle import open_bundle  # noqa: E402
from edgetalk.runtime.scheduler import StreamScheduler, to_uint8  # noqa: E402


def compiled():
    """The compiled composite, or a skip here (a failure on CI, whose install builds it)."""
    if composite.library() is None:
        skip_or_fail("the compiled composite is not built (no C compiler at install?)")
    return composite.library()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("composite")
    made = (("micro", MICRO, "fp32"), ("micro", MICRO, "int8"), ("banded", BANDED, "fp32"))
    return {(name, prec): export_seeded(root, name, cfg, prec, seed=7) for name, cfg, prec in made}


def bands(rng, rows: list[int], width: int, size: int):
    """Per row band, a head's outputs: sampling points around the band's own rows (some past
    the photo's edges: the clamp), colour and alpha in [0, 1]."""
    out, r0 = [], 0
    for r in rows:
        y, x = np.meshgrid(np.arange(r0, r0 + r), np.arange(width), indexing="ij")
        xs = x + rng.normal(0, 4, (r, width))
        ys = y * (size / width) + rng.normal(0, 4, (r, width))
        planes = [np.asarray(v, np.float32).reshape(1, 1, r, width) for v in (xs, ys)]
        colour = rng.uniform(0, 1, (1, 3, r, width)).astype(np.float32)
        alpha = rng.uniform(-0.1, 1.1, (1, 1, r, width)).clip(0, 1).astype(np.float32)
        out.append((*planes, colour, alpha))
        r0 += r
    return out


def test_the_compiled_composite_makes_the_torch_composites_frames_to_the_bit():
    compiled()
    rng = np.random.default_rng(0)
    size, rows = 48, [20, 28]
    photo = rng.uniform(0, 1, (1, 3, size, size)).astype(np.float32)
    per_band = bands(rng, rows, size, size)
    image = torch.from_numpy(photo)
    with torch.no_grad():
        roles = ([torch.from_numpy(b[k]) for b in per_band] for k in range(4))
        want = Composite()(image, *roles).numpy()
        # the table the graph's photo part makes
        table = np.ascontiguousarray(neighbour_table(image).numpy())
    floats = np.empty((1, size, size, 3), np.float32)
    levels = np.empty((1, size, size, 3), np.uint8)
    r0 = 0
    for (xs, ys, colour, alpha), r in zip(per_band, rows, strict=True):
        for dest in (floats, levels):
            composite.composite_into(
                table, (size, size), xs, ys, colour, alpha, dest[:, r0 : r0 + r]
            )
        r0 += r
    np.testing.assert_array_equal(floats, want)
    np.testing.assert_array_equal(levels, to_uint8(want, np.empty_like(want)))


def test_the_composite_refuses_arrays_it_cannot_read():
    compiled()
    rng = np.random.default_rng(1)
    ((xs, ys, colour, alpha),) = bands(rng, [4], 8, 8)
    table = np.zeros((64, 12), np.uint8)
    out = np.empty((1, 4, 8, 3), np.uint8)
    composite.composite_into(table, (8, 8), xs, ys, colour, alpha, out)  # as it should be
    bad = [
        ((table[:32], (8, 8), xs, ys, colour, alpha, out), "table"),
        ((table, (8, 8), xs[:, :, :2], ys, colour, alpha, out), "xs"),
        ((table, (8, 8), xs, ys.astype(np.float64), colour, alpha, out), "ys"),
        ((table, (8, 8), xs, ys, colour[:, :1], alpha, out), "colour"),
        ((table, (8, 8), xs, ys, colour, alpha, out.astype(np.int16)), "float32 or uint8"),
        ((table, (8, 8), xs, ys, colour, alpha, np.empty((1, 4, 8, 3, 1), np.uint8)), "output"),
        (
            (table, (8, 8), xs, ys, colour, alpha, np.empty((1, 4, 8, 4), np.uint8)[..., :3]),
            "output",
        ),
    ]
    for args, what in bad:
        with pytest.raises(ValueError, match=what):
            composite.composite_into(*args)


def test_the_export_stores_a_head_for_each_decoder_graph(bundles):
    for (name, prec), path in bundles.items():
        bundle = open_bundle(path)  # hashes every file it lists, the heads too
        cuts = bundle.manifest[composite.COMPOSITES]
        want = ["decoder", *([band_part(k) for k in range(DECODER_BANDS)] * (name == "banded"))]
        assert sorted(cuts) == sorted(want), (name, prec)
        for part in cuts:
            cut = composite.stored_cut(bundle, part)
            assert cut.bands and all(len(b) == 4 for b in cut.bands)
            assert bundle.manifest["sha256"][bundle.files[composite.head_role(part)]]


def test_an_fp16_export_keeps_its_composite_in_the_graph(tmp_path):
    """Its blend is float16: the compiled composite reads float32, so none is cut."""
    bundle = open_bundle(export_seeded(tmp_path, "micro", MICRO, "fp16", seed=7))
    assert bundle.manifest[composite.COMPOSITES] == {}
    assert "composite fused" not in bo.OnnxRuntimeBackend(bundle, threads=1).describe()


def render(path, threads: int, monkeypatch, fused: bool):
    monkeypatch.setenv(composite.ENV_SWITCH, "1" if fused else "0")
    be = bo.OnnxRuntimeBackend(open_bundle(path), threads=threads)
    sched = StreamScheduler(be, avatar(be.cfg.render.resolution), seed=1)
    rng = np.random.default_rng(3)
    motion = rng.uniform(0, 0.6, (1, be.cfg.chunk, be.cfg.motion_dim)).astype(np.float32)
    inputs = {**sched.photo, "motion": motion}
    return be, be.run("decoder", inputs)["frames"], be.decode_levels(inputs)


def avatar(res: int) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (res, res, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("name", "prec", "threads", "how"),
    [
        ("micro", "fp32", 1, "per frame"),
        ("micro", "fp32", 2, "per frame"),
        ("micro", "int8", 2, "per frame"),
        ("banded", "fp32", 1, "whole frame per call"),
        ("banded", "fp32", 2, "row bands"),
    ],
)
def test_fused_frames_are_the_whole_graphs_to_the_bit(
    bundles, monkeypatch, name, prec, threads, how
):
    compiled()
    path = bundles[name, prec]
    fused, frames, levels = render(path, threads, monkeypatch, fused=True)
    plain, want, want_levels = render(path, threads, monkeypatch, fused=False)
    assert "composite fused" in fused.describe() and "composite fused" not in plain.describe()
    assert bool(fused.band_sessions) == (how == "row bands")
    assert bool(fused.frame_sessions) == (how == "per frame")
    np.testing.assert_array_equal(frames, want)
    np.testing.assert_array_equal(levels, to_uint8(want, np.empty_like(want)))
    if want_levels is not None:  # the unfused whole frame per call leaves them to the scheduler
        np.testing.assert_array_equal(levels, want_levels)
    if how == "row bands":  # each band's graph alone, as the export's parity gate runs it
        sched = StreamScheduler(fused, avatar(fused.cfg.render.resolution), seed=1)
        inputs = {**sched.photo, "motion": np.zeros((1, 1, fused.cfg.motion_dim), np.float32)}
        for part in fused.band_sessions:
            assert part in fused.cuts
            rows = fused.run_part(part, inputs)["frames"]
            assert rows.dtype == np.float32 and rows.shape[1] < frames.shape[1]


def test_a_stream_is_the_same_fused(bundles, monkeypatch):
    compiled()

    def stream(fused: bool):
        monkeypatch.setenv(composite.ENV_SWITCH, "1" if fused else "0")
        be = bo.OnnxRuntimeBackend(open_bundle(bundles["micro", "int8"]), threads=2)
        sched = StreamScheduler(be, avatar(be.cfg.render.resolution), seed=1)
        return np.stack([f.rgb for f in sched.push_audio(speechlike(0.6)) + sched.flush()])

    np.testing.assert_array_equal(stream(True), stream(False))


def test_without_the_compiled_library_the_whole_graph_runs(bundles, monkeypatch):
    monkeypatch.setattr(composite, "library", lambda: None)
    be = bo.OnnxRuntimeBackend(open_bundle(bundles["micro", "fp32"]), threads=1)
    assert not be.cuts and "composite fused" not in be.describe()
    with pytest.raises(RuntimeError, match="not installed"):
        ((xs, ys, colour, alpha),) = bands(np.random.default_rng(0), [2], 4, 4)
        out = np.empty((1, 2, 4, 3), np.uint8)
        composite.composite_into(np.zeros((16, 12), np.uint8), (4, 4), xs, ys, colour, alpha, out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update({composite.COMPOSITES: ["decoder"]}), "'composites' block"),
        (lambda m: m[composite.COMPOSITES]["decoder"].pop("table"), "entry 'decoder'"),
        (lambda m: m[composite.COMPOSITES]["decoder"].update(bands=[["a", "b"]]), "entry"),
        (lambda m: m[composite.COMPOSITES].update(audio={}), "entry 'audio'"),
        (
            lambda m: m[composite.COMPOSITES]["decoder"].update(head="decoder.onnx"),
            "head is not the file listed",
        ),
        (
            lambda m: m[composite.COMPOSITES]["decoder"]["bands"][0].reverse(),
            "does not give that graph's frames in row bands",
        ),
    ],
)
def test_a_malformed_record_of_the_heads_is_refused_clearly(bundles, tmp_path, change, message):
    compiled()
    copy = with_manifest(bundles["micro", "fp32"], tmp_path / "b", change)
    with pytest.raises(BundleError, match=message):
        bo.OnnxRuntimeBackend(open_bundle(copy), threads=1)


def resorted(graph_bytes: bytes) -> bytes:
    """The same graph with its nodes in another topological order: each ready node taken
    last-first (the quantizer, for one, writes its graph in an order of its own)."""
    import onnx

    model = onnx.load_from_string(graph_bytes)
    nodes = list(model.graph.node)
    made = {o: k for k, n in enumerate(nodes) for o in n.output}
    needs = {k: {made[i] for i in n.input if i in made} for k, n in enumerate(nodes)}
    order, done = [], set()
    while len(order) < len(nodes):
        ready = [k for k in range(len(nodes)) if k not in done and needs[k] <= done]
        order.append(ready[-1])
        done.add(ready[-1])
    del model.graph.node[:]
    model.graph.node.extend(nodes[k] for k in order)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize(("name", "prec"), [("micro", "fp32"), ("micro", "int8")])
def test_the_cut_reads_each_inputs_role_off_the_graph_not_its_order(bundles, name, prec):
    need("onnx", "the onnx extra is not installed")
    bundle = open_bundle(bundles[name, prec])
    stream = bundle.file("decoder:stream").read_bytes()
    cut = composite.cut_composite(stream)
    again = composite.cut_composite(resorted(stream))
    assert cut.bands == again.bands and cut.table == again.table
    assert cut.bands == composite.stored_cut(bundle, "decoder").bands
    # a graph without its composite's scope has nothing to cut
    assert composite.cut_composite(stream.replace(b"/composite/", b"/elsewhere/")) is None


def test_a_nan_from_the_head_reads_inside_the_table():
    """The table's row index comes from xs and ys: a NaN there must not read outside it (the
    graph's Gather would refuse the index; the C loop would read anywhere). It samples the
    border, as a coordinate clamped to 0 does."""
    compiled()
    rng = np.random.default_rng(4)
    ((xs, ys, colour, alpha),) = bands(rng, [6], 16, 16)
    table = rng.integers(0, 256, (256, 12), dtype=np.uint8)
    got = np.empty((1, 6, 16, 3), np.uint8)
    nan = np.full_like(xs, np.nan)
    composite.composite_into(table, (16, 16), nan, nan, colour, alpha, got)
    want = np.empty_like(got)
    zero = np.zeros_like(xs)
    composite.composite_into(table, (16, 16), zero, zero, colour, alpha, want)
    np.testing.assert_array_equal(got, want)
