"""Export targets are one file each (converters/<name>.py setting TARGET), found without a list;
what a target changes for tracing happens in one patch context (export/patching.py), on a private
copy of the model and only for the conversion, undone even when the conversion fails."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from edgetalk.converters.target import PRECISIONS, Target, target, targets
from edgetalk.errors import EdgeTalkError, InputError
from edgetalk.export.patching import export_patches
from edgetalk.models.io_spec import module_io
from edgetalk.runtime.bundle import open_bundle
from edgetalk.runtime.registry import registry

from .conftest import MICRO, need, seeded_model

FAKE = """
from edgetalk.converters.target import Target


class Xyz(Target):
    name, suffix, parity_backend = "xyz", ".xyz", "torch"

    @classmethod
    def availability(cls):
        return False, "xyz needs a machine this is not"

    def convert(self, model, part, io, path, sample):
        path.write_bytes(b"")

    def apply_precision(self, precision, src, dst, calibration):
        return {}

    def tool_versions(self):
        return {}


TARGET = Xyz
"""


def test_every_shipped_target_is_discovered():
    found = targets()
    assert {"onnx", "coreml", "tensorrt"} <= set(found)
    for name, cls in found.items():
        assert issubclass(cls, Target) and cls.name == name
        assert cls.suffix.startswith(".") and set(cls.precisions) <= set(PRECISIONS)
        assert cls.parity_backend in registry(), (name, cls.parity_backend)
    with pytest.raises(EdgeTalkError, match=r"unknown target 'tflite'; choose from .*onnx"):
        target("tflite")


@pytest.fixture
def fake_target_file(tmp_path, monkeypatch):
    """A new target written as one file in a folder on converters' search path."""
    import edgetalk.converters as pkg

    (tmp_path / "xyz_target.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    targets.cache_clear()
    yield
    sys.modules.pop("edgetalk.converters.xyz_target", None)
    targets.cache_clear()


def test_a_new_target_is_one_file(fake_target_file, capsys):
    from edgetalk.cli import main

    assert targets()["xyz"].__module__ == "edgetalk.converters.xyz_target"
    with pytest.raises(EdgeTalkError, match="^cannot export xyz: xyz needs a machine this is not$"):
        target("xyz")
    # the CLI offers it, and refuses it here with the target's own reason, in one line
    assert main(["export", "--target", "xyz"]) == 2
    err = capsys.readouterr().err
    assert "cannot export xyz: xyz needs a machine" in err and "Traceback" not in err


def test_export_choices_come_from_discovery(capsys):
    from edgetalk.cli import main

    assert main(["export", "--target", "nosuch"]) == 2
    err = capsys.readouterr().err
    for name in targets():
        assert f"'{name}'" in err


# ---- the patch context ----------------------------------------------------------------------
def _registry_owners() -> set[str]:
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    return {f.__module__ for f in _TORCH_OPS_REGISTRY.name_to_func_mapping.values()}


def test_importing_the_coreml_target_leaves_coremltools_alone():
    need("coremltools", "coremltools is not installed (the coreml extra)")
    import edgetalk.converters.coreml  # noqa: F401
    import edgetalk.export.pipeline  # noqa: F401

    targets()
    owners = _registry_owners()
    assert owners and all(m.startswith("coremltools.") for m in owners), owners


def test_a_failed_conversion_restores_every_patch(monkeypatch, tmp_path):
    need("coremltools", "coremltools is not installed (the coreml extra)")
    import coremltools

    from edgetalk.converters.coreml import CoreMLTarget
    from edgetalk.converters.onnx import OnnxTarget

    model = seeded_model(MICRO)
    io = module_io(MICRO)["audio"]
    seen = {}

    def failing_convert(*args, **kwargs):  # coremltools fails mid-conversion
        seen["owners"] = _registry_owners()
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(coremltools, "convert", failing_convert)
    coreml = CoreMLTarget()
    with (
        pytest.raises(RuntimeError, match="conversion failed"),
        export_patches(model, coreml) as twin,
    ):
        assert twin is not model and twin.decoder.native_sampling  # Core ML has resample
        coreml.convert(twin, "audio", io, tmp_path / "audio.mlpackage", None)
    assert "edgetalk.converters.coreml" in seen["owners"]  # the fix was in force, inside
    assert all(m.startswith("coremltools.") for m in _registry_owners())  # and is gone
    assert coreml._cast_fixes is None

    onnx = OnnxTarget()
    with pytest.raises(RuntimeError, match="tracing failed"), export_patches(model, onnx) as twin:
        assert twin.decoder.native_sampling is False  # gather form for ONNX Runtime
        assert model.decoder.native_sampling is True  # the parity reference never switches
        assert twin.decoder.basis.weight.data_ptr() == model.decoder.basis.weight.data_ptr()
        raise RuntimeError("tracing failed")
    assert twin.decoder.native_sampling is True and model.decoder.native_sampling is True
    # a conversion outside the context is refused, not run without its fix
    with pytest.raises(RuntimeError, match="inside export.patching.export_patches"):
        coreml.convert(model, "audio", io, tmp_path / "audio.mlpackage", None)


def test_export_key_covers_the_targets_a_target_builds_on(monkeypatch):
    from edgetalk.converters.tensorrt import TensorRTTarget
    from edgetalk.export import pipeline

    hashed = []
    monkeypatch.setattr(pipeline, "sha256", lambda p: hashed.append(Path(p).name) or "x")
    pipeline._export_key(Path("ck"), MICRO, TensorRTTarget(), "fp16")
    assert {"tensorrt.py", "onnx.py"} <= set(hashed) and "target.py" not in hashed
    assert {"decoder.py", "generator.py"} <= set(hashed)  # the traced model code


def test_export_key_covers_the_mlx_port(monkeypatch):
    """The MLX port's layers decide what an int8 file quantizes: changing them re-exports."""
    from edgetalk.converters.mlx import MlxTarget
    from edgetalk.export import pipeline

    hashed = []
    monkeypatch.setattr(pipeline, "sha256", lambda p: hashed.append(str(p)) or "x")
    pipeline._export_key(Path("ck"), MICRO, MlxTarget(), "int8")
    assert any(h.endswith("runtime/mlx/layers.py") for h in hashed), hashed


# ---- backends that run checkpoints refuse bundles in one line -------------------------------
def _bundle(root: Path, target: str) -> Path:
    """A well-formed bundle of placeholder files (the loader's refusals come before any load)."""
    from edgetalk.models.edgetalk import MODULES
    from edgetalk.runtime.bundle import MANIFEST, SCHEMA_VERSION, tree_sha256

    root.mkdir()
    io = module_io(MICRO)
    files = {m: f"{m}.bin" for m in MODULES}
    for f in files.values():
        (root / f).write_bytes(b"graph")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "config": MICRO.to_dict(),
        "target": target,
        "precision": "fp32",
        "streaming": {k: getattr(MICRO, k) for k in ("chunk", "lookahead_samples", "cache_slots")},
        "modules": {m: {"io": io[m].to_dict()} for m in MODULES},
        "files": files,
        "sha256": {f: tree_sha256(root / f) for f in files.values()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_torch_backends_refuse_bundles_clearly(tmp_path):
    from edgetalk.runtime.loader import open_backend
    from edgetalk.runtime_cuda.backend_cuda import CudaBackend

    onnx = _bundle(tmp_path / "onnx", "onnx")
    with pytest.raises(InputError, match="backend 'torch' cannot run a 'onnx' bundle"):
        open_backend(bundle=onnx, backend="torch")
    forged = _bundle(tmp_path / "forged", "torch")  # no export writes one: a hand-made manifest
    with pytest.raises(InputError, match=r"torch backend runs checkpoints \(--checkpoint\), not"):
        open_backend(bundle=forged)
    with pytest.raises(InputError, match=r"cuda backend runs checkpoints"):
        CudaBackend.from_bundle(open_bundle(forged))


def test_each_target_traces_the_sampling_its_runtime_runs_best():
    """ONNX Runtime gets the gather form (its GridSample kernel was half the decoder's time);
    TensorRT keeps GridSample, its own layer, which the FP16 build pins to fp32."""
    found = targets()
    assert found["onnx"].gather_sampling is True
    assert found["tensorrt"].gather_sampling is False
    model = seeded_model(MICRO, seed=1)
    with export_patches(model, found["tensorrt"]()) as twin:
        assert twin.decoder.native_sampling is True
    with export_patches(model, found["onnx"]()) as twin:
        assert twin.decoder.native_sampling is False
