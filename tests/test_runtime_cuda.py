"""NVIDIA backends: cuda (torch + CUDA graphs), onnxruntime-cuda (IOBinding, TensorRT/CUDA EPs),
tensorrt (engines from `edgetalk export --target tensorrt`), and `edgetalk doctor`.

Without a GPU: everything imports, the refusals are clear messages, and the device-buffer and
KV-residency logic runs on CPU tensors / CPU OrtValues with the same code. GPU tests skip with
the reason printed (pytest -ra)."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch

from edgetalk.cli import main
from edgetalk.converters.parity import THRESHOLDS, psnr
from edgetalk.errors import BackendUnavailable
from edgetalk.models.checkpoint import save_checkpoint
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.cache import KVCache
from edgetalk.runtime.loader import open_backend
from edgetalk.runtime.registry import lookup, registry
from edgetalk.runtime.scheduler import StreamScheduler
from edgetalk.runtime_cuda.backend_cuda import RESIDENT, CudaBackend, _HoistConstants
from edgetalk.runtime_cuda.backend_tensorrt import engine_io_problems, engine_mismatch
from edgetalk.runtime_cuda.device_cache import TorchDeviceKVCache
from edgetalk.runtime_cuda.gpu import torch_cuda_reason
from edgetalk.runtime_cuda.residency import TransferLog, WholeMirror

from .conftest import MICRO, need, seeded_model, speechlike

GPU_REASON = torch_cuda_reason()
needs_gpu = pytest.mark.skipif(bool(GPU_REASON), reason=f"needs a CUDA GPU: {GPU_REASON}")
CUDA_BACKENDS = ("cuda", "onnxruntime-cuda", "tensorrt")


# ---- helpers ------------------------------------------------------------------------------------
def render(backend, seconds=1.6, restart=True):
    """Frames of one stream (fed in pieces), then of a second stream after reset()."""
    avatar = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    sched = StreamScheduler(backend, avatar, seed=3)
    pcm = speechlike(seconds, seed=2)
    frames = []
    for i in range(0, pcm.shape[0], 1000):
        frames += sched.push_audio(pcm[i : i + 1000])
    frames += sched.flush()
    if restart:
        sched.reset()
        frames += sched.push_audio(pcm[:12800]) + sched.flush()
    return np.stack([f.rgb for f in frames]).astype(np.float32) / 255.0


def record_transfers(backend) -> list[tuple[str, dict]]:
    """Per backend.run call: (module, host<->device copies it made)."""
    calls, inner = [], backend.run

    def run(module, inputs):
        before = backend.transfers.snapshot()
        out = inner(module, inputs)
        calls.append((module, backend.transfers.since(before)))
        return out

    backend.run = run
    return calls


def kv_dims(cfg):
    g = cfg.generator
    return g.layers, g.heads, cfg.head_dim


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "micro.safetensors"
    save_checkpoint(seeded_model(MICRO, seed=2), path)
    return path


@pytest.fixture(scope="module")
def onnx_bundle(micro_ckpt, tmp_path_factory):
    need("onnxruntime", "the onnx extra is not installed")
    from edgetalk.export.pipeline import export_bundle
    from edgetalk.runtime.bundle import open_bundle

    out = tmp_path_factory.mktemp("b") / "onnx"
    r = export_bundle("onnx", "fp32", checkpoint=micro_ckpt, out=out, progress=False, e2e_frames=8)
    assert r.ok
    return open_bundle(out)


# ---- imports, discovery, doctor, refusals (any machine) -----------------------------------------
def test_everything_imports_and_is_discovered():
    for mod in (
        "gpu",
        "residency",
        "static_io",
        "backend_cuda",
        "backend_onnxruntime_cuda",
        "backend_tensorrt",
    ):
        importlib.import_module(f"edgetalk.runtime_cuda.{mod}")
    from edgetalk.converters.onnx import OnnxTarget
    from edgetalk.converters.target import targets

    trt = targets()["tensorrt"]
    assert issubclass(trt, OnnxTarget) and trt.convert is OnnxTarget.convert  # the same graphs
    assert (trt.suffix, trt.parity_backend) == (".engine", "tensorrt")
    reg = registry()
    assert trt.parity_backend in reg
    assert reg["cuda"].targets == ("torch",)
    assert reg["onnxruntime-cuda"].targets == ("onnx",)
    assert reg["tensorrt"].targets == ("tensorrt",)


def test_doctor_lists_every_backend_and_target(capsys):
    from edgetalk.converters.target import targets

    assert main(["doctor", "--full"]) == 0
    out = capsys.readouterr().out
    sections = {}
    for block in out.split("\n\n")[1:]:
        title, *rows = block.splitlines()
        sections[title] = {row.split()[0]: row.strip() for row in rows}
    assert set(sections["backends"]) == set(registry())
    assert set(sections["export targets"]) == set(targets())
    for name in CUDA_BACKENDS:
        ok, why = lookup(name)[1:]
        row = sections["backends"][name]
        assert row.split(None, 1)[1] == ("available" if ok else f"unavailable: {why}"), row
        print(row)
    assert (
        sections["export targets"]["tensorrt"]
        .split(None, 1)[1]
        .startswith(("available", "unavailable: "))
    )
    assert set(sections["versions"]) >= {
        "GPU",
        "torch",
        "onnxruntime",
        "tensorrt",
        "mlx",
        "coremltools",
    }


@pytest.mark.skipif(not GPU_REASON, reason="a CUDA GPU is present: the cuda backend is available")
def test_cuda_backend_refuses_clearly_without_gpu():
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' cannot run here: .*CUDA"):
        open_backend(backend="cuda")
    ok, why = CudaBackend.availability()
    assert not ok and why == GPU_REASON


def test_onnxruntime_cuda_refuses_clearly_when_unavailable(onnx_bundle):
    ok, why = lookup("onnxruntime-cuda")[1:]
    if ok:
        pytest.skip("onnxruntime-gpu and a GPU are present")
    with pytest.raises(BackendUnavailable, match="onnxruntime-cuda.*cannot run here"):
        open_backend(bundle=onnx_bundle.path, backend="onnxruntime-cuda")
    assert "CUDA" in why


def test_tensorrt_backend_and_adapter_refuse_clearly_when_unavailable(onnx_bundle):
    from edgetalk.converters.tensorrt import TensorRTTarget
    from edgetalk.export.pipeline import parity_backend
    from edgetalk.runtime_cuda.backend_tensorrt import TensorRTBackend

    ok, why = TensorRTBackend.availability()
    if ok:
        pytest.skip("tensorrt and a GPU are present")
    assert "tensorrt is not installed" in why or "no CUDA GPU" in why
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' cannot run here"):
        TensorRTBackend.from_bundle(onnx_bundle)
    # the pipeline records "not run: <why>"
    assert parity_backend(TensorRTTarget(), onnx_bundle) == why


def test_export_tensorrt_fails_clearly_here(tmp_path, capsys):
    from edgetalk.converters.tensorrt import TensorRTTarget

    ok, why = TensorRTTarget.availability()
    if ok:
        pytest.skip("tensorrt, onnx and a GPU are present: export can run")
    rc = main(
        ["export", "--target", "tensorrt", "--precision", "fp16", "--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("edgetalk export: error: cannot export tensorrt: ")
    assert why in err and "Traceback" not in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_engine_mismatch_names_both_machines():
    here = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert engine_mismatch("decoder", dict(here), here) == ""
    assert engine_mismatch("decoder", {}, here) == ""  # a draft bundle mid-export records nothing
    other = dict(here, gpu="NVIDIA A10", compute_capability="8.6")
    msg = engine_mismatch("decoder", other, here)
    assert "NVIDIA A10 (compute capability 8.6)" in msg and "NVIDIA H100" in msg
    assert "re-export" in msg
    assert "TensorRT 10.3.0" in engine_mismatch(
        "audio", dict(here, tensorrt="10.3.0"), dict(here, tensorrt="10.8.0")
    )


# ---- TensorRT glue against a stand-in of the tensorrt module (logic only) -----------------------
@pytest.fixture
def fake_trt(monkeypatch):
    enum = types.SimpleNamespace
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "0.0-fake"
    trt.float32, trt.float16, trt.int64 = "float32", "float16", "int64"
    trt.TensorIOMode = enum(INPUT="in", OUTPUT="out")
    trt.LayerType = enum(
        GRID_SAMPLE="LayerType.GRID_SAMPLE",
        SOFTMAX="LayerType.SOFTMAX",
        CONVOLUTION="LayerType.CONVOLUTION",
        UNARY="LayerType.UNARY",
    )
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def test_engine_io_problems_against_the_contract(fake_trt):
    from edgetalk.models.io_spec import module_io

    spec = module_io(MICRO)["decoder"]
    tensors = [(t.name, "in", t.shape, "float32") for t in spec.inputs]
    tensors += [(t.name, "out", t.shape, "float32") for t in spec.outputs]

    class Engine:
        def __init__(self, ts):
            self.ts = {n: rest for n, *rest in ts}
            self.num_io_tensors = len(ts)
            self.names = [t[0] for t in ts]

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, n):
            return self.ts[n][0]

        def get_tensor_shape(self, n):
            return self.ts[n][1]

        def get_tensor_dtype(self, n):
            return self.ts[n][2]

    assert engine_io_problems(Engine(tensors), spec) == []
    bad = [*tensors[:-1], ("frames", "out", (1, 2), "float16"), ("extra", "in", (1,), "float32")]
    problems = " ".join(engine_io_problems(Engine(bad[1:]), spec))
    assert "app_feat: missing" in problems and "extra: not in the contract" in problems
    assert "frames: output [1, 2] not float32" in problems


def test_fp32_pins_only_float_layers_of_the_listed_types(fake_trt):
    from edgetalk.converters.tensorrt import _pin_fp32

    class Tensor:
        def __init__(self, dtype):
            self.dtype, self.is_shape_tensor = dtype, False

    class Layer:
        def __init__(self, kind, name, dtype="float32"):
            self.type, self.name, self.precision = kind, name, None
            self.outs, self.num_outputs, self.set_to = [Tensor(dtype)], 1, {}

        def get_output(self, j):
            return self.outs[j]

        def set_output_type(self, j, dtype):
            self.set_to[j] = dtype

    lt = fake_trt.LayerType
    layers = [
        Layer(lt.GRID_SAMPLE, "warp"),
        Layer(lt.CONVOLUTION, "conv"),
        Layer(lt.SOFTMAX, "attn"),
        Layer(lt.UNARY, "shape_abs", dtype="int64"),
    ]
    net = types.SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    assert _pin_fp32(fake_trt, net) == ["GRID_SAMPLE:warp", "SOFTMAX:attn"]
    assert layers[0].precision == "float32" and layers[0].set_to == {0: "float32"}
    assert layers[1].precision is None and layers[3].precision is None


# ---- device caches and residency (CPU tensors) --------------------------------------------------
class _NoRunner:
    """A runner that never holds the written K/V on the device: the cache uploads them."""

    device = torch.device("cpu")

    def with_output(self, name, handed_out, use):
        return False


def test_device_cache_matches_the_numpy_cache_slot_for_slot():
    cfg = MICRO.with_streaming(chunk=2, window=3)
    log = TransferLog()
    host, dev = KVCache(cfg), TorchDeviceKVCache(cfg, _NoRunner(), log)
    rng = np.random.default_rng(0)
    shape = (*host.shape[:3], cfg.chunk, host.shape[4])
    for start in range(0, 2 * cfg.max_position, cfg.chunk):  # the ring wraps, RAPR shifts
        k, v = rng.standard_normal((2, *shape)).astype(np.float32)
        host.write(k, v, start)
        dev.write(k, v, start)
        for a, b in zip(host.positions(start), dev.positions(start), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(dev.k.numpy(), host.k)
        np.testing.assert_array_equal(dev.v.numpy(), host.v)
        np.testing.assert_array_equal(dev.valid, host.valid)
    # every write uploaded K and V; slot index lists only once per distinct ring position
    starts = range(0, 2 * cfg.max_position, cfg.chunk)
    distinct = {tuple(host.slot_for(s + i) for i in range(cfg.chunk)) for s in starts}
    assert len(distinct) == 4  # the sink's slots, then the ring's three phases (C=2, W=3)
    assert log.h2d == 2 * len(starts) + len(distinct)
    dev.reset()
    assert not dev.k.any() and not dev.valid.any()


def test_whole_mirror_uploads_only_when_the_content_changes():
    log = TransferLog()
    m = WholeMirror((1, 3, 4, 4), torch.device("cpu"), log)
    a = np.ones((1, 3, 4, 4), np.float32)
    assert m.sync(a) and log.h2d == 1
    assert not m.sync(a.copy()) and log.h2d == 1  # same content, another array: no copy
    a[0, 0, 0, 0] = 2.0  # the same array refilled (another avatar): copied
    assert m.sync(a) and log.h2d == 2
    np.testing.assert_array_equal(m.dev.numpy(), a)


def test_hoisted_constants_are_made_once():
    made = {}
    with _HoistConstants(made):
        a = torch.tensor([1.0, 0.0], device="cpu")
        b = torch.tensor([1.0, 0.0], device="cpu")
        c = torch.tensor([2.0], device="cpu")
    assert a is b and c is not a and len(made) == 2


# ---- the backends' device logic, run on CPU -----------------------------------------------------
def test_cuda_backend_logic_on_cpu_matches_torch_and_keeps_kv_resident():
    cfg = MICRO
    ref = render(TorchBackend(seeded_model(cfg)))
    be = CudaBackend(seeded_model(cfg), precision="fp32", device="cpu")
    calls = record_transfers(be)
    got = render(be)
    np.testing.assert_array_equal(got, ref)  # same kernels, same inputs: bit-exact

    # K/V never cross to the host and back: a generator call sends the packed small inputs only
    # (the cache is copied device to device), and returns its outputs once.
    packed = be.runners["generator"].inp.nbytes
    gen = [t for m, t in calls if m == "generator"]
    assert all((t["h2d"], t["d2h"], t["h2d_bytes"]) == (1, 1, packed) for t in gen)
    # Outside the calls, the cache's writes copied only slot index lists (int64), each distinct
    # ring position once; no K/V bytes.
    in_calls = sum(t["h2d_bytes"] for _, t in calls)
    cache_bytes = be.transfers.h2d_bytes - in_calls
    assert 0 < cache_bytes <= 8 * MICRO.chunk * (MICRO.cache_slots + 1)
    dec = [t for m, t in calls if m == "decoder"]
    # the first call uploads the per-avatar inputs (photo, app_feat, dec_*) and the motion
    first = len(RESIDENT["decoder"]) + 1
    assert dec[0]["h2d"] == first and all(t["h2d"] == 1 and t["d2h"] == 1 for t in dec[1:])


def test_cuda_backend_caches_are_per_stream():
    """Two streams sharing one backend (serve's sessions) each keep their own device cache."""
    model = seeded_model(MICRO)
    be = CudaBackend(model, precision="fp32", device="cpu")
    ref = render(TorchBackend(model), restart=False)
    avatar = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a, b = StreamScheduler(be, avatar, seed=3), StreamScheduler(be, avatar, seed=3)
    pcm = speechlike(1.6, seed=2)
    fa, fb = [], []
    for i in range(0, pcm.shape[0], 1000):  # interleaved: b's calls land between a's run/write
        fa += a.push_audio(pcm[i : i + 1000])
        fb += b.push_audio(pcm[i : i + 1000])
    fa, fb = fa + a.flush(), fb + b.flush()
    assert a.cache.k is not b.cache.k
    for frames in (fa, fb):
        got = np.stack([f.rgb for f in frames]).astype(np.float32) / 255.0
        np.testing.assert_array_equal(got, ref)


def test_cuda_backend_bf16_autocast_path_on_cpu():
    ref = render(TorchBackend(seeded_model(MICRO)), restart=False)
    be = CudaBackend(seeded_model(MICRO), precision="bf16", device="cpu")
    got = render(be, restart=False)
    assert psnr(ref, got) >= THRESHOLDS["int8"]["e2e_psnr_db"]  # bf16 keeps 8 mantissa bits
    assert "bf16" in be.describe()


def test_onnxruntime_cuda_logic_on_cpu_matches_onnxruntime(onnx_bundle):
    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend
    from edgetalk.runtime_cuda.backend_onnxruntime_cuda import KV, WHOLE, OnnxRuntimeCudaBackend

    ref = render(OnnxRuntimeBackend(onnx_bundle))
    be = OnnxRuntimeCudaBackend(onnx_bundle, device="cpu", providers=["CPUExecutionProvider"])
    assert be.graph_io["decoder"] is not be.io["decoder"]  # the one-frame decoder, per frame
    calls = record_transfers(be)
    got = render(be)
    np.testing.assert_array_equal(got, ref)

    cfg = onnx_bundle.cfg
    small = [t for t in onnx_bundle.io["generator"].inputs if t.name not in (*KV, *WHOLE)]
    small_bytes = sum(int(np.prod(t.shape)) * 4 for t in small)
    gen = [t for m, t in calls if m == "generator"]
    # The cache's OrtValues are bound as they are: a call uploads the small inputs only (the
    # first also the avatar's ref_motion, kept on the device after that).
    assert gen[0]["h2d"] == len(small) + 1
    assert all(t["h2d"] == len(small) and t["h2d_bytes"] == small_bytes for t in gen[1:])
    assert all(t["d2h"] == 3 for t in gen)
    # Outside the calls: each stream's zeroed cache and the slot index lists, no K/V rows.
    in_calls = sum(t["h2d_bytes"] for _, t in calls)
    k_cache = next(t for t in onnx_bundle.io["generator"].inputs if t.name == "k_cache")
    zeroing = 2 * 2 * int(np.prod(k_cache.shape)) * 4  # K and V, at open and at reset()
    index_bytes = be.transfers.h2d_bytes - in_calls - zeroing
    assert 0 < index_bytes <= 8 * cfg.chunk * (cfg.cache_slots + 1)


def test_trt_cache_dir_choice(onnx_bundle, monkeypatch, tmp_path):
    from edgetalk.runtime_cuda.backend_onnxruntime_cuda import trt_cache_dir

    monkeypatch.setenv("EDGETALK_TRT_CACHE", str(tmp_path / "c"))
    assert trt_cache_dir(onnx_bundle) == tmp_path / "c"
    monkeypatch.delenv("EDGETALK_TRT_CACHE")
    assert trt_cache_dir(onnx_bundle) == onnx_bundle.path / "trt_cache"


# ---- on a GPU -----------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_parity_100_frames_through_the_scheduler(precision):
    from edgetalk.export.pipeline import end_to_end

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    reference = TorchBackend.from_checkpoint()  # the shipped model, fp32 on the CPU
    candidate = CudaBackend.from_checkpoint(precision=precision)
    result = end_to_end(reference, candidate, "fp16", 100)
    print(f"cuda {precision}: {result}")
    assert result["frames"] == 100
    want = THRESHOLDS["fp16" if precision == "fp16" else "int8"]["e2e_psnr_db"]
    assert result["psnr_db"] >= want
    assert all(r.graph is not None for n, r in candidate.runners.items() if n != "appearance")


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_replay_equals_eager(precision):
    graphed = CudaBackend(seeded_model(MICRO), precision=precision, graphs=True)
    eager = CudaBackend(seeded_model(MICRO), precision=precision, graphs=False)
    a, b = render(graphed), render(eager)
    for name in ("audio", "generator", "decoder"):
        assert graphed.runners[name].graph is not None, graphed.runners[name].graph_error
        assert eager.runners[name].graph is None
    assert psnr(a, b) >= 60.0, psnr(a, b)  # the same kernels on the same inputs


@needs_gpu
def test_cuda_kv_cache_stays_on_the_device():
    be = CudaBackend(seeded_model(MICRO), precision="fp16")
    calls = record_transfers(be)
    render(be, restart=False)
    packed = be.runners["generator"].inp.nbytes
    gen = [t for m, t in calls if m == "generator"]
    for t in gen:  # the cache is copied device to device; only the small inputs go up
        assert (t["h2d"], t["d2h"], t["h2d_bytes"]) == (1, 1, packed)
    # One chunk = audio (1 in, 1 out) + generator (1 in, 1 out) + decoder (1 in, 1 out).
    chunks = [calls[i : i + 3] for i in range(1, len(calls), 3)]
    for chunk in chunks[1:]:
        assert [m for m, _ in chunk] == ["audio", "generator", "decoder"]
        assert sum(t["h2d"] + t["d2h"] for _, t in chunk) == 6


@needs_gpu
def test_onnxruntime_cuda_on_the_gpu(onnx_bundle):
    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend

    ok, why = lookup("onnxruntime-cuda")[1:]
    if not ok:
        pytest.skip(why)
    be = open_backend(bundle=onnx_bundle.path, backend="onnxruntime-cuda")
    calls = record_transfers(be)
    got = render(be)
    ref = render(OnnxRuntimeBackend(onnx_bundle))
    print(be.describe(), psnr(ref, got))
    assert psnr(ref, got) >= THRESHOLDS["fp32"]["e2e_psnr_db"]
    assert all(t["d2h"] == 3 for m, t in calls if m == "generator")


@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_export_run_and_refusal(precision, micro_ckpt, tmp_path):
    import json

    from edgetalk.converters.tensorrt import TensorRTTarget
    from edgetalk.export.pipeline import export_bundle

    ok, why = TensorRTTarget.availability()
    if not ok:
        pytest.skip(why)
    r = export_bundle(
        "tensorrt", precision, checkpoint=micro_ckpt, out=tmp_path / "b", progress=False
    )
    assert r.ok, r.manifest["parity"]
    info = r.manifest["modules"]["decoder"]["info"]
    assert info["gpu"] == torch.cuda.get_device_name() and info["tensorrt"]
    assert info["fp32_grid_sample_layers"] >= 1
    if precision == "int8":
        assert r.manifest["modules"]["generator"]["info"]["int8_layers"] > 0
    be = open_backend(bundle=r.path)
    assert be.name == "tensorrt"
    render(be, restart=False)
    mf = r.path / "manifest.json"
    m = json.loads(mf.read_text())
    m["modules"]["generator"]["info"]["compute_capability"] = "1.0"
    mf.write_text(json.dumps(m))
    with pytest.raises(BackendUnavailable, match="compute capability 1.0"):
        open_backend(bundle=r.path)
