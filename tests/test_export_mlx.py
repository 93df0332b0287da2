"""`edgetalk export --target mlx`: the MLX port matches torch, parity gates pass at every precision,
int8 is really 8-bit, and the bundle runs through the scheduler on the mlx backend."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .conftest import need  # noqa: E402

mx = need("mlx.core", "mlx is not importable: pip install 'edgetalk[mlx]' (mlx[cpu] on Linux)")

from edgetalk.converters import mlx as conv  # noqa: E402
from edgetalk.converters.target import targets  # noqa: E402
from edgetalk.export.pipeline import export_bundle  # noqa: E402
from edgetalk.models.checkpoint import save_checkpoint  # noqa: E402
from edgetalk.models.decoder import base_grid  # noqa: E402
from edgetalk.models.edgetalk import MODULES  # noqa: E402
from edgetalk.models.io_spec import module_io  # noqa: E402
from edgetalk.runtime.bundle import open_bundle  # noqa: E402
from edgetalk.runtime.loader import open_backend  # noqa: E402
from edgetalk.runtime.mlx import decoder as mlx_decoder  # noqa: E402
from edgetalk.runtime.mlx import layers as L  # noqa: E402
from edgetalk.runtime.scheduler import StreamScheduler  # noqa: E402

from .conftest import MICRO, seeded_model, speechlike  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


@pytest.fixture(scope="module")
def one_torch_thread():
    # Two busy cores: torch's second thread only spins (a micro export takes 4 s, not 40 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bundles(one_torch_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx")
    ck = root / "micro.safetensors"
    save_checkpoint(seeded_model(MICRO, seed=2), ck)
    return {
        p: export_bundle("mlx", p, checkpoint=ck, out=root / p, progress=False, e2e_frames=40)
        for p in PRECISIONS
    }


# ---- ops against torch ---------------------------------------------------------------------------
def _nhwc(t: torch.Tensor) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).contiguous().numpy())


@pytest.mark.parametrize("batch", [1, 3])
def test_grid_sample_matches_torch(batch):
    g = torch.Generator().manual_seed(batch)
    inp = torch.rand(batch, 5, 7, 9, generator=g)
    grid = torch.rand(3, 11, 6, 2, generator=g) * 2.6 - 1.3  # reaches past the border
    grid[0, 0, :4] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0], [-1 / 9, 1 / 5]])
    ref = F.grid_sample(
        inp.expand(3, -1, -1, -1),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    got = np.array(L.grid_sample(_nhwc(inp), mx.array(grid.numpy())))
    assert got.shape == (3, 11, 6, 5)
    assert np.abs(got - ref.permute(0, 2, 3, 1).numpy()).max() < 1e-5


@pytest.mark.parametrize("size", [(4, 4, 16, 16), (8, 8, 16, 16), (5, 7, 13, 19), (6, 6, 6, 6)])
def test_interpolate_matches_torch(size):
    h, w, oh, ow = size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    ref = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
    got = np.array(L.interpolate_bilinear(_nhwc(x), (oh, ow)))
    assert np.abs(got - ref.permute(0, 2, 3, 1).numpy()).max() < 1e-5


def test_pixel_shuffle_and_quantized_conv():
    x = torch.randn(2, 12, 5, 6)
    ref = F.pixel_shuffle(x, 2).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.array(L.pixel_shuffle(_nhwc(x), 2)), ref)
    # A conv whose reduction (3*3*5 = 45) is not a multiple of the group: zero-padded, still 8-bit.
    c = L.Conv2d(5, 7, 3, stride=2, padding=1)
    q = c.to_quantized(group_size=32, bits=8)
    assert q.weight.dtype == mx.uint32 and q.k_pad == 64
    xin = mx.random.normal((2, 9, 8, 5), key=mx.random.key(0))
    a, b = np.array(c(xin)), np.array(q(xin))
    assert a.shape == b.shape == (2, 5, 4, 7)
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()


def test_base_grid_is_torchs_to_the_bit():
    for h, w in [(8, 8), (64, 64), (7, 13)]:
        assert np.array_equal(mlx_decoder.base_grid(h, w), base_grid(h, w).numpy())


def test_mlx_runtime_imports_without_torch():
    # The MLX backend and its port are torch-free to import (issue 17); torch is a converter's.
    mods = ["edgetalk.runtime.backend_mlx"] + [
        f"edgetalk.runtime.mlx.{m}"
        for m in ("layers", "rope", "appearance", "audio_encoder", "generator", "decoder", "loader")
    ]
    code = (
        f"import sys, {', '.join(mods)}; print([m for m in sys.modules if m.startswith('torch')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_target_is_discovered():
    cls = targets()["mlx"]
    assert cls is conv.MlxTarget and cls.suffix == ".safetensors" and cls.parity_backend == "mlx"


# ---- the export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prec", PRECISIONS)
def test_bundle_passes_parity(bundles, prec):
    r = bundles[prec]
    assert r.ok, r.manifest["parity"]
    for name in MODULES:
        assert r.manifest["parity"][name]["status"] == "pass", (name, r.manifest["parity"][name])
    e2e = r.manifest["parity"]["end_to_end"]
    assert e2e["frames"] == 40 and e2e["status"] == "pass"
    assert e2e["psnr_db"] >= r.manifest["thresholds"]["e2e_psnr_db"]
    assert r.manifest["files"] == {m: f"{m}.safetensors" for m in MODULES}
    assert r.manifest["tool_versions"]["mlx"] == mx.__version__


def test_files_hold_the_precision(bundles):
    io = module_io(MICRO)
    for prec in PRECISIONS:
        for name in MODULES:
            arrays, meta = mx.load(
                str(bundles[prec].path / f"{name}.safetensors"), return_metadata=True
            )
            assert meta["precision"] == prec and meta["module"] == name
            assert json.loads(meta["io"]) == io[name].to_dict()
            kinds = {a.dtype for a in arrays.values()}
            if prec == "fp32":
                assert kinds == {mx.float32}
            elif prec == "fp16":
                assert mx.float16 in kinds and mx.uint32 not in kinds


def test_int8_is_really_8bit(bundles):
    r = bundles["int8"]
    for name in MODULES:
        arrays, meta = mx.load(str(r.path / f"{name}.safetensors"), return_metadata=True)
        info = r.manifest["modules"][name]["info"]
        assert meta["bits"] == "8" and info["bits"] == 8 and info["group_size"] == 32
        quantized = json.loads(meta["quantized_layers"])
        assert quantized and quantized == info["quantized_layers"]
        for layer in quantized:
            w = arrays[f"{layer}.weight"]
            assert w.dtype == mx.uint32  # four 8-bit weights per word
            assert f"{layer}.scales" in arrays and f"{layer}.biases" in arrays
            assert w.shape[-1] * 4 == arrays[f"{layer}.scales"].shape[-1] * 32
        assert "float_layers" in info
    dec = r.manifest["modules"]["decoder"]["info"]
    convs = {"app_in", "flow_out", "basis", "refine_in", "refine_up", "refine_out", "blocks.0"}
    assert convs <= set(dec["quantized_layers"])  # every decoder convolution is 8-bit
    assert set(dec["float_layers"]) == {"film", "affine"}  # Linear(16, .): 16 % 32 != 0


def test_int8_check_refuses_float_weights(bundles, tmp_path):
    src = bundles["fp32"].path / "decoder.safetensors"
    arrays, meta = mx.load(str(src), return_metadata=True)
    fake = tmp_path / "decoder.safetensors"
    mx.save_safetensors(
        str(fake),
        arrays,
        metadata=dict(meta, precision="int8", bits="8", group_size="32", quantized_layers="[]"),
    )
    with pytest.raises(RuntimeError, match="no 8-bit weights"):
        conv.MlxTarget().checks(fake, module_io(MICRO)["decoder"], "int8")


def test_bundle_runs_through_scheduler(bundles):
    for prec in ("fp16", "int8"):
        b = open_bundle(bundles[prec].path)
        assert b.target == "mlx" and b.precision == prec
        backend = open_backend(bundle=bundles[prec].path)
        assert backend.name == "mlx" and backend.precision == prec
        sched = StreamScheduler(backend, np.full((32, 32, 3), 128, np.uint8))
        frames = sched.push_audio(speechlike(0.5)) + sched.flush()
        assert len(frames) == 13 and frames[0].rgb.shape == (32, 32, 3)
        assert frames[0].rgb.dtype == np.uint8


def test_outputs_bound_by_name(bundles):
    backend = open_backend(bundle=bundles["fp32"].path)
    io = backend.io["generator"]
    rng = np.random.default_rng(0)
    feed = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in io.inputs}
    a = backend.run("generator", feed)
    b = backend.run("generator", dict(reversed(list(feed.items()))))
    assert list(a) == list(io.output_names)
    for k in a:
        assert np.array_equal(a[k], b[k]) and a[k].dtype == np.float32
        assert a[k].shape == next(t.shape for t in io.outputs if t.name == k)


def test_inputs_checked_against_the_contract(bundles):
    backend = open_backend(bundle=bundles["fp32"].path)
    io = backend.io["decoder"]
    feed = {t.name: np.zeros(t.shape, np.float32) for t in io.inputs}
    with pytest.raises(ValueError, match=r"decoder: missing input 'motion' \(it takes app_feat"):
        backend.run("decoder", {k: v for k, v in feed.items() if k != "motion"})
    bad = dict(feed, motion=np.zeros((1, 2, 3), np.float32))
    with pytest.raises(
        ValueError, match=r"input 'motion' is float32\[1, 2, 3\], the contract says"
    ):
        backend.run("decoder", bad)
    with pytest.raises(ValueError, match="input 'image' is <U1"):
        backend.run("decoder", dict(feed, image=np.full(io.inputs[1].shape, "a")))
    # float64 is a real number: cast, as before
    a = backend.run("decoder", feed)["frames"]
    b = backend.run("decoder", {k: v.astype(np.float64) for k, v in feed.items()})["frames"]
    assert np.array_equal(a, b)


def test_bundle_runs_without_torch(bundles):
    # torch made unimportable in the process: loading (the audio front end comes from the file,
    # not from models/) and streaming need no torch.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from edgetalk.runtime.backend_mlx import MlxBackend\n"
        "from edgetalk.runtime.bundle import open_bundle\n"
        "from edgetalk.runtime.scheduler import StreamScheduler\n"
        f"b = MlxBackend.from_bundle(open_bundle({str(bundles['int8'].path)!r}))\n"
        "s = StreamScheduler(b, np.full((32, 32, 3), 128, np.uint8))\n"
        "t = np.linspace(0, 60, 8000, dtype=np.float32)\n"
        "print(len(s.push_audio(0.3 * np.sin(t)) + s.flush()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "13"


def test_audio_constants_from_the_file(bundles, tmp_path):
    from edgetalk.runtime.mlx.loader import load

    src = bundles["fp32"].path / "audio.safetensors"
    arrays, meta = mx.load(str(src), return_metadata=True)
    assert {"_dft", "_melfb"} <= set(arrays) and meta["format_version"] == "2"
    feed = {t.name: mx.ones(t.shape) * 0.1 for t in module_io(MICRO)["audio"].inputs}
    want = np.array(load(src)[0](**feed)["audio_tokens"])
    # A version 1 file (before the constants were stored) rebuilds them with torch: same output.
    old = tmp_path / "audio.safetensors"
    weights = {k: v for k, v in arrays.items() if not k.startswith("_")}
    mx.save_safetensors(str(old), weights, metadata=dict(meta, format_version="1"))
    assert np.array_equal(np.array(load(old)[0](**feed)["audio_tokens"]), want)
    # The constants are checked like the weights.
    bad = dict(arrays, _melfb=mx.zeros((3, 3)))
    mx.save_safetensors(str(old), bad, metadata=meta)
    with pytest.raises(ValueError, match=r"constant _melfb is mlx.core.float32\[3, 3\], expected"):
        load(old)
    mx.save_safetensors(str(old), dict(arrays, _extra=mx.zeros((1,))), metadata=meta)
    with pytest.raises(ValueError, match="unexpected constants"):
        load(old)


def test_cache_stays_mlx_and_compiled_equals_eager(bundles):
    """The scheduler's cache is the backend's: K/V are MLX arrays across chunks (no numpy round
    trip of the whole cache per call), and mx.compile changes nothing in the frames."""
    from edgetalk.runtime.backend_mlx import MlxBackend
    from edgetalk.runtime.cache import KVCache

    b = open_bundle(bundles["fp32"].path)
    avatar = np.full((32, 32, 3), 128, np.uint8)
    pcm = speechlike(1.2)

    def stream(backend):
        sched = StreamScheduler(backend, avatar, seed=4)
        frames = []
        for i in range(0, pcm.shape[0], 2000):
            frames += sched.push_audio(pcm[i : i + 2000])
        frames += sched.flush()
        return sched, np.stack([f.rgb for f in frames]).astype(np.int16)

    compiled = MlxBackend(b)
    sched, got = stream(compiled)
    assert isinstance(sched.cache.k, mx.array) and isinstance(sched.cache.v, mx.array)
    assert compiled.compiled and sched.cache.valid.sum() > 0
    eager = MlxBackend(b, compile=False)
    eager._cache = lambda: KVCache(eager.cfg)  # the numpy cache
    sched_np, ref = stream(eager)
    assert isinstance(sched_np.cache.k, np.ndarray)
    assert np.abs(got - ref).max() <= 1  # the same model; fused kernels may round differently
    np.testing.assert_allclose(np.array(sched.cache.k), sched_np.cache.k, atol=1e-4)


@pytest.mark.parametrize("compile", [True, False])
def test_the_reference_made_once_per_avatar_gives_the_same_motion(bundles, compile):
    """prepare_photo(..., "generator") makes the reference token's keys and values once, as MLX
    arrays; a generator call given them returns what a call making them itself returns, and the
    scheduler hands them to every call of its stream."""
    from edgetalk.runtime.backend_mlx import REFERENCE, MlxBackend

    backend = MlxBackend(open_bundle(bundles["fp32"].path), compile=compile)
    rng = np.random.default_rng(11)
    feed = {
        t.name: rng.standard_normal(t.shape).astype(np.float32)
        for t in backend.io["generator"].inputs
    }
    prepared = backend.prepare_photo({"ref_motion": feed["ref_motion"]}, "generator")
    assert all(isinstance(prepared[k], mx.array) for k in REFERENCE)
    bare = backend.run("generator", feed)
    given = backend.run("generator", {**feed, **prepared})
    for name, value in bare.items():
        np.testing.assert_allclose(given[name], value, rtol=0, atol=1e-6)
    sched = StreamScheduler(backend, np.full((32, 32, 3), 100, np.uint8), seed=1)
    assert all(k in sched.reference for k in REFERENCE)


def test_converted_modules_are_timed_on_the_mlx_device(bundles):
    """MLX fp16/int8 files are timed against their fp32 file as the runtime calls them (compiled,
    on MLX's default device; export/speed.py); the fp32 bundle has nothing to compare with."""
    for prec in ("fp16", "int8"):
        for name, mod in bundles[prec].manifest["modules"].items():
            s = mod["info"]["speed"]
            assert s["device"].startswith("mlx ") and "threads" not in s, (prec, name, s)
            assert s["ms"] > 0 and s["vs_fp32"] == pytest.approx(s["fp32_ms"] / s["ms"], rel=0.01)
    assert all("speed" not in m["info"] for m in bundles["fp32"].manifest["modules"].values())
