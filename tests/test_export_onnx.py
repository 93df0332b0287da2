"""`edgetalk export --target onnx`: static shapes, names, parity gates, 8-bit for real, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from .conftest import exported_before, need  # noqa: E402

need("onnxruntime", "the onnx extra is not installed")

from edgetalk.cli import main  # noqa: E402
from edgetalk.converters.onnx import int8_report  # noqa: E402
from edgetalk.errors import BundleError  # noqa: E402
from edgetalk.export.pipeline import export_bundle  # noqa: E402
from edgetalk.models.checkpoint import save_checkpoint  # noqa: E402
from edgetalk.models.edgetalk import MODULES  # noqa: E402
from edgetalk.models.io_spec import decoder_per_frame, module_io  # noqa: E402
from edgetalk.runtime.bundle import open_bundle  # noqa: E402
from edgetalk.runtime.loader import open_backend  # noqa: E402
from edgetalk.runtime.scheduler import StreamScheduler  # noqa: E402

from .conftest import MICRO, seeded_model, speechlike  # noqa: E402


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "micro.safetensors"
    save_checkpoint(seeded_model(MICRO, seed=2), path)
    return path


@pytest.fixture(scope="module")
def bundles(micro_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for prec in ("fp32", "fp16", "int8"):
        r = export_bundle("onnx", prec, checkpoint=micro_ckpt, out=root / prec, progress=False)
        out[prec] = r
    return out


@pytest.mark.parametrize("prec", ["fp32", "fp16", "int8"])
def test_bundle_passes_parity(bundles, prec):
    from .test_shipped_exports import README_THRESHOLDS

    r = bundles[prec]
    assert r.ok, r.manifest["parity"]
    assert r.manifest["thresholds"] == README_THRESHOLDS[prec]
    for name in MODULES:
        assert r.manifest["parity"][name]["status"] == "pass"
    e2e = r.manifest["parity"]["end_to_end"]
    assert e2e["frames"] == 100 and e2e["status"] == "pass"
    assert e2e["psnr_db"] >= README_THRESHOLDS[prec]["e2e_psnr_db"]


def fp16_weight_share(path) -> float:
    """Share of the graph's floating-point weight elements stored as fp16."""
    import onnx

    m = onnx.load(str(path))
    n = {onnx.TensorProto.FLOAT16: 0, onnx.TensorProto.FLOAT: 0}
    for init in m.graph.initializer:
        if init.data_type in n:
            n[init.data_type] += int(np.prod(init.dims)) if init.dims else 1
    total = sum(n.values())
    return n[onnx.TensorProto.FLOAT16] / total if total else 0.0


def test_fp16_weights_are_fp16(bundles):
    for name in MODULES:
        assert fp16_weight_share(bundles["fp16"].path / f"{name}.onnx") >= 0.9, name
        assert fp16_weight_share(bundles["fp32"].path / f"{name}.onnx") == 0.0, name


def test_graphs_have_static_contract_shapes(bundles):
    import onnx

    r = bundles["fp32"]
    io = module_io(MICRO)
    for name in MODULES:
        m = onnx.load(str(r.path / f"{name}.onnx"))
        assert m.opset_import[0].version >= 17
        got = {
            v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in (*m.graph.input, *m.graph.output)
        }
        assert all(
            d.HasField("dim_value")
            for v in (*m.graph.input, *m.graph.output)
            for d in v.type.tensor_type.shape.dim
        )
        # the decoder graph renders one frame per call; the manifest keeps the chunk's contract
        graph_io = decoder_per_frame(io[name]) if name == "decoder" else io[name]
        want = {t.name: t.shape for t in (*graph_io.inputs, *graph_io.outputs)}
        assert got == want
        assert r.manifest["modules"][name]["io"] == io[name].to_dict()
    assert r.manifest["modules"]["decoder"]["info"]["frames_per_call"] == 1
    assert io["decoder"].inputs[2].shape[1] == MICRO.chunk > 1  # so the two forms differ


def test_outputs_bound_by_name(bundles):
    backend = open_backend(bundle=bundles["fp32"].path)
    io = backend.io["generator"]
    rng = np.random.default_rng(0)
    feed = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in io.inputs}
    a = backend.run("generator", feed)
    b = backend.run("generator", dict(reversed(list(feed.items()))))  # input order is irrelevant
    assert list(a) == list(io.output_names)
    for k in a:
        assert np.array_equal(a[k], b[k])
        assert a[k].shape == next(t.shape for t in io.outputs if t.name == k)


