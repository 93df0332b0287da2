"""--threads: its default, and that the number reaches torch and the onnxruntime session options."""

from __future__ import annotations

import pytest
import torch

from edgetalk.cli import build_parser, main
from edgetalk.models.io_spec import module_io
from edgetalk.runtime import threads as th

from .conftest import MICRO, need


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    """Each test starts with no chosen threads and leaves torch as it found it."""
    before = torch.get_num_threads()
    monkeypatch.delenv(th.ENV, raising=False)
    th.set_threads(None)
    yield
    th.set_threads(None)
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, want", [(1, 1), (2, 1), (3, 1), (4, 2), (16, 2)])
def test_default_is_half_the_cores_at_most_two(cores, want):
    assert th.default_threads(cores) == want


def test_env_overrides_the_default(monkeypatch):
    monkeypatch.setenv(th.ENV, "3")
    assert th.default_threads(16) == 3 and th.resolve(None) == 3
    assert th.resolve(5) == 5  # the flag wins


@pytest.mark.parametrize("command", ["run", "live", "serve", "eval"])
def test_every_model_command_takes_threads(command):
    args = build_parser(command, lazy=True).parse_args([command, "--threads", "3"])
    assert args.threads == 3


def test_threads_below_one_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser("run", lazy=True).parse_args(["run", "--threads", "0"])
    assert e.value.code == 2 and "must be 1 or more" in capsys.readouterr().err


def test_run_threads_reaches_torch(micro_ckpt, wav_file, tmp_path, capsys):
    torch.set_num_threads(2)
    args = ["run", "--checkpoint", micro_ckpt, "--audio", wav_file(seconds=0.4)]
    args += ["--out", tmp_path / "a.mp4", "--threads", "1"]
    assert main([str(a) for a in args]) == 0
    assert torch.get_num_threads() == 1


class FakeBundle:
    target = "onnx"
    precision = "fp32"

    def __init__(self):
        self.cfg = MICRO
        self.io = module_io(MICRO)
        self.files = {m: f"{m}.onnx" for m in self.io}
        self.flops = {}  # exported before FLOPs were recorded
        self.manifest = {}  # and before the stored parts and their records

    def file(self, module):
        return self.files[module]


def open_fake_onnx(monkeypatch, flops=None, **kw):
    """open_backend on a fake onnx bundle; returns the SessionOptions every session got."""
    need("onnxruntime", "the onnx extra is not installed")
    import onnxruntime

    from edgetalk.runtime import backend_onnxruntime as bo
    from edgetalk.runtime import bundle as bundle_mod
    from edgetalk.runtime.loader import open_backend

    seen = []

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            seen.append(sess_options)

    fake = FakeBundle()
    fake.flops = flops or {}
    monkeypatch.setattr(bundle_mod, "open_bundle", lambda path, expect_chunk=None: fake)
    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    monkeypatch.setattr(bo, "declared_io", lambda path: {})
    monkeypatch.setattr(bo, "split_photo_work", lambda path, module=None: None)  # no split
    monkeypatch.setattr(bo.OnnxRuntimeBackend, "check_graph_io", lambda *a: None)
    open_backend(bundle="fake", **kw)
    assert len(seen) == len(FakeBundle().io)
    return seen


def test_threads_reach_the_onnxruntime_sessions(monkeypatch):
    for opts in open_fake_onnx(monkeypatch, threads=3):
        assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1


def test_onnxruntime_gets_the_default_and_the_command_choice(monkeypatch):
    monkeypatch.setattr(th, "cpu_count", lambda: 8)
    assert {o.intra_op_num_threads for o in open_fake_onnx(monkeypatch)} == {2}
    th.set_threads(1)  # what `live` and `serve` do with their --threads
    assert {o.intra_op_num_threads for o in open_fake_onnx(monkeypatch)} == {1}


def test_small_modules_run_on_one_thread(monkeypatch):
    """A module whose call the manifest records as below SMALL_MODULE_FLOPS gets a one-thread
    session: the tiny model's audio encoder and generator ran 1.4x faster so (0.56 against 0.78 ms,
    1.2 against 1.8). The others keep --threads."""
    from edgetalk.runtime.backend_onnxruntime import SMALL_MODULE_FLOPS

    flops = {"appearance": 7e8, "audio": 3.2e7, "generator": SMALL_MODULE_FLOPS, "decoder": 2e9}
    got = open_fake_onnx(monkeypatch, flops=flops, threads=3)
    by_module = dict(zip(FakeBundle().io, (o.intra_op_num_threads for o in got), strict=True))
    assert by_module == {"appearance": 3, "audio": 1, "generator": 3, "decoder": 3}
