"""On CI (EDGETALK_CI set by .ci/run) every test dependency the README's test command installs is
importable and the system tools exist, so no test can quietly skip for want of one."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess

import pytest

from .conftest import ON_CI

pytestmark = pytest.mark.skipif(not ON_CI, reason="runs on CI only (EDGETALK_CI is not set)")

# Every module a test imports behind a skip, and the extras the test command installs.
MODULES = [
    "aiohttp",
    "aiortc",
    "av",
    "coremltools",
    "cv2",
    "dlib",
    "hypothesis",
    "matplotlib",
    "mediapipe",
    "mlx.core",
    "onnx",
    "onnxconverter_common",
    "onnxruntime",
    "playwright.sync_api",
    "psutil",
    "pytest_timeout",
    "skimage",
    "soundfile",
    "soxr",
]


@pytest.mark.parametrize("module", MODULES)
def test_importable(module):
    importlib.import_module(module)


def test_face_embedding_models_present():
    # Found by path, as the eval code does: importing the package needs pkg_resources.
    spec = importlib.util.find_spec("face_recognition_models")
    assert spec and spec.submodule_search_locations, "face-recognition-models is not installed"


@pytest.mark.parametrize("tool", ["espeak-ng", "chromium"])
def test_system_tool_present(tool):
    path = shutil.which(tool) or (f"/usr/bin/{tool}" if tool == "chromium" else None)
    assert path and shutil.which(path), f"{tool} is missing: .ci/run installs it with apt-get"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_mediapipe_finds_landmarks():
    """mediapipe installed with --no-deps must still work: no landmarks would turn the landmark
    tests into skips elsewhere."""
    from edgetalk.training import faces

    assert faces.load_identities(sources=("astronaut",)), "mediapipe found no face on astronaut()"