def test_int8_is_really_8bit(bundles):
    from edgetalk.converters.onnx import INT8_MODULES

    r = bundles["int8"]
    for name in INT8_MODULES:
        rep = int8_report(r.path / f"{name}.onnx")
        assert rep["int8_weight_tensors"] > 0 and rep["quantized_compute_nodes"] > 0, name
        info = r.manifest["modules"][name]["info"]
        assert "float_compute_nodes" in info and "float_op_types" in info
        assert info["weights"] == "int8"
        # every float compute node is one the policy names, and most are 8-bit
        assert "unexplained" not in rep["float_reasons"].values(), rep["float_reasons"]
        assert rep["int8_weight_share"] >= 0.5, (name, rep["int8_weight_share"])
    for name in set(MODULES) - set(INT8_MODULES):
        assert r.manifest["modules"][name]["info"]["weights"] == "fp32"
        assert int8_report(r.path / f"{name}.onnx")["int8_weight_tensors"] == 0
    fp32 = int8_report(bundles["fp32"].path / "decoder.onnx")
    assert fp32["int8_weight_tensors"] == 0 and fp32["quantized_adds"] == []


def residual_graph():
    """x -> c0 -> gelu -> a0 = x + it -> c1 -> gelu -> a1 = a0 + it -> c2; a2 = x + y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((4, 4, 3, 3), np.float32), "w")
    nodes = []
    for i, src in enumerate(("x", "a0")):
        nodes += [
            helper.make_node("Conv", [src, "w"], [f"c{i}"], name=f"c{i}", pads=[1, 1, 1, 1]),
            helper.make_node("Gelu", [f"c{i}"], [f"g{i}"], name=f"g{i}", domain="com.microsoft"),
            helper.make_node("Add", [src, f"g{i}"], [f"a{i}"], name=f"a{i}"),
        ]
    nodes += [
        helper.make_node("Conv", ["a1", "w"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["x", "y"], ["a2"], name="a2"),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in "xy"]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c2", "a2")]
    return onnx.helper.make_model(helper.make_graph(nodes, "g", vi, outs, [w]))


def test_int8_quantizes_the_residual_sums_between_8bit_convolutions():
    """x + gelu(conv(x)) into a quantized convolution is quantized too (the residual stays
    8-bit); a sum into a float head, one from a float convolution, or any other Add is not."""
    from edgetalk.converters.onnx import residual_adds

    m = residual_graph()
    assert residual_adds(m, {"c2"}) == {"a0"}  # a1 feeds the float c2; a2 is no residual
    assert residual_adds(m, set()) == {"a0", "a1"}
    assert residual_adds(m, {"c1"}) == set()  # a0 into a float conv, a1 from one
    assert residual_adds(m, {"c0", "c2"}) == set()


def test_the_refinement_head_is_8bit_where_its_flow_is_in_pixels(bundles):
    """The gather form gives the refinement's flow in pixels, so INT8 quantizes that head; the
    native form (TensorRT's graph) gives it normalized, a few of 256 output steps: float there."""
    from edgetalk.converters.onnx import FLOAT_HEADS, NATIVE_FLOAT_HEADS
    from edgetalk.converters.target import targets

    rep = int8_report(bundles["int8"].path / "decoder.onnx")
    assert not [n for n in rep["float_compute_nodes"] if "/refine_out/" in n]
    assert "/refine_out/" in NATIVE_FLOAT_HEADS and "/refine_out/" not in FLOAT_HEADS
    # the policy follows each target's form (TensorRT's class loads without TensorRT)
    assert targets()["onnx"]().float_heads() == FLOAT_HEADS
    assert targets()["tensorrt"]().float_heads() == NATIVE_FLOAT_HEADS


def test_decoder_graph_is_the_onnx_runtime_form(bundles):
    """The exported decoder holds none of the kernels ONNX Runtime runs slowly (GridSample,
    DepthToSpace, Resize; gathers behind per-channel index copies), the photo is
    gathered as 8-bit levels, and the INT8 one runs GELU as one kernel, its grid upsampling in
    float."""
    import onnx

    for prec in ("fp32", "fp16", "int8"):
        nodes = onnx.load(str(bundles[prec].path / "decoder.onnx")).graph.node
        ops = [n.op_type for n in nodes]
        assert not {"GridSample", "DepthToSpace", "Resize"} & set(ops), prec
        assert "MatMul" in ops
        # the photo's four taps per pixel: one Gather of a neighbour-table row, no index copies
        sampler = [n for n in nodes if "/sampler" in n.name]
        kinds = {n.op_type for n in sampler}
        assert "Gather" in kinds and not {"Expand", "GatherElements"} & kinds, prec
        assert any(
            n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.UINT8 for n in sampler
        )
        assert "Expand" not in ops, prec  # no index copied per channel, anywhere
        # the lip edges' per-element gathers, one per table row, all share one index
        shared = {n.input[1] for n in nodes if n.op_type == "GatherElements"}
        assert len(shared) == 1 and ops.count("GatherElements") == 6, prec
    fp32 = onnx.load(str(bundles["fp32"].path / "decoder.onnx")).graph.node
    int8 = onnx.load(str(bundles["int8"].path / "decoder.onnx")).graph.node
    gelus = [n for n in int8 if n.op_type == "Gelu"]
    spelled_out = [n for n in fp32 if n.op_type == "Erf"]  # the tracer's exact GELU, one Erf each
    assert len(gelus) == len(spelled_out) >= 2
    assert all(n.domain == "com.microsoft" for n in gelus)
    assert not [n for n in int8 if n.op_type == "Erf"]
    reasons = int8_report(bundles["int8"].path / "decoder.onnx")["float_reasons"]
    upsample = [k for k in reasons if "/upsample/" in k]
    assert len(upsample) == 2  # both matmuls of the grid's upsampling stay float
    assert "float head /upsample/" in {reasons[k] for k in upsample}
    # the flow head in its rows form (RowsConv2d): one 1x3 convolution, kept float in INT8
    for prec in ("fp32", "int8"):
        nodes = onnx.load(str(bundles[prec].path / "decoder.onnx")).graph.node
        flow = [n for n in nodes if n.op_type == "Conv" and "/flow_out/" in n.name]
        kernel = [list(a.ints) for n in flow for a in n.attribute if a.name == "kernel_shape"]
        assert kernel == [[1, 3]], (prec, kernel)
    assert reasons[f"Conv:{flow[0].name}"] == "float head /flow_out/"


def test_sessions_do_not_spin_beside_each_other(bundles, monkeypatch):
    """Four sessions, four pools: with more than one thread, an idle pool must not spin-wait
    while the next module runs (it halved ONNX FPS at 2 threads on 2 cores). Not even the
    decoder's: spinning between its own nodes won nothing quiet and cost a third of the FPS
    with one busy process beside it (0.45-0.49 of quiet against 0.61-0.74)."""
    from edgetalk.runtime import backend_onnxruntime as bo
    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend

    # every module of the micro model is below the one-thread bound: lift it, so that they
    # all get pools here
    monkeypatch.setattr(bo, "SMALL_MODULE_FLOPS", 0)
    for threads, want in ((2, "0"), (1, "")):
        backend = OnnxRuntimeBackend(open_bundle(bundles["fp32"].path), threads=threads)
        for name, sess in backend.sessions.items():
            opts = sess.get_session_options()
            try:
                got = opts.get_session_config_entry("session.intra_op.allow_spinning")
            except RuntimeError:  # not set: ORT's default (one thread has no pool to spin)
                got = ""
            # the one-frame decoder runs on one-thread sessions, one per thread (no pool)
            assert got == ("" if name == "decoder" else want), (threads, name)
        frame = backend.frame_sessions
        assert len(frame) == min(threads, MICRO.chunk) and backend.sessions["decoder"] is frame[0]
        assert f"decoder per frame on {len(frame)} thread" in backend.describe()
        assert all(s.get_session_options().intra_op_num_threads == 1 for s in frame)


def test_frame_workers_render_what_one_worker_renders(bundles):
    """The one-frame decoder, run by two workers at once, gives the chunk's frames in order,
    equal to one worker's and to the torch decoder's (the chunk's contract: [C, R, R, 3])."""
    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend
    from edgetalk.runtime.backend_torch import TorchBackend

    one = OnnxRuntimeBackend(open_bundle(bundles["fp32"].path), threads=1)
    two = OnnxRuntimeBackend(open_bundle(bundles["fp32"].path), threads=2)
    assert one.pool is None and two.pool is not None
    ref = TorchBackend(seeded_model(MICRO, seed=2), MICRO)  # micro_ckpt's weights
    rng = np.random.default_rng(3)
    spec = module_io(MICRO)["decoder"]
    image = rng.integers(0, 256, (1, 3, MICRO.render.resolution, MICRO.render.resolution))
    image = (image / 255.0).astype(np.float32)  # an 8-bit photo, as the runtime crops it
    photo = ref.run("appearance", {"image": image})
    feed = {t.name: photo[t.name] for t in spec.inputs if t.name in photo}
    feed["image"] = image
    feed["motion"] = (rng.standard_normal((1, MICRO.chunk, MICRO.motion_dim)) * 0.3).astype(
        np.float32
    )
    a, b = one.run("decoder", feed)["frames"], two.run("decoder", feed)["frames"]
    want = ref.run("decoder", feed)["frames"]
    assert a.shape == b.shape == want.shape == spec.outputs[0].shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, want, atol=1e-4)
    # each frame is its own motion's: frames swapped in the motion come out swapped
    swapped = {**feed, "motion": feed["motion"][:, ::-1].copy()}
    again = two.run("decoder", swapped)["frames"]
    np.testing.assert_array_equal(again, b[::-1])
    # the workers write each call's frames into a new array: a caller's frames stay its own
    assert not np.shares_memory(again, b)
    np.testing.assert_array_equal(one.run("decoder", feed)["frames"], a)
    # a photo input given in another memory order (a transposed view) renders the same
    feed["image"] = np.asfortranarray(image)
    np.testing.assert_array_equal(one.run("decoder", feed)["frames"], a)


