"""A chunk-1 frame in row bands (models/decoder.DecoderRows): each band's rows equal the whole
frame's, the ONNX export writes and gates one graph per band, and the CPU backend with two threads
renders a frame's bands side by side (converters/onnx.py, BAND_PARTS)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from edgetalk.models.decoder import DecoderRows
from edgetalk.models.io_spec import DECODER_BANDS, band_index, band_part, band_span

from .conftest import MICRO, seeded_model, speechlike


def banded(resolution: int, flow_blocks: int):
    render = dataclasses.replace(MICRO.render, resolution=resolution, flow_blocks=flow_blocks)
    return dataclasses.replace(MICRO, chunk=1, render=render)


def decoder_inputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    res = cfg.render.resolution
    image = torch.randint(0, 256, (1, 3, res, res), generator=g).float() / 255.0
    with torch.no_grad():
        photo = model.module("appearance")(image=image)
    motion = torch.randn(1, 1, cfg.motion_dim, generator=g) * 0.4
    return {n: photo[n] for n in ("app_feat", "dec_proj", "dec_basis", "dec_lips")} | {
        "image": image,
        "motion": motion,
    }


@pytest.mark.parametrize(("resolution", "flow_blocks"), [(64, 1), (128, 3), (96, 4)])
@pytest.mark.parametrize("bands", [2, 3])
def test_bands_render_exactly_the_whole_frames_rows(resolution, flow_blocks, bands):
    """The halo (band_rows) covers every convolution's reach: the bands, stacked, are the whole
    frame to the bit, and a halo one row shorter is not (so the test can see a short one)."""
    model = seeded_model(banded(resolution, flow_blocks), seed=4)
    dec = model.decoder
    dec.native_sampling = False  # the gather form, as the ONNX export traces it
    feed = decoder_inputs(model)
    with torch.no_grad():
        whole = dec(**feed)["frames"]
        parts = [
            DecoderRows(dec, *band_span(resolution, k, bands))(**feed)["frames"]
            for k in range(bands)
        ]
        assert [p.shape[1] for p in parts] == [
            band_span(resolution, k, bands)[1] - band_span(resolution, k, bands)[0]
            for k in range(bands)
        ]
        torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=0)

        if bands != 2:
            return  # a cut off the 1/4-resolution grid leaves the halo a row of slack
        real = dec.band_rows

        def shorter(r0, r1):  # one row less of halo at each cut (not at the frame's edges)
            lo, hi = real(r0, r1)
            return lo + (lo > 0), hi - (hi < dec.feat)

        dec.band_rows = shorter
        try:
            short = [
                DecoderRows(dec, *band_span(resolution, k, bands))(**feed)["frames"]
                for k in range(bands)
            ]
        finally:
            dec.band_rows = real
        assert (torch.cat(short, 1) - whole).abs().max() > 0


def test_bands_of_the_shipped_decoder_are_its_frame():
    from edgetalk.models.checkpoint import default_checkpoint, load_checkpoint

    model, _ = load_checkpoint(default_checkpoint())
    model.decoder.native_sampling = False
    feed = decoder_inputs(model, seed=1)
    res = model.cfg.render.resolution
    threads = torch.get_num_threads()
    try:
        # at one thread too: oneDNN picks some kernels' algorithms by the input's height there
        # (RowsConv2d keeps its 3x3 kernel in eager PyTorch for this)
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                whole = model.decoder(**feed)["frames"]
                parts = [
                    DecoderRows(model.decoder, *band_span(res, k))(**feed)["frames"]
                    for k in range(DECODER_BANDS)
                ]
            torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    # each band really is a cut: fewer 1/4-resolution rows than the frame's
    lo, hi = model.decoder.band_rows(0, res // 2)
    assert lo == 0 and hi < model.decoder.feat


def test_band_names_round_trip_and_refuse_others():
    assert [band_index(band_part(k)) for k in range(3)] == [0, 1, 2]
    for bad in ("decoder", "decoder_band", "decoder_bandx", "audio_band0"):
        with pytest.raises(ValueError):
            band_index(bad)


# ---- the ONNX export and the CPU backend ----------------------------------------------------

onnx_only = pytest.mark.usefixtures("onnxruntime_installed")


@pytest.fixture(scope="module")
def onnxruntime_installed():
    from .conftest import need

    need("onnxruntime", "the onnx extra is not installed")


@pytest.fixture(scope="module")
def band_bundle(tmp_path_factory, onnxruntime_installed):
    from edgetalk.export.pipeline import export_bundle
    from edgetalk.models.checkpoint import save_checkpoint

    cfg = banded(64, 1)
    root = tmp_path_factory.mktemp("bands")
    ck = root / "banded.safetensors"
    save_checkpoint(seeded_model(cfg, seed=6), ck)
    out = {}
    for prec in ("fp32", "int8"):
        out[prec] = export_bundle("onnx", prec, checkpoint=ck, out=root / prec, progress=False)
    out["c2"] = export_bundle(
        "onnx", "fp32", checkpoint=ck, chunk=2, out=root / "c2", progress=False
    )
    return out


@onnx_only
@pytest.mark.parametrize("prec", ["fp32", "int8"])
def test_chunk_1_export_gates_each_band(band_bundle, prec):
    r = band_bundle[prec]
    assert r.ok, r.manifest["parity"]
    for k in range(DECODER_BANDS):
        part = band_part(k)
        assert r.manifest["files"][part] == f"{part}.onnx"
        assert (r.path / f"{part}.onnx").is_file()
        par = r.manifest["parity"][part]
        assert par["status"] == "pass" and "psnr_db" in par["outputs"]["frames"], par
        mod = r.manifest["modules"][part]
        r0, r1 = band_span(64, k)
        assert mod["info"]["rows"] == [r0, r1]
        assert mod["io"]["outputs"][0]["shape"] == [1, r1 - r0, 64, 3]
        if prec == "int8":
            assert mod["info"]["weights"] == "int8"


@onnx_only
def test_longer_chunks_have_no_bands(band_bundle):
    files = band_bundle["c2"].manifest["files"]
    assert not [f for f in files if f.startswith("decoder_band")]


@onnx_only
@pytest.mark.parametrize("prec", ["fp32", "int8"])
def test_two_threads_render_a_frame_in_bands(band_bundle, prec):
    """Two threads: the bands on one-thread sessions, side by side, and the whole-frame graph is
    not loaded; the stream's frames are those of one thread (the whole frame's graph)."""
    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend
    from edgetalk.runtime.bundle import open_bundle

    one = OnnxRuntimeBackend(open_bundle(band_bundle[prec].path), threads=1)
    two = OnnxRuntimeBackend(open_bundle(band_bundle[prec].path), threads=2)
    assert one.band_pool is None and not one.band_sessions and "decoder" in one.sessions
    assert two.band_pool is not None and "decoder" not in two.sessions
    assert sorted(two.band_sessions) == [band_part(k) for k in range(DECODER_BANDS)]
    assert all(
        s.get_session_options().intra_op_num_threads == 1 for s in two.band_sessions.values()
    )
    assert "row bands" in two.describe() and "row bands" not in one.describe()
    a, b = render_stream(one), render_stream(two)
    assert a.shape == b.shape and a.shape[0] > 10
    if prec == "fp32":
        np.testing.assert_allclose(a, b, atol=2 / 255)
    else:  # each band is quantized on its own calibration
        mse = float(np.mean((a - b) ** 2))
        assert 10 * np.log10(1.0 / max(mse, 1e-12)) > 30.0


def render_stream(backend) -> np.ndarray:
    from edgetalk.runtime.scheduler import StreamScheduler

    res = backend.cfg.render.resolution
    rng = np.random.default_rng(0)
    avatar = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    sched = StreamScheduler(backend, avatar, seed=1)
    frames = sched.push_audio(speechlike(0.6)) + sched.flush()
    return np.stack([f.rgb for f in frames]).astype(np.float32) / 255.0


@onnx_only
def test_a_band_graph_of_other_shapes_is_refused(band_bundle, tmp_path, monkeypatch):
    import shutil

    from edgetalk.errors import BundleError
    from edgetalk.runtime import composite
    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend
    from edgetalk.runtime.bundle import open_bundle, tree_sha256

    from .conftest import exported_before

    # band 0's file holds the whole-frame graph, re-hashed: a frame where a band should be; in
    # a bundle exported before the stored parts, and in its stored per-call part and head
    old = exported_before(band_bundle["fp32"].path, tmp_path / "old")
    new = shutil.copytree(band_bundle["fp32"].path, tmp_path / "new")
    for copy, graphs in ((old, [""]), (new, [".stream", ".head"])):
        mf = json.loads((copy / "manifest.json").read_text())
        for graph in graphs:
            shutil.copy2(copy / f"decoder{graph}.onnx", copy / f"{band_part(0)}{graph}.onnx")
        if ".head" in graphs:  # the whole frame's head, under band 0's name
            cuts = mf[composite.COMPOSITES]
            cuts[band_part(0)] = {**cuts["decoder"], "head": f"{band_part(0)}.head.onnx"}
        mf["sha256"] = {f: tree_sha256(copy / f) for f in mf["files"].values()}
        (copy / "manifest.json").write_text(json.dumps(mf))
        for fused in ("1", "0"):  # the head read, or the per-call part
            monkeypatch.setenv(composite.ENV_SWITCH, fused)
            with pytest.raises(BundleError, match="decoder_band0"):
                OnnxRuntimeBackend(open_bundle(copy), threads=2)
            # one thread never reads the bands
            OnnxRuntimeBackend(open_bundle(copy), threads=1)


@onnx_only
def test_a_chunk_1_bundle_without_bands_still_runs_on_two_threads(band_bundle, tmp_path):
    """Bundles exported before bands: two threads render the whole frame, as then."""

    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend
    from edgetalk.runtime.bundle import open_bundle

    from .conftest import exported_before

    copy = exported_before(band_bundle["fp32"].path, tmp_path / "old")  # before stored parts too
    mf = json.loads((copy / "manifest.json").read_text())
    for k in range(DECODER_BANDS):
        part = band_part(k)
        del mf["files"][part], mf["sha256"][f"{part}.onnx"], mf["modules"][part]
        del mf["parity"][part]
        (copy / f"{part}.onnx").unlink()
    (copy / "manifest.json").write_text(json.dumps(mf))
    two = OnnxRuntimeBackend(open_bundle(copy), threads=2)
    assert two.band_pool is None and "decoder" in two.sessions
    np.testing.assert_allclose(
        render_stream(two),
        render_stream(OnnxRuntimeBackend(open_bundle(band_bundle["fp32"].path), threads=2)),
        atol=2 / 255,
    )


@onnx_only
def test_side_by_side_runs_the_first_item_on_the_caller_and_waits_for_all():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from edgetalk.runtime.backend_onnxruntime import side_by_side

    seen, done = {}, []

    def work(item):
        seen[item] = threading.current_thread().name
        time.sleep(0.02 * (item == 2))
        done.append(item)

    with ThreadPoolExecutor(2, thread_name_prefix="pool") as pool:
        side_by_side(pool, work, [0, 1, 2])
        assert sorted(done) == [0, 1, 2]
        assert seen[0] == threading.current_thread().name
        assert seen[1].startswith("pool") and seen[2].startswith("pool")

        def failing(item):
            if item == 0:
                raise ValueError("the caller's share")
            work(item)

        done.clear()
        with pytest.raises(ValueError, match="caller's share"):
            side_by_side(pool, failing, [0, 1, 2])
        assert sorted(done) == [1, 2]  # the others had finished before it raised
