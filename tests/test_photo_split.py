"""The CPU backend runs each decoder graph in two parts (runtime/photo_split.py): the nodes that
read the photo only run once per avatar, the rest every frame, and the frames are the whole
graph's to the bit in fp32 and INT8 (fp16: within one float16 step), for the row bands of chunk 1
too. The generator splits the same way: its reference token's pass runs once per avatar. The
exporter stores the parts in the bundle, which a runtime then loads without the onnx package; a
bundle exported before is split at load."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from .conftest import BANDED, MICRO, export_seeded, exported_before, need, speechlike, with_manifest

need("onnxruntime", "the onnx extra is not installed")
need("onnx", "the onnx package is not installed (the split reads the graph with it)")

from edgetalk.errors import BundleError  # noqa: E402
from edgetalk.models.io_spec import DECODER_BANDS, band_part, module_io  # noqa: E402
from edgetalk.runtime import backend_onnxruntime as bo  # noqa: E402
from edgetalk.runtime.bundle import EXTERNAL_DATA, open_bundle  # noqa: E402
from edgetalk.runtime.photo_split import (  # noqa: E402
    SPLITS,
    derived_key,
    part_roles,
    split_photo_work,
    stored_parts,
)
from edgetalk.runtime.scheduler import StreamScheduler  # noqa: E402

# chunk 1 at 64 px: the ONNX export then also writes the row bands


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    out = {}
    for name, cfg in (("micro", MICRO), ("banded", BANDED)):
        for prec in ("fp32", "fp16", "int8"):
            if name == "banded" and prec == "fp16":
                continue
            out[name, prec] = export_seeded(root, name, cfg, prec, seed=4)
    return out


def avatar(res: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (res, res, 3), dtype=np.uint8)


def stream(backend, seed: int = 0) -> np.ndarray:
    sched = StreamScheduler(backend, avatar(backend.cfg.render.resolution, seed), seed=1)
    frames = sched.push_audio(speechlike(0.5)) + sched.flush()
    return np.stack([f.rgb for f in frames])


def whole(monkeypatch, path, threads):
    """The backend as it was before the split: every decoder graph runs whole."""
    with monkeypatch.context() as m:
        m.setattr(bo, "split_photo_work", lambda path, module="decoder": None)
        m.setattr(bo, "stored_parts", lambda bundle, part: None)
        return bo.OnnxRuntimeBackend(open_bundle(path), threads=threads)


def run_parts(split, feed):
    import onnxruntime as ort

    photo = ort.InferenceSession(split.photo)
    frame = ort.InferenceSession(split.frame)
    photo_feed = {n: feed[n] for n in split.photo_inputs}
    made = dict(zip(split.derived, photo.run(list(split.derived), photo_feed), strict=True))
    return frame.run(None, {n: made.get(n, feed.get(n)) for n in split.frame_inputs})[0]


@pytest.mark.parametrize(
    "key", [("micro", "fp32"), ("micro", "fp16"), ("micro", "int8"), ("banded", "int8")]
)
def test_the_two_parts_compute_the_whole_graphs_frames(bundles, key):
    import onnxruntime as ort

    files = ["decoder.onnx"] + [f"{band_part(k)}.onnx" for k in range(DECODER_BANDS)] * (
        key[0] == "banded"
    )
    rng = np.random.default_rng(1)
    for name in files:
        path = bundles[key] / name
        split = split_photo_work(path)
        assert split is not None, name
        # the photo's neighbour table is the photo part's: the frame part no longer reads it
        assert "image" in split.photo_inputs and "image" not in split.frame_inputs
        assert split.frame_inputs[0] == "motion" and split.derived
        sess = ort.InferenceSession(str(path))
        feed = {}
        for t in sess.get_inputs():
            shape = tuple(t.shape)
            feed[t.name] = (rng.random(shape) * (0.5 if t.name == "motion" else 1.0)).astype(
                np.float32
            )
        want, got = sess.run(None, feed)[0], run_parts(split, feed)
        if key[1] == "fp16":
            # ONNX Runtime drops a float16 round trip of the whole graph that crosses the cut:
            # a few values then differ by one float16 step
            np.testing.assert_allclose(got, want, rtol=0, atol=2.0**-11)
            assert np.mean(got != want) < 0.01
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("key", "threads"),
    [
        (("micro", "fp32"), 1),
        (("micro", "int8"), 2),
        (("banded", "fp32"), 1),
        (("banded", "int8"), 2),
    ],
)
def test_a_split_backend_streams_the_frames_of_the_whole_graphs(bundles, monkeypatch, key, threads):
    """Per frame (C=2, one or two workers), whole per call (C=1, one thread) and in row bands
    (C=1, two threads): the same frames to the bit as the unsplit graphs give."""
    split = bo.OnnxRuntimeBackend(open_bundle(bundles[key]), threads=threads)
    parts = [band_part(k) for k in range(DECODER_BANDS)] if split.band_sessions else ["decoder"]
    parts.append("generator")
    assert sorted(split.splits) == sorted(parts) == sorted(split.photo_sessions)
    assert "photo work and the reference token once per avatar" in split.describe()
    np.testing.assert_array_equal(stream(split), stream(whole(monkeypatch, bundles[key], threads)))


def test_the_photo_part_runs_once_per_avatar_and_each_stream_keeps_its_own(bundles, monkeypatch):
    backend = bo.OnnxRuntimeBackend(open_bundle(bundles["micro", "int8"]), threads=2)
    calls, ref_calls = [], []
    sessions = backend.photo_sessions
    counting = {
        "decoder": _Counting(sessions["decoder"], calls),
        "generator": _Counting(sessions["generator"], ref_calls),
    }
    monkeypatch.setattr(backend, "photo_sessions", counting, raising=True)
    res = MICRO.render.resolution
    a = StreamScheduler(backend, avatar(res, 1), seed=1)
    b = StreamScheduler(backend, avatar(res, 2), seed=1)
    assert len(calls) == len(ref_calls) == 2  # one per avatar
    keys = [derived_key("decoder", n) for n in backend.splits["decoder"].derived]
    assert all(k in a.photo and k in b.photo for k in keys)
    assert not np.array_equal(a.photo[keys[-1]], b.photo[keys[-1]])
    ref_keys = [derived_key("generator", n) for n in backend.splits["generator"].derived]
    assert all(k in a.reference and k in b.reference for k in ref_keys)
    assert not np.array_equal(a.reference[ref_keys[0]], b.reference[ref_keys[0]])
    # the two streams interleaved, each with its own photo: what each alone renders
    fa, fb = [], []
    for piece in np.array_split(speechlike(0.5), 5):
        fa += a.push_audio(piece)
        fb += b.push_audio(piece)
    fa, fb = fa + a.flush(), fb + b.flush()
    assert len(calls) == len(ref_calls) == 2  # never per frame or per chunk
    plain = whole(monkeypatch, bundles["micro", "int8"], 2)
    for frames, seed in ((fa, 1), (fb, 2)):
        np.testing.assert_array_equal(np.stack([f.rgb for f in frames]), stream(plain, seed))


class _Counting:
    def __init__(self, sess, calls):
        self.sess, self.calls = sess, calls

    def run(self, *a, **kw):
        self.calls.append(1)
        return self.sess.run(*a, **kw)


def test_the_contracts_inputs_alone_still_render(bundles):
    """A caller that feeds the decoder its contract only (the export's parity check, a user's
    script): the backend makes the photo part's tensors for that call."""
    backend = bo.OnnxRuntimeBackend(open_bundle(bundles["micro", "fp32"]), threads=1)
    rng = np.random.default_rng(2)
    spec = module_io(MICRO)["decoder"]
    image = (avatar(MICRO.render.resolution, 3).transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
    app = backend.run("appearance", {"image": image})
    feed = {t.name: image if t.name == "image" else app.get(t.name) for t in spec.inputs}
    feed["motion"] = (rng.standard_normal((1, MICRO.chunk, MICRO.motion_dim)) * 0.3).astype(
        np.float32
    )
    bare = backend.run("decoder", feed)["frames"]
    prepared = backend.run("decoder", {**backend.prepare_photo(feed), "motion": feed["motion"]})
    np.testing.assert_array_equal(bare, prepared["frames"])


@pytest.mark.parametrize("prec", ["fp32", "fp16", "int8"])
def test_the_generators_two_parts_compute_the_whole_graphs_outputs(bundles, prec):
    """The reference token's pass is the avatar's part: the frame part never reads ref_motion,
    and the motion and new keys/values are the whole graph's to the bit (fp16: one step)."""
    import onnxruntime as ort

    path = bundles["micro", prec] / "generator.onnx"
    split = split_photo_work(path, "generator")
    assert split is not None
    assert split.photo_inputs == ("ref_motion",) and "ref_motion" not in split.frame_inputs
    sess = ort.InferenceSession(str(path))
    rng = np.random.default_rng(5)
    feed = {
        t.name: rng.standard_normal(tuple(t.shape)).astype(np.float32) for t in sess.get_inputs()
    }
    feed["cache_valid"] = (rng.random(feed["cache_valid"].shape) < 0.7).astype(np.float32)
    photo = ort.InferenceSession(split.photo)
    frame = ort.InferenceSession(split.frame)
    ref = {"ref_motion": feed["ref_motion"]}
    made = dict(zip(split.derived, photo.run(list(split.derived), ref), strict=True))
    got = frame.run(None, {n: made.get(n, feed.get(n)) for n in split.frame_inputs})
    for g, w in zip(got, sess.run(None, feed), strict=True):
        if prec == "fp16":
            np.testing.assert_allclose(g, w, rtol=2.0**-10, atol=2.0**-12)
        else:
            np.testing.assert_array_equal(g, w)


def test_the_generators_contract_inputs_alone_still_run(bundles):
    """The export's parity check feeds the generator its contract: the backend then makes the
    reference token's pass for that call, and the outputs are those of a prepared feed."""
    backend = bo.OnnxRuntimeBackend(open_bundle(bundles["micro", "fp32"]), threads=1)
    assert "generator" in backend.splits
    rng = np.random.default_rng(6)
    feed = {
        t.name: rng.standard_normal(t.shape).astype(np.float32)
        for t in module_io(MICRO)["generator"].inputs
    }
    bare = backend.run("generator", feed)
    prepared = backend.prepare_photo({"ref_motion": feed["ref_motion"]}, "generator")
    again = backend.run("generator", {**feed, **prepared})
    for name, value in bare.items():
        np.testing.assert_array_equal(value, again[name])


def no_onnx_import(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_onnx(name, *a, **kw):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_onnx)


@pytest.mark.parametrize("key", [("micro", "fp32"), ("banded", "int8")])
def test_the_bundle_stores_the_parts_the_split_at_load_makes(bundles, key):
    bundle = open_bundle(bundles[key])
    parts = bundle.manifest[SPLITS]
    bands = [band_part(k) for k in range(DECODER_BANDS)] * (key[0] == "banded")
    assert sorted(parts) == sorted(["decoder", "generator", *bands])
    for part in parts:
        stored = stored_parts(bundle, part)
        module = "generator" if part == "generator" else "decoder"
        assert stored == split_photo_work(bundle.file(part), module), part
        # hashed like every file of the bundle
        for role in part_roles(part):
            assert bundle.manifest["sha256"][bundle.files[role]]
    assert bundle.manifest[EXTERNAL_DATA] == {f: [] for f in bundle.files.values()}


def test_a_bundle_exported_before_is_split_at_load_and_renders_the_same(
    bundles, monkeypatch, tmp_path
):
    old = exported_before(bundles["micro", "int8"], tmp_path / "old")
    calls = []
    real = bo.split_photo_work
    monkeypatch.setattr(
        bo, "split_photo_work", lambda p, m="decoder": calls.append(m) or real(p, m)
    )
    then = bo.OnnxRuntimeBackend(open_bundle(old), threads=2)
    assert sorted(calls) == ["decoder", "generator"] and sorted(then.splits) == sorted(calls)
    calls.clear()
    now = bo.OnnxRuntimeBackend(open_bundle(bundles["micro", "int8"]), threads=2)
    assert not calls and sorted(now.splits) == ["decoder", "generator"]
    np.testing.assert_array_equal(stream(then), stream(now))


def test_without_the_onnx_package_the_stored_parts_run_and_an_older_bundle_runs_whole(
    bundles, monkeypatch, tmp_path
):
    old = exported_before(bundles["micro", "fp32"], tmp_path / "old")
    plain = whole(monkeypatch, bundles["micro", "fp32"], 2)
    no_onnx_import(monkeypatch)
    assert split_photo_work(bundles["micro", "fp32"] / "decoder.onnx") is None
    then = bo.OnnxRuntimeBackend(open_bundle(old), threads=2)
    assert not then.splits and not then.photo_sessions
    assert "photo work" not in then.describe()
    now = bo.OnnxRuntimeBackend(open_bundle(bundles["micro", "fp32"]), threads=2)
    assert sorted(now.splits) == ["decoder", "generator"]
    assert "photo work and the reference token once per avatar" in now.describe()
    want = stream(plain)
    np.testing.assert_array_equal(stream(then), want)
    np.testing.assert_array_equal(stream(now), want)


def test_a_run_from_a_bundle_never_imports_onnx(bundles, tmp_path):
    """The runtime's load needs onnxruntime only: the onnx package's import is 17 MB and 0.5 s."""
    code = (
        "import sys; from edgetalk.cli import main; "
        f"rc = main(['run', '--bundle', {str(bundles['banded', 'int8'])!r}, '--threads', '2', "
        f"'--out', {str(tmp_path / 'o.mp4')!r}]); "
        "print('onnx imported:', 'onnx' in sys.modules); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "onnx imported: False" in r.stdout
    assert "row bands" in r.stdout and "once per avatar" in r.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update({SPLITS: ["decoder"]}), "'splits' block is malformed"),
        (lambda m: m[SPLITS]["decoder"].pop("derived"), "malformed \\(entry 'decoder'\\)"),
        (
            lambda m: m[SPLITS]["decoder"].update(stream="appearance.onnx"),
            "stream part is not the file listed",
        ),
        (lambda m: m[SPLITS].update(nothing={}), "entry 'nothing'"),
        (lambda m: m[EXTERNAL_DATA].update({"decoder.onnx": "x"}), "'external_data' entry"),
        (lambda m: m[bo.GRAPH_IO].pop("audio"), "'graph_io' block has no valid entry for audio"),
    ],
)
def test_a_malformed_record_of_the_stored_parts_is_refused_clearly(
    bundles, tmp_path, change, message
):
    copy = with_manifest(bundles["micro", "fp32"], tmp_path / "b", change)
    with pytest.raises(BundleError, match=message):
        bo.OnnxRuntimeBackend(open_bundle(copy), threads=1)