def test_per_frame_decoder_is_loaded_once_with_or_without_the_onnx_package(
    bundles, monkeypatch, tmp_path
):
    """A one-frame decoder graph is never loaded whole where it splits: its frame part once per
    worker, its photo part once (the generator's two parts: two more graphs), from the parts the
    bundle stores or, for a bundle exported before, split at load with the onnx package. Such a
    bundle on a bare runtime gets the shapes from one ORT session of the whole file, which is then
    let go. Either way the frames are the same."""
    import onnxruntime

    from edgetalk.runtime import backend_onnxruntime as bo

    loads = []
    real = onnxruntime.InferenceSession

    def counting(path, *a, **kw):
        loads.append("<graph>" if isinstance(path, bytes) else str(path).rsplit("/", 1)[-1])
        return real(path, *a, **kw)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    rng = np.random.default_rng(5)
    spec = module_io(MICRO)["decoder"]
    feed = {t.name: rng.random(t.shape).astype(np.float32) for t in spec.inputs}
    frames = []
    old = exported_before(bundles["fp32"].path, tmp_path / "old")
    bare = lambda path, module=None: None  # noqa: E731
    for path, declared, split, whole, parts in (
        (bundles["fp32"].path, bare, bare, 0, 5),  # stored: neither is called
        (old, bo.declared_io, bo.split_photo_work, 0, 5),
        (old, bare, bare, 3, 0),
    ):
        monkeypatch.setattr(bo, "declared_io", declared)
        monkeypatch.setattr(bo, "split_photo_work", split)
        loads.clear()
        backend = bo.OnnxRuntimeBackend(open_bundle(path), threads=2)
        assert len(backend.frame_sessions) == 2
        assert loads.count("decoder.onnx") == whole and loads.count("<graph>") == parts
        assert backend.sessions["decoder"] is backend.frame_sessions[0]
        frames.append(backend.run("decoder", feed)["frames"])
    np.testing.assert_array_equal(frames[0], frames[1])
    np.testing.assert_array_equal(frames[0], frames[2])


