"""The export's timing of each fp16/INT8 artifact against its fp32 graph (export/speed.py): a
precision that does not pay on this CPU is said so, with the figures, never silently shipped."""

import numpy as np
import pytest

from edgetalk.export import speed


class _Timed:
    """A target whose artifacts are 'run' by sleeping: path name -> seconds per call."""

    def __init__(self, seconds: dict):
        self.seconds = seconds

    def timing_setting(self):
        return {"threads": 1}

    def timed_call(self, path, sample):
        if path not in self.seconds:
            return None
        s = self.seconds[path]
        if s is None:
            raise RuntimeError("graph failed to load")
        import time

        return lambda: time.sleep(s)


def test_measure_times_both_artifacts_and_reports_the_ratio(monkeypatch):
    monkeypatch.setattr(speed, "ROUND_S", 0.02)
    got = speed.measure(_Timed({"a.fp32": 0.004, "a": 0.002}), "a.fp32", "a", {})
    assert got["threads"] == 1
    assert 1.3 < got["vs_fp32"] < 2.6, got  # 2x by construction; sleep overshoots a little
    assert got["fp32_ms"] > got["ms"] > 1.5
    assert got["vs_fp32"] == pytest.approx(got["fp32_ms"] / got["ms"], rel=1e-2)


def test_measure_is_none_where_the_target_cannot_run_its_artifacts():
    assert speed.measure(_Timed({"a.fp32": 0.001}), "a.fp32", "a", {}) is None


def test_a_failing_artifact_is_recorded_not_fatal():
    got = speed.measure(_Timed({"a.fp32": 0.001, "a": None}), "a.fp32", "a", {})
    assert got["status"].startswith("not measured: RuntimeError: graph failed to load")


def _info(vs, ms=27.8, cpu="AMD EPYC (family 23 model 1); avx avx2 fma f16c"):
    return {"speed": {"threads": 1, "ms": ms, "fp32_ms": ms * vs, "vs_fp32": vs, "cpu": cpu}}


@pytest.mark.parametrize(
    "vs, expect",
    [(1.30, None), (1.05, None), (0.97, "no faster than fp32"), (0.80, "slower than fp32")],
)
def test_verdict_speaks_only_when_the_decoder_does_not_gain(vs, expect):
    modules = [("appearance", _info(0.5)), ("decoder", _info(vs)), ("audio", {})]
    line = speed.verdict(modules, "onnx", "int8")
    if expect is None:
        assert line is None
    else:
        assert expect in line and f"{vs:.2f}x its fp32 graph" in line
        assert "AMD EPYC (family 23 model 1)" in line
        assert "edgetalk bench --export onnx:fp32,onnx:int8" in line


def test_verdict_is_silent_without_a_figure():
    assert speed.verdict([("decoder", {})], "onnx", "int8") is None
    assert (
        speed.verdict([("decoder", {"speed": {"status": "not measured: x"}})], "onnx", "int8")
        is None
    )
    assert speed.column({}) == "" and speed.column({"speed": {"status": "not measured"}}) == ""
    assert speed.column(_info(1.234)) == "1.23x fp32"


def test_onnx_target_times_the_graph_as_the_runtime_runs_it(tmp_path):
    """OnnxTarget.timed_call runs a real graph, and gives a one-frame graph the chunk's first
    frame (the decoder's motion input is [1, 1, P] where the recording has [1, C, P])."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from edgetalk.converters.onnx import OnnxTarget

    x = helper.make_tensor_value_info("motion", TensorProto.FLOAT, [1, 1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3])
    g = helper.make_graph([helper.make_node("Relu", ["motion"], ["y"])], "g", [x], [y])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    sample = {"motion": np.array([[[-1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], np.float32)}
    call = OnnxTarget().timed_call(path, sample)
    np.testing.assert_array_equal(call()[0], [[[0.0, 2.0, 3.0]]])


def test_the_note_names_where_it_was_timed():
    info = _info(0.8)
    info["speed"].pop("threads")
    info["speed"]["device"] = "mlx gpu"
    line = speed.verdict([("decoder", info)], "mlx", "int8")
    assert "ms a call, on mlx gpu): slower than fp32 here" in line
    assert "edgetalk bench --export mlx:fp32,mlx:int8" in line
