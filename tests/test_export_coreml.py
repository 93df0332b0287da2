"""`edgetalk export --target coreml`: ML programs with the contract's names, fixed shapes and
dtypes; 8-bit weights for real; parity "not run" (never "pass") where Core ML cannot predict."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from .conftest import need  # noqa: E402

need("coremltools", "coremltools is not installed (the coreml extra)")

from edgetalk.cli import main  # noqa: E402
from edgetalk.converters import coreml  # noqa: E402
from edgetalk.converters.parity import THRESHOLDS, compare_outputs  # noqa: E402
from edgetalk.errors import BackendUnavailable, BundleError, EdgeTalkError  # noqa: E402
from edgetalk.export.pipeline import end_to_end, export_bundle  # noqa: E402
from edgetalk.models.checkpoint import save_checkpoint  # noqa: E402
from edgetalk.models.edgetalk import MODULES  # noqa: E402
from edgetalk.models.io_spec import module_io  # noqa: E402
from edgetalk.runtime.backend_coreml import CoreMLBackend  # noqa: E402
from edgetalk.runtime.backend_torch import TorchBackend  # noqa: E402
from edgetalk.runtime.bundle import open_bundle  # noqa: E402
from edgetalk.runtime.loader import open_backend  # noqa: E402

from .conftest import MICRO, seeded_model  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")
MAC = platform.system() == "Darwin"
TARGET = coreml.CoreMLTarget()


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "micro.safetensors"
    save_checkpoint(seeded_model(MICRO, seed=2), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on busy cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundles(micro_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    return {
        prec: export_bundle(
            "coreml", prec, checkpoint=micro_ckpt, out=root / prec, progress=False, e2e_frames=40
        )
        for prec in PRECISIONS
    }


@pytest.mark.parametrize("prec", PRECISIONS)
def test_export_succeeds_and_parity_is_never_faked(bundles, prec):
    r = bundles[prec]
    assert r.ok and r.path.is_dir()
    parity = r.manifest["parity"]
    if MAC:
        assert all(parity[m]["status"] == "pass" for m in MODULES), parity
        assert parity["end_to_end"]["status"] == "pass"
    else:
        for name in (*MODULES, "end_to_end"):
            status = parity[name]["status"]
            assert status.startswith("not run: ") and "macOS" in status, status
    assert r.manifest["target"] == "coreml" and r.manifest["precision"] == prec
    assert r.manifest["tool_versions"]["coremltools"] and r.manifest["tool_versions"]["torch"]


@pytest.mark.parametrize("prec", PRECISIONS)
def test_specs_match_the_contract(bundles, prec):
    from coremltools.proto import FeatureTypes_pb2 as ft

    r = bundles[prec]
    io = module_io(MICRO)
    for name in MODULES:
        path = r.path / f"{name}.mlpackage"
        assert path.is_dir()
        spec = coreml._open(path).get_spec()
        assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion >= 8
        for declared, got in (
            (io[name].inputs, spec.description.input),
            (io[name].outputs, spec.description.output),
        ):
            assert [f.name for f in got] == [t.name for t in declared]
            for t, f in zip(declared, got, strict=True):
                arr = f.type.multiArrayType
                assert tuple(arr.shape) == t.shape, (name, t.name)
                assert arr.dataType == ft.ArrayFeatureType.FLOAT32, (name, t.name)
                assert arr.WhichOneof("ShapeFlexibility") is None
        info = r.manifest["modules"][name]["info"]
        assert info["spec_io"] == "pass" and info["model_type"] == "mlProgram"
        assert r.manifest["modules"][name]["io"] == io[name].to_dict()
        assert TARGET.checks(path, io[name], prec)["spec_io"] == "pass"
    # A package that disagrees with the contract is refused by the check.
    wrong = module_io(MICRO.with_streaming(chunk=4))["decoder"]
    with pytest.raises(ValueError, match="contract says"):
        TARGET.checks(r.path / "decoder.mlpackage", wrong, prec)


def test_int8_is_really_8bit(bundles):
    io = module_io(MICRO)
    for name in MODULES:
        rep = coreml.int8_report(bundles["int8"].path / f"{name}.mlpackage")
        assert rep["int8_weight_tensors"] > 0 and rep["int8_weight_params"] > 0, name
        info = bundles["int8"].manifest["modules"][name]["info"]
        assert info["int8_weight_tensors"] == rep["int8_weight_tensors"]
        assert info["int8_weights_check"] == "pass" and info["fp16_ops"] > 0
        for prec in ("fp32", "fp16"):
            path = bundles[prec].path / f"{name}.mlpackage"
            assert coreml.int8_report(path)["int8_weight_tensors"] == 0, (prec, name)
            # An "int8" artifact without 8-bit weights is an error, never a silent pass.
            with pytest.raises(RuntimeError, match="no 8-bit weights"):
                TARGET.checks(path, io[name], "int8")
    # The DFT/mel front end stays float: it feeds a log.
    floats = bundles["int8"].manifest["modules"]["audio"]["info"]["float_weights"]
    assert any("front end" in why for why in floats.values())
    # fp16 really computes in fp16, with the three grid_samples (resample: appearance features,
    # the photo, the lip-closing field) kept in fp32.
    dec = bundles["fp16"].manifest["modules"]["decoder"]["info"]
    assert dec["fp16_ops"] > 0 and dec["fp32_op_types"].get("resample") == 3
    assert bundles["fp32"].manifest["modules"]["decoder"]["info"]["fp16_ops"] == 0


def test_bundles_open_and_tampering_is_refused(bundles, tmp_path):
    for prec in PRECISIONS:
        b = open_bundle(bundles[prec].path)
        assert b.target == "coreml" and b.precision == prec
        assert all(b.files[m] == f"{m}.mlpackage" for m in MODULES)
    copy = tmp_path / "copy"
    shutil.copytree(bundles["int8"].path, copy)
    blob = next((copy / "decoder.mlpackage").rglob("weight.bin"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.mlpackage does not match its sha256"):
        open_bundle(copy)


def test_package_that_disagrees_with_the_manifest_is_refused(bundles, tmp_path):
    """Another module's package under a re-hashed manifest: refused by the spec check (which
    runs before Core ML compiles anything, so on every OS)."""
    import json

    from edgetalk.runtime.bundle import tree_sha256

    copy = tmp_path / "swapped"
    shutil.copytree(bundles["fp32"].path, copy)
    shutil.rmtree(copy / "decoder.mlpackage")
    shutil.copytree(copy / "audio.mlpackage", copy / "decoder.mlpackage")
    mf = json.loads((copy / "manifest.json").read_text())
    mf["sha256"] = {f: tree_sha256(copy / f) for f in mf["files"].values()}
    (copy / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(BundleError, match="decoder graph decoder.mlpackage does not match"):
        CoreMLBackend(open_bundle(copy))


def test_existing_packages_are_reused(bundles, micro_ckpt, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(bundles["fp32"].path, out)
    again = export_bundle(
        "coreml", "fp32", checkpoint=micro_ckpt, out=out, progress=False, e2e_frames=40
    )
    assert again.ok and all(m.skipped for m in again.modules)
    assert again.manifest["sha256"] == bundles["fp32"].manifest["sha256"]


@pytest.mark.skipif(MAC, reason="checks the refusal off macOS")
def test_backend_refuses_clearly_off_macos(bundles, wav_file, tmp_path, capsys):
    ok, why = CoreMLBackend.availability()
    assert not ok and why == f"CoreML runs only on macOS; this is {platform.system()}"
    path = bundles["fp16"].path
    with pytest.raises(EdgeTalkError, match="macOS"):
        open_backend(bundle=path)
    with pytest.raises(BackendUnavailable, match="CoreML runs only on macOS"):
        open_backend(bundle=path, backend="coreml")
    code = main(
        [
            "run",
            "--bundle",
            str(path),
            "--audio",
            str(wav_file(0.4)),
            "--out",
            str(tmp_path / "o.mp4"),
            "--no-face-check",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "macOS" in err and "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.skipif(not MAC, reason="Core ML prediction needs macOS")
@pytest.mark.parametrize("prec", PRECISIONS)
def test_prediction_parity_through_the_scheduler(bundles, micro_ckpt, prec):
    from edgetalk.export.calibration import pick, record_stream

    backend = open_backend(bundle=bundles[prec].path)
    assert isinstance(backend, CoreMLBackend) and backend.precision == prec
    b = backend.cfg
    reference = TorchBackend.from_checkpoint(
        micro_ckpt, chunk=b.chunk, steps=b.generator.steps, window=b.generator.window
    )
    calls = record_stream(reference, seconds=1.0).calls  # real inputs, real cache states
    for name in MODULES:
        feeds = pick(calls[name], 4)
        got = [backend.run(name, f) for f in feeds]
        assert list(got[0]) == list(backend.io[name].output_names)
        assert all(got[0][t.name].shape == t.shape for t in backend.io[name].outputs)
        res = compare_outputs([reference.run(name, f) for f in feeds], got, prec)
        assert res["status"] == "pass", (name, res)
    e2e = end_to_end(reference, backend, prec, 40)
    assert e2e["status"] == "pass" and e2e["psnr_db"] >= THRESHOLDS[prec]["e2e_psnr_db"], e2e