def test_a_chunk_sized_decoder_from_earlier_releases_still_runs(
    bundles, micro_ckpt, tmp_path, monkeypatch
):
    """Bundles exported before the one-frame decoder hold a graph of C frames: the backend
    runs it in one call, as then, and renders what the one-frame graph renders."""
    from edgetalk.converters.onnx import OnnxTarget
    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(OnnxTarget, "per_frame_decoder", False)
    old = export_bundle("onnx", "fp32", checkpoint=micro_ckpt, out=tmp_path / "old", progress=False)
    assert old.ok and "frames_per_call" not in old.manifest["modules"]["decoder"]["info"]
    for threads in (1, 2):
        then = OnnxRuntimeBackend(open_bundle(old.path), threads=threads)
        now = OnnxRuntimeBackend(open_bundle(bundles["fp32"].path), threads=threads)
        assert not then.frame_sessions and then.pool is None and now.frame_sessions
        a, b = render_stream(then), render_stream(now)
        np.testing.assert_allclose(a, b, atol=2e-5)


def render_stream(backend) -> np.ndarray:
    sched = StreamScheduler(backend, np.full((32, 32, 3), 120, np.uint8), seed=1)
    frames = sched.push_audio(speechlike(0.6)) + sched.flush()
    return np.stack([f.rgb for f in frames]).astype(np.float32) / 255.0


