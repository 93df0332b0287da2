"""The shipped weights exported exactly as a user exports them (`edgetalk export` defaults): ONNX
fp16 and INT8 at chunk 4 and 1, MLX INT8. Every gate passes at the README's thresholds, each bundle
streams through the scheduler, the precision is real, and when an onnxruntime upgrade moves INT8
results, the failure names the module that moved.

The small seeded test model hides errors in the motion path (10% motion noise costs it 40 dB of
stream PSNR less than it costs the shipped model), so this is the test that guards what ships."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetalk.converters.parity import THRESHOLDS
from edgetalk.models.edgetalk import MODULES
from edgetalk.runtime.composite import COMPOSITES, head_role
from edgetalk.runtime.photo_split import SPLITS, part_roles

from .conftest import need

need("onnxruntime", "the onnx extra is not installed")
# A test's first use of an export pays for it (1-3 minutes on 2 cores).
pytestmark = pytest.mark.timeout(900)

# The README's table ("Exporting"), written out here so neither side can drift alone.
README_THRESHOLDS = {
    "fp32": {"psnr_db": 50.0, "cosine": 0.9999, "e2e_psnr_db": 45.0},
    "fp16": {"psnr_db": 40.0, "cosine": 0.999, "e2e_psnr_db": 35.0},
    "int8": {"psnr_db": 30.0, "cosine": 0.99, "e2e_psnr_db": 28.0},
}
EXPORTS = [("onnx", "fp16", 4), ("onnx", "int8", 4), ("onnx", "int8", 1), ("mlx", "int8", 4)]
BASELINE = Path(__file__).parent / "data" / "int8_parity_shipped.json"
# How far a gated INT8 figure may move before the test says which module moved. Same versions give
# the same figures up to thread-count rounding, far inside these.
COS_TOLERANCE = 0.002
PSNR_TOLERANCE_DB = 1.0


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Lazily export (target, precision, chunk) once per module run."""
    from edgetalk.export.pipeline import export_bundle

    root = tmp_path_factory.mktemp("shipped")
    done = {}

    def get(target, precision, chunk):
        key = (target, precision, chunk)
        if key not in done:
            if target == "mlx":
                need("mlx.core", "mlx is not importable (the mlx extra)")
            out = root / f"{target}-{precision}-c{chunk}"
            done[key] = export_bundle(target, precision, chunk=chunk, out=out, progress=False)
        return done[key]

    return get


def test_thresholds_are_the_readmes():
    assert THRESHOLDS == README_THRESHOLDS
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "frames PSNR ≥ 50 / 40 / 30 dB" in readme
    assert "cosine ≥ 0.9999 / 0.999 / 0.99" in readme
    assert "stream PSNR ≥ 45 / 35 / 28 dB" in readme


@pytest.mark.parametrize(("target", "precision", "chunk"), EXPORTS)
def test_shipped_export_passes_every_gate(shipped, target, precision, chunk):
    r = shipped(target, precision, chunk)
    th = README_THRESHOLDS[precision]
    assert r.manifest["thresholds"] == th
    assert r.manifest["checkpoint"]["trained"], "the default export must use the trained weights"
    # every graph: the four modules, and a chunk-1 ONNX bundle's decoder row bands
    graphs = [name for name in r.manifest["parity"] if name != "end_to_end"]
    # and an ONNX bundle's stored parts of each graph that splits (runtime/photo_split.py), and
    # each decoder graph's head (runtime/composite.py)
    stored = {role for part in r.manifest.get(SPLITS, {}) for role in part_roles(part)}
    stored |= {head_role(part) for part in r.manifest.get(COMPOSITES, {})}
    assert set(MODULES) <= set(graphs) and set(graphs) == set(r.manifest["files"]) - stored
    if target == "onnx":
        assert set(r.manifest[SPLITS]) == {"decoder", "generator"} | ({*graphs} - set(MODULES))
        # every decoder graph runs its composite fused, but an fp16 one (its blend is float16)
        decoders = set(r.manifest[SPLITS]) - {"generator"}
        assert set(r.manifest[COMPOSITES]) == (set() if precision == "fp16" else decoders)
    if target == "onnx" and chunk == 1:
        assert {"decoder_band0", "decoder_band1"} <= set(graphs)
    for name in graphs:
        par = r.manifest["parity"][name]
        assert par["status"] == "pass", (name, par)
        for out, entry in par["outputs"].items():
            if entry.get("gated", True):
                if "psnr_db" in entry:
                    assert entry["psnr_db"] >= th["psnr_db"], (name, out, entry)
                else:
                    assert entry["cosine"] >= th["cosine"], (name, out, entry)
    e2e = r.manifest["parity"]["end_to_end"]
    assert e2e["frames"] == 100 and e2e["psnr_db"] >= th["e2e_psnr_db"], e2e
    assert r.ok and r.path.exists()
    if target == "onnx" and precision != "fp32":
        # whether the precision pays on this CPU is measured, never assumed (export/speed.py)
        speed = r.manifest["modules"]["decoder"]["info"]["speed"]
        assert speed["ms"] > 0 and speed["fp32_ms"] > 0, speed
        print(f"shipped {precision} decoder at chunk {chunk}: {speed['vs_fp32']:.2f}x fp32 here")


