"""A bundle runs without torch: `pip install 'edgetalk[ort]'` (onnxruntime alone, not even the
onnx package) is a complete runtime, and so is `[onnx]`, which adds the export tools.

Two levels. Always: the commands run with torch made unimportable in their process (so a stray
`import torch` anywhere on the run path fails the test), and the commands that do need torch say
so in one line. On CI (or with EDGETALK_TEST_INSTALL=1): a brand-new venv gets
`pip install -c constraints.txt -e '.[ort]'`, which must bring neither torch nor onnx, and renders
a bundle with the decoder's and generator's stored parts (runtime/photo_split.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from .conftest import MICRO, ON_CI, need, seeded_model

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI in a process where `import torch` raises ModuleNotFoundError, as on an install
# without it.
NO_TORCH = (
    "import sys; sys.modules['torch'] = None\n"
    "from edgetalk.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _edgetalk(*args: str, stdin: bytes | None = None, python=sys.executable):
    return subprocess.run(
        [python, "-c", NO_TORCH, *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        cwd=ROOT.parent,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    need("onnxruntime", "the onnx extra is not installed")
    from edgetalk.export.pipeline import export_bundle
    from edgetalk.models.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("torchfree")
    ck = tmp / "micro.safetensors"
    save_checkpoint(seeded_model(MICRO, seed=2), ck)
    r = export_bundle("onnx", "fp32", checkpoint=ck, out=tmp / "b", progress=False, e2e_frames=4)
    assert r.ok
    return r.path


def test_torch_is_not_a_base_dependency():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.split(">")[0].split("=")[0].strip() == "torch" for d in meta["dependencies"])
    assert meta["optional-dependencies"]["torch"] == ["torch>=2.4"]


def test_run_and_live_from_a_bundle_without_torch(bundle, tmp_path):
    out = tmp_path / "run.mp4"
    r = _edgetalk("run", "--bundle", str(bundle), "--out", str(out))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert out.stat().st_size > 10_000

    tone = (np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000) * 8000).astype(np.int16)
    live_out = tmp_path / "live.mp4"
    r = _edgetalk(
        "live", "--bundle", str(bundle), "--pcm-stdin", "--out", str(live_out),
        "--seconds", "2", stdin=tone.tobytes(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"wrote" in r.stdout and live_out.stat().st_size > 1000


@pytest.mark.parametrize(
    "args",
    [("run", "--out", "x.mp4"), ("export", "--target", "onnx")],
    ids=["run-checkpoint", "export"],
)
def test_what_needs_torch_says_so_in_one_line(args, tmp_path):
    r = _edgetalk(*args)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err and "edgetalk[torch]" in err, err


def test_doctor_without_torch_lists_the_torch_backend_as_missing():
    r = _edgetalk("doctor", "--full")
    text = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    torch_row = next(line for line in text.splitlines() if line.strip().startswith("torch "))
    assert "edgetalk[torch]" in torch_row, torch_row


def test_a_fresh_venv_without_torch_renders_a_bundle(bundle, tmp_path):
    if not (ON_CI or os.environ.get("EDGETALK_TEST_INSTALL")):
        pytest.skip("installs from the package index; runs on CI or with EDGETALK_TEST_INSTALL=1")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[ort]"],
        check=True,
        timeout=900,
    )
    has_torch = subprocess.run([py, "-c", "import torch"], capture_output=True)
    assert has_torch.returncode != 0, "installing edgetalk[ort] brought torch"
    has_onnx = subprocess.run([py, "-c", "import onnx"], capture_output=True)
    assert has_onnx.returncode != 0, "installing edgetalk[ort] brought the onnx package"
    out = tmp_path / "fresh.mp4"
    r = subprocess.run(
        [str(env_dir / "bin" / "edgetalk"), "run", "--bundle", str(bundle), "--out", str(out)],
        capture_output=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert out.stat().st_size > 10_000
    # the avatar's parts of the decoder and generator ran once, from the bundle's stored graphs,
    # and the decoder's composite in the compiled pass the install built (runtime/composite.py)
    assert "photo work and the reference token once per avatar" in r.stdout.decode()
    assert "composite fused" in r.stdout.decode()