def test_bundle_runs_through_scheduler(bundles):
    backend = open_backend(bundle=bundles["int8"].path)
    assert backend.name == "onnxruntime" and backend.precision == "int8"
    sched = StreamScheduler(backend, np.zeros((32, 32, 3), np.uint8))
    frames = sched.push_audio(speechlike(0.5)) + sched.flush()
    assert len(frames) == 13 and frames[0].rgb.shape == (32, 32, 3)


def test_existing_modules_are_skipped_unless_forced(bundles, micro_ckpt, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundles["fp32"].path, out)
    again = export_bundle("onnx", "fp32", checkpoint=micro_ckpt, out=out, progress=False)
    assert again.ok and all(m.skipped for m in again.modules)
    forced = export_bundle(
        "onnx", "fp32", checkpoint=micro_ckpt, out=out, force=True, progress=False
    )
    assert forced.ok and not any(m.skipped for m in forced.modules)


def copy_bundle(bundles, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    dst = tmp_path / "copy"
    shutil.copytree(bundles["fp32"].path, dst)
    return dst


def test_tampered_file_is_refused(bundles, tmp_path):
    b = copy_bundle(bundles, tmp_path)
    data = bytearray((b / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx does not match its sha256"):
        open_bundle(b)


def test_missing_file_unknown_schema_and_wrong_chunk_are_refused(bundles, tmp_path):
    b = copy_bundle(bundles, tmp_path)
    with pytest.raises(BundleError, match="exported for chunk 2, not 4"):
        open_bundle(b, expect_chunk=4)
    mf = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(dict(mf, schema_version=99)))
    with pytest.raises(BundleError, match="schema version 99"):
        open_bundle(b)
    mf["modules"]["generator"]["io"]["inputs"][0]["shape"] = [1, 3, 16]
    (b / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(BundleError, match="generator I/O in the manifest does not match"):
        open_bundle(b)
    (b / "manifest.json").write_text(
        json.dumps(
            dict(
                mf,
                modules=json.loads((bundles["fp32"].path / "manifest.json").read_text())["modules"],
            )
        )
    )
    (b / "audio.onnx").unlink()
    with pytest.raises(BundleError, match="audio file audio.onnx is missing"):
        open_bundle(b)
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(b)


def test_parity_failure_exits_nonzero_and_keeps_no_bundle(
    micro_ckpt, tmp_path, capsys, monkeypatch
):
    from edgetalk.converters import parity

    monkeypatch.setitem(parity.THRESHOLDS, "fp32", dict(parity.THRESHOLDS["fp32"], psnr_db=1e9))
    out = tmp_path / "fail"
    code = main(
        [
            "export",
            "--target",
            "onnx",
            "--precision",
            "fp32",
            "--checkpoint",
            str(micro_ckpt),
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 3
    assert "parity FAILED for decoder (PSNR" in text
    assert not out.exists()  # nothing a runtime would accept
    with pytest.raises(BundleError, match="parity failed for decoder"):
        open_bundle(tmp_path / "fail.partial")


def test_cli_run_with_bundle(bundles, tmp_path, wav_file, capsys):
    out = tmp_path / "o.mp4"
    code = main(
        [
            "run",
            "--bundle",
            str(bundles["fp16"].path),
            "--audio",
            str(wav_file(0.4)),
            "--out",
            str(out),
            "--no-face-check",
        ]
    )
    assert code == 0 and out.exists()
    assert "onnxruntime (fp16" in capsys.readouterr().out


def _edit_graph(path):
    import onnx

    m = onnx.load(str(path))  # declare another output shape in the graph
    out = next(o for o in m.graph.output if o.name == "motion")
    out.type.tensor_type.shape.dim[1].dim_value += 1
    onnx.save(m, str(path))


def test_manifest_that_disagrees_with_the_graph_is_refused(bundles, tmp_path):
    """A manifest edited and re-hashed without re-exporting: the graph's own tensor shapes and
    names are checked against it when the backend opens the bundle, in a bundle exported before
    the stored parts (read with the onnx package) and in one with them (ONNX Runtime's view of
    each graph it loads, against the manifest's record)."""
    from edgetalk.runtime.bundle import tree_sha256

    def rehash(b):
        mf = json.loads((b / "manifest.json").read_text())
        mf["sha256"] = {f: tree_sha256(b / f) for f in mf["files"].values()}
        (b / "manifest.json").write_text(json.dumps(mf))

    b = exported_before(bundles["fp32"].path, tmp_path / "old")
    _edit_graph(b / "generator.onnx")
    rehash(b)
    with pytest.raises(BundleError, match=r"generator graph generator.onnx: motion has shape"):
        open_backend(bundle=b)
    shutil.copy(b / "audio.onnx", b / "generator.onnx")  # another module's graph in its place
    rehash(b)
    with pytest.raises(BundleError, match="missing from the graph"):
        open_backend(bundle=b)

    # ONNX Runtime infers the output shapes itself: another graph in a file's place is what shows
    for graph, message in (
        ("generator.stream.onnx", "the stored parts of generator.onnx do not take"),
        ("appearance.onnx", "appearance.onnx does not take and give the tensors"),
    ):
        b = copy_bundle(bundles, tmp_path / graph)
        shutil.copy(b / "audio.onnx", b / graph)
        rehash(b)
        with pytest.raises(BundleError, match=message):
            open_backend(bundle=b)


def test_manifest_records_each_modules_flops_per_call(bundles, micro_ckpt):
    """What the runtime sizes each module's threads by: the model's own FLOP count per call, at
    the bundle's streaming shapes, read back by open_bundle."""
    from edgetalk.models.checkpoint import load_checkpoint
    from edgetalk.models.flops import module_flops

    b = open_bundle(bundles["fp32"].path)
    model, _ = load_checkpoint(micro_ckpt)
    want = module_flops(model.for_streaming(b.cfg))
    assert b.flops == {m: float(f) for m, f in want.items()} and min(want.values()) > 0
    for name, entry in b.manifest["modules"].items():
        assert entry["info"]["flops_per_call"] == want[name]


def test_each_converted_artifact_is_timed_against_its_fp32_graph(bundles):
    """fp16 and INT8 manifests record, per converted graph, a call's time against its fp32
    graph's on this machine (export/speed.py); fp32 bundles and graphs the INT8 policy keeps
    float have no such figure (there is nothing to compare)."""
    for prec in ("fp16", "int8"):
        for name, mod in bundles[prec].manifest["modules"].items():
            s = mod["info"].get("speed")
            if prec == "int8" and mod["info"].get("weights") == "fp32":
                assert s is None, name
                continue
            assert s["threads"] == 1 and s["ms"] > 0 and s["fp32_ms"] > 0, (prec, name, s)
            assert s["vs_fp32"] == pytest.approx(s["fp32_ms"] / s["ms"], rel=0.01)
    assert "speed" in bundles["int8"].manifest["modules"]["decoder"]["info"]
    assert all("speed" not in m["info"] for m in bundles["fp32"].manifest["modules"].values())


def test_cli_says_when_int8_does_not_pay_here(micro_ckpt, tmp_path, capsys, monkeypatch):
    from edgetalk.export import pipeline

    def slow(tgt, fp32_path, path, sample):  # what a CPU without 8-bit dot products measures
        return {"threads": 1, "ms": 27.5, "fp32_ms": 26.7, "vs_fp32": 0.97, "cpu": "a test CPU"}

    monkeypatch.setattr(pipeline, "measure_speed", slow)
    out = tmp_path / "b"
    args = ["export", "--target", "onnx", "--precision", "int8", "--checkpoint", str(micro_ckpt)]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speed" in text and "0.97x fp32" in text
    assert "on this CPU (a test CPU) the int8 decoder runs 0.97x its fp32 graph" in text
    assert "no faster than fp32 here" in text