@pytest.mark.parametrize(("target", "precision", "chunk"), EXPORTS)
def test_shipped_bundle_streams_through_the_scheduler(shipped, target, precision, chunk):
    from edgetalk.runtime import composite
    from edgetalk.runtime.audio_io import default_speech, read_audio
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.runtime.loader import open_backend
    from edgetalk.runtime.scheduler import StreamScheduler

    backend = open_backend(bundle=shipped(target, precision, chunk).path)
    assert backend.precision == precision and backend.cfg.chunk == chunk
    if target == "onnx" and precision != "fp16" and composite.available():
        assert "composite fused" in backend.describe()  # what ships runs fused
    avatar = prepare_avatar(None, backend.cfg.render.resolution)
    pcm = read_audio(default_speech()).pcm[8000 : 8000 + 16000]  # one second of speech
    sched = StreamScheduler(backend, avatar, seed=3)
    frames = sched.push_audio(pcm) + sched.flush()
    assert len(frames) == 25 and frames[0].rgb.shape == avatar.shape
    video = np.stack([f.rgb for f in frames]).astype(np.float32)
    assert np.abs(np.diff(video, axis=0)).mean() > 0.05  # the face moves


def test_shipped_chunk_1_bands_on_two_threads_render_the_stream(shipped):
    """The shipped INT8 chunk-1 bundle at two threads renders each frame in its two row bands,
    side by side; the stream is the one thread's (whole-frame graph) to within INT8's gate."""
    from edgetalk.converters.parity import psnr
    from edgetalk.runtime.audio_io import default_speech, read_audio
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.runtime.backend_onnxruntime import OnnxRuntimeBackend
    from edgetalk.runtime.bundle import open_bundle
    from edgetalk.runtime.scheduler import StreamScheduler

    path = shipped("onnx", "int8", 1).path
    pcm = read_audio(default_speech()).pcm[8000 : 8000 + 16000]
    videos = []
    for threads in (1, 2):
        backend = OnnxRuntimeBackend(open_bundle(path), threads=threads)
        assert (backend.band_pool is not None) == (threads == 2)
        avatar = prepare_avatar(None, backend.cfg.render.resolution)
        sched = StreamScheduler(backend, avatar, seed=3)
        frames = sched.push_audio(pcm) + sched.flush()
        videos.append(np.stack([f.rgb for f in frames]).astype(np.float32) / 255.0)
    assert videos[0].shape == videos[1].shape
    assert psnr(videos[0], videos[1]) >= README_THRESHOLDS["int8"]["psnr_db"]


def test_onnx_int8_is_8bit_where_the_policy_says(shipped):
    from edgetalk.converters.onnx import INT8_MODULES, int8_report

    r = shipped("onnx", "int8", 4)
    assert set(INT8_MODULES) == {"decoder"}  # the README documents this policy
    for name in MODULES:
        info = r.manifest["modules"][name]["info"]
        rep = int8_report(r.path / f"{name}.onnx")
        if name not in INT8_MODULES:
            assert info["weights"] == "fp32" and "policy" in info["why"]
            assert rep["int8_weight_tensors"] == 0
            continue
        assert info["weights"] == "int8" and rep["int8_weight_tensors"] > 0
        unexplained = [n for n, why in rep["float_reasons"].items() if why == "unexplained"]
        assert not unexplained, f"{name}: float compute nodes outside the policy: {unexplained}"
        share = rep["int8_weight_share"]
        assert share >= 0.7, f"{name}: only {share:.0%} of the compute weights are 8-bit"
    # the flow blocks' residual sums between 8-bit convolutions stay 8-bit (residual_adds): all
    # but the last block's, which feeds the float flow head
    blocks = r.manifest["config"]["render"]["flow_blocks"]
    assert len(int8_report(r.path / "decoder.onnx")["quantized_adds"]) == blocks - 1


def test_onnx_decoder_tail_runs_in_bands_from_one_photo_table(shipped):
    """The shipped decoder's per-pixel tail runs in row bands (models/decoder.py, tail_bands),
    every band gathering from the one neighbour table of the photo that the avatar part makes:
    a table per band would be a copy per band among the frame part's inputs."""
    import onnx

    from edgetalk.models.decoder import tail_bands

    r = shipped("onnx", "int8", 4)
    res = r.manifest["config"]["render"]["resolution"]
    assert len(tail_bands(0, res, res)) == 2
    derived = r.manifest[SPLITS]["decoder"]["derived"]
    (table,) = [n for n in derived if "/sampler/" in n]
    graph = onnx.load(str(r.path / r.manifest[SPLITS]["decoder"]["stream"])).graph
    taps = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == table]
    assert len(taps) == len(tail_bands(0, res, res))


def test_onnx_fp16_weights_are_fp16(shipped):
    from .test_export_onnx import fp16_weight_share

    r = shipped("onnx", "fp16", 4)
    for name in MODULES:
        assert fp16_weight_share(r.path / f"{name}.onnx") >= 0.9, name


@pytest.mark.parametrize("chunk", [4, 1])
def test_int8_parity_has_not_moved(shipped, chunk):
    """Per module, the gated INT8 figures match the ones recorded with the pinned versions in
    constraints.txt. After an upgrade this names the module (and output) that moved."""
    import onnxruntime

    r = shipped("onnx", "int8", chunk)
    recorded = json.loads(BASELINE.read_text())
    base = recorded[f"c{chunk}"]
    was = f"onnxruntime {recorded['tool_versions']['onnxruntime']}"
    now = f"onnxruntime {onnxruntime.__version__}"
    moved = []
    for name in MODULES:
        for out, ref in base[name].items():
            got = r.manifest["parity"][name]["outputs"][out]
            metric, tol = (
                ("psnr_db", PSNR_TOLERANCE_DB) if "psnr_db" in ref else ("cosine", COS_TOLERANCE)
            )
            if abs(got[metric] - ref[metric]) > tol:
                moved.append(
                    f"{name}.{out} {metric} {ref[metric]} ({was}) -> {got[metric]} ({now})"
                )
    e2e = r.manifest["parity"]["end_to_end"]["psnr_db"]
    if abs(e2e - base["end_to_end"]) > PSNR_TOLERANCE_DB:
        moved.append(f"end-to-end PSNR {base['end_to_end']} ({was}) -> {e2e} ({now})")
    assert not moved, "INT8 parity moved: " + "; ".join(moved)


def record_baseline(manifests: dict) -> dict:
    """The JSON this test reads, from INT8 bundle manifests {chunk: manifest}."""
    import onnxruntime

    doc: dict = {"tool_versions": {"onnxruntime": onnxruntime.__version__}}
    for chunk, mf in manifests.items():
        par = mf["parity"]
        doc[f"c{chunk}"] = {
            name: {
                out: {k: round(v, 5) for k, v in e.items() if k in ("cosine", "psnr_db")}
                for out, e in par[name]["outputs"].items()
                if e.get("gated", True)
            }
            for name in MODULES
        } | {"end_to_end": par["end_to_end"]["psnr_db"]}
    return doc


if __name__ == "__main__":
    # Re-record after a deliberate upgrade of the pinned versions:
    #   python -m edgetalk.tests.test_shipped_exports BUNDLE_C4 BUNDLE_C1
    # (the two bundles from `edgetalk export --target onnx --precision int8 [--chunk 1]`).
    import sys

    mfs = {
        c: json.loads((Path(b) / "manifest.json").read_text())
        for c, b in zip((4, 1), sys.argv[1:3], strict=True)
    }
    BASELINE.parent.mkdir(exist_ok=True)
    BASELINE.write_text(json.dumps(record_baseline(mfs), indent=2, sort_keys=True) + "\n")
    print(f"wrote {BASELINE}")


RSS_BUDGET_MB = (
    250  # #15: `run --bundle` on ONNX within 250 MB (README, "A bundle runs without torch")
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.parametrize(("chunk", "threads"), [(4, None), (1, 2)])
def test_run_bundle_peak_rss_is_within_budget(shipped, tmp_path, chunk, threads):
    """The default stream (embedded avatar and speech) from the shipped INT8 bundle, in a child
    of a child, so that only `edgetalk run`'s own peak is read (RUSAGE_CHILDREN). Chunk 1 at two
    threads renders in row bands (two more sessions, the whole-frame graph not loaded)."""
    import subprocess

    bundle = shipped("onnx", "int8", chunk).path
    cmd = [sys.executable, "-m", "edgetalk", "run", "--bundle", str(bundle)]
    cmd += ["--out", str(tmp_path / "o.mp4")]
    if threads:
        cmd += ["--threads", str(threads)]
    probe = (
        "import resource, subprocess, sys\n"
        f"r = subprocess.run({cmd!r}, capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(r.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    code, kib = out.stdout.split()
    assert code == "0", out.stderr
    assert int(kib) / 1024 <= RSS_BUDGET_MB, f"peak RSS {int(kib) / 1024:.0f} MB"
