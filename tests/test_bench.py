"""`edgetalk bench` and `bench report`: what is measured and how (not how fast anything is)."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from edgetalk.benchmarks.configs import Request, make_plan, parse_chunks
from edgetalk.benchmarks.measure import (
    Settings,
    deadline_misses,
    first_frame_floor_ms,
    measure,
    measure_group,
    paced_run,
)
from edgetalk.benchmarks.report import load_report
from edgetalk.benchmarks.schema import SCHEMA, validate
from edgetalk.cli import main
from edgetalk.errors import EdgeTalkError, InputError
from edgetalk.models.config import SAMPLES_PER_FRAME
from edgetalk.runtime.avatar import prepare_avatar
from edgetalk.runtime.backend import Backend
from edgetalk.runtime.scheduler import StreamScheduler

from .conftest import MICRO, need, speechlike

QUICK = ["--seconds", "1", "--repeats", "1", "--warmup", "0.2"]


@pytest.fixture(scope="module")
def bench_run(micro_ckpt, tmp_path_factory):
    """One real bench run on the micro model at two chunk sizes: (json path, plots dir)."""
    need("matplotlib", "--plots needs the bench extra (matplotlib)")
    need("psutil", "bench needs the bench extra (psutil)")
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--checkpoint", micro_ckpt, "--backend", "torch", "--chunk", "1,2"]
    args += [*QUICK, "--json", out / "a.json", "--plots", out / "plots", "--device-name", "laptop"]
    assert main([str(a) for a in args]) == 0
    return out / "a.json", out / "plots"


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


# ---- a fake clock: paced audio and latencies with exact, known numbers ---------------------
class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s > 0
        self.sleeps.append(s)
        self.now += s


class TimedBackend(Backend):
    """Wraps a backend; every module call takes a fixed time on the fake clock."""

    name = "timed-test"

    def __init__(self, inner, t: FakeTime, ms: dict[str, float], slow_after: int | None = None):
        super().__init__(inner.cfg, inner.io, inner.precision)
        self.inner, self.t, self.ms, self.slow_after = inner, t, ms, slow_after
        self.generator_calls = 0

    def run(self, module, inputs):
        ms = self.ms.get(module, 0.0)
        if module == "generator":
            self.generator_calls += 1
            if self.slow_after is not None and self.generator_calls > self.slow_after:
                ms += 100.0  # later chunks are slower than the first
        self.t.now += ms / 1000.0
        return self.inner.run(module, inputs)


MS = {"appearance": 7.0, "audio": 2.0, "generator": 5.0, "decoder": 3.0}


def test_floor_is_chunk_plus_lookahead():
    assert first_frame_floor_ms(1, 960) == pytest.approx(100.0)  # 60 ms is 60 ms
    assert first_frame_floor_ms(4, 960) == pytest.approx(220.0)
    assert first_frame_floor_ms(1, 1280) == pytest.approx(120.0)  # an 80 ms checkpoint
    assert first_frame_floor_ms(24, 0) == pytest.approx(960.0)


def test_deadline_misses_from_first_frame():
    # Frame 2 is due at 0.1 + 2*0.04 = 0.18 s and arrives at 0.2 s: one miss, 20 ms late.
    rate, late = deadline_misses([0.1, 0.14, 0.2])
    assert rate == pytest.approx(1 / 3) and late == pytest.approx(20.0)
    assert deadline_misses([0.5, 0.5, 0.5, 0.5]) == (0.0, 0.0)  # early frames are fine
    assert deadline_misses([]) == (0.0, 0.0)


def test_paced_audio_is_paced_and_ffd_is_floor_plus_compute(micro_backend):
    t = FakeTime()
    backend = TimedBackend(micro_backend, t, MS)
    avatar = prepare_avatar(None, MICRO.render.resolution)
    sched = StreamScheduler(backend, avatar, clock=t.clock)
    frames = 20
    pcm = speechlike(frames * SAMPLES_PER_FRAME / 16000)
    t.now = 100.0  # wall time 0 of the stream is whenever it starts
    run = paced_run(sched, pcm, piece_ms=20, clock=t.clock, sleep=t.sleep)
    c, floor = MICRO.chunk, first_frame_floor_ms(MICRO.chunk, MICRO.lookahead_samples)
    per_chunk = MS["audio"] + MS["generator"] + MS["decoder"]
    assert run.frames == frames
    # The first chunk can only start once its C frames and the lookahead have arrived.
    assert floor == pytest.approx(c * 40 + 60)
    assert run.ffd_ms == pytest.approx(floor + per_chunk)
    # where FFD - floor went: the first chunk's calls, as the scheduler timed them
    assert run.first_chunk_ms == pytest.approx(
        {"audio": MS["audio"], "generator": MS["generator"], "decoder": MS["decoder"], "convert": 0}
    )
    assert run.wall_s >= frames * 0.04  # the stream took (at least) its media time
    assert len(t.sleeps) >= frames  # it waited for the audio, piece by piece
    # Constant compute well under real time: every frame on time; RTF = compute / media.
    assert run.misses() == (0.0, 0.0)
    assert run.rtf == pytest.approx((frames // c) * per_chunk / 1000.0 / (frames * 0.04))
    # Frames of chunk k arrive when its audio (and lookahead) has arrived, plus compute.
    for i in range(0, frames - c - 2, c):
        assert run.arrivals[i] == pytest.approx(i * 0.04 + (floor + per_chunk) / 1000)


class DriftingBackend(TimedBackend):
    """A machine that slows down as time passes: each call costs (1 + elapsed seconds) times
    its nominal time, as this VM's speed drifts under its neighbours."""

    def run(self, module, inputs):
        self.t.now += self.ms.get(module, 0.0) * self.t.now / 1000.0  # the drift on top
        return super().run(module, inputs)


def test_interleaving_keeps_ratios_on_a_drifting_machine(micro_backend):
    """Backend b costs twice what a costs per call. Measured one after the other, b runs later,
    on a slower machine, and looks far worse than 2x; interleaved chunk by chunk, both see the
    same machine and the ratio is the true one."""
    avatar = prepare_avatar(None, 32)
    pcm = speechlike(1.0)
    settings = Settings(seconds=1.0, repeats=2, warmup_seconds=0.2)
    fast = {k: v for k, v in MS.items()}
    slow = {k: 2 * v for k, v in MS.items()}

    t = FakeTime()
    a, b = DriftingBackend(micro_backend, t, fast), DriftingBackend(micro_backend, t, slow)
    apart = [measure(x, avatar, pcm, settings, clock=t.clock, sleep=t.sleep) for x in (a, b)]
    t = FakeTime()
    a, b = DriftingBackend(micro_backend, t, fast), DriftingBackend(micro_backend, t, slow)
    together = measure_group([a, b], avatar, pcm, settings, clock=t.clock, sleep=t.sleep)

    assert [r["interleaved_with"] for r in apart] == [0, 0]
    assert [r["interleaved_with"] for r in together] == [1, 1]
    ratio_apart = apart[0]["fps"] / apart[1]["fps"]
    ratio_together = together[0]["fps"] / together[1]["fps"]
    assert ratio_apart > 2.3, ratio_apart  # the drift, taken for a difference between them
    assert ratio_together == pytest.approx(2.0, rel=0.02), ratio_together
    for rec in together:  # every frame of every stream, each module timed per backend
        assert rec["frames"] == 25 and rec["modules"]["generator"]["calls"] == 2 * 13
    assert together[1]["modules"]["audio"]["p50_ms"] > together[0]["modules"]["audio"]["p50_ms"]


def test_interleaved_schedulers_must_share_a_chunk(micro_backend):
    from edgetalk.benchmarks.measure import interleaved_throughput

    avatar = prepare_avatar(None, 32)
    other = type(micro_backend)(micro_backend.model, micro_backend.cfg.with_streaming(chunk=1))
    scheds = [StreamScheduler(b, avatar) for b in (micro_backend, other)]
    with pytest.raises(ValueError, match="share one chunk size"):
        interleaved_throughput(scheds, speechlike(0.2))


def test_bench_interleave_groups_by_streaming_config(micro_ckpt, tmp_path, capsys):
    out = tmp_path / "i.json"
    args = ["bench", "--checkpoint", micro_ckpt, "--backend", "torch,torch:bf16"]
    args += ["--chunk", "1,2", *QUICK, "--interleave", "--json", out]
    code, text, _ = run_cli(args, capsys)
    assert code == 0
    assert text.count("(interleaved)") >= 2  # one group per chunk size
    report = load_report(out)
    assert validate(report) == []
    rows = {r["label"]: r for r in report["results"]}
    assert set(rows) == {"torch fp32 c1", "torch bf16 c1", "torch fp32 c2", "torch bf16 c2"}
    assert all(r["interleaved_with"] == 1 for r in rows.values())
    assert rows["torch bf16 c2"]["speedup_vs_torch"] == pytest.approx(
        rows["torch bf16 c2"]["fps"] / rows["torch fp32 c2"]["fps"], rel=1e-3
    )
    # each run over the reference's run beside it: as many ratios as runs, the headline within
    for label in ("torch bf16 c1", "torch bf16 c2"):
        row, ref = rows[label], rows[label.replace("bf16", "fp32")]
        spread = row["speedup_spread"]
        runs = zip(row["spread"]["fps"]["values"], ref["spread"]["fps"]["values"], strict=True)
        assert spread["values"] == [round(a / b, 4) for a, b in runs]
        assert spread["min"] <= spread["median"] <= spread["max"]
    assert "speedup_spread" not in rows["torch fp32 c1"]  # the reference itself
    assert "× torch run by run" in text


def test_paired_speedups_only_for_runs_side_by_side():
    """The run-by-run ratios exist only where each run had its reference's run beside it."""
    from edgetalk.benchmarks.suite import paired_speedups

    def row(values, interleaved=1):
        return {"spread": {"fps": {"values": values}}, "interleaved_with": interleaved}

    got = paired_speedups(row([12.0, 15.0, 13.0]), row([10.0, 10.0, 10.0]))
    assert got == {"min": 1.2, "median": 1.3, "max": 1.5, "values": [1.2, 1.5, 1.3]}
    assert paired_speedups(row([12.0], 0), row([10.0], 0)) is None  # runs seconds apart
    assert paired_speedups(row([12.0, 13.0]), row([10.0])) is None  # nothing to pair


def test_late_chunks_count_as_deadline_misses(micro_backend):
    t = FakeTime()
    backend = TimedBackend(micro_backend, t, MS, slow_after=1)
    sched = StreamScheduler(backend, prepare_avatar(None, 32), clock=t.clock)
    run = paced_run(sched, speechlike(0.8), clock=t.clock, sleep=t.sleep)
    rate, late = run.misses()
    assert rate > 0.5 and late >= 100.0 - 1e-6


def test_measure_numbers_with_a_known_clock(micro_backend):
    t = FakeTime()
    backend = TimedBackend(micro_backend, t, MS)
    avatar = prepare_avatar(None, 32)
    pcm = speechlike(1.0)
    settings = Settings(seconds=1.0, repeats=2, warmup_seconds=0.2)
    rec = measure(backend, avatar, pcm, settings, clock=t.clock, sleep=t.sleep)
    per_chunk = (MS["audio"] + MS["generator"] + MS["decoder"]) / 1000
    assert rec["frames"] == 25
    # 25 frames at C=2 is 13 calls (the last one, in flush, renders one frame).
    assert rec["fps"] == pytest.approx(25 / (13 * per_chunk), rel=1e-3)
    assert rec["first_frame_floor_ms"] == pytest.approx(MICRO.chunk * 40 + 60)
    assert rec["first_frame_delay_ms"] == pytest.approx(
        rec["first_frame_floor_ms"] + 1000 * per_chunk, abs=1e-3
    )
    assert rec["rtf"] == pytest.approx(13 * per_chunk / 1.0, rel=1e-3)
    first = rec["first_chunk_ms"]
    assert set(first) == {"audio", "generator", "decoder", "convert", "other"}
    for module in ("audio", "generator", "decoder"):
        assert first[module] == pytest.approx(MS[module])
    assert first["other"] == pytest.approx(0.0, abs=1e-3)  # nothing else takes time here
    assert rec["deadline_miss_rate"] == 0.0
    for module in ("audio", "generator", "decoder", "appearance"):
        assert rec["modules"][module]["p50_ms"] == pytest.approx(MS[module])
        assert rec["modules"][module]["p95_ms"] == pytest.approx(MS[module])
    assert rec["modules"]["generator"]["calls"] == 2 * 13  # throughput runs only, no warm-up
    assert rec["modules"]["decoder"]["per_frame_p50_ms"] == pytest.approx(MS["decoder"] / 2)
    assert rec["spread"]["fps"]["values"] == [rec["fps"]] * 2
    assert rec["peak_rss_mb"] > 0


def test_real_paced_run_takes_media_time(micro_backend):
    import time

    sched = StreamScheduler(micro_backend, prepare_avatar(None, 32))
    t0 = time.perf_counter()
    run = paced_run(sched, speechlike(0.4))
    assert time.perf_counter() - t0 >= 0.4 - 1e-3
    assert run.wall_s >= 0.4 - 1e-3
    assert run.ffd_ms >= first_frame_floor_ms(MICRO.chunk, MICRO.lookahead_samples)


# ---- the CLI end to end ----------------------------------------------------------------------
def test_bench_json_validates_and_holds_every_field(bench_run):
    path, _ = bench_run
    data = json.loads(path.read_text())
    assert validate(data) == []
    assert load_report(path)["device"]["name"] == "laptop"
    results = data["results"]
    assert [(r["backend"], r["precision"], r["chunk"]) for r in results] == [
        ("torch", "fp32", 1),
        ("torch", "fp32", 2),
    ]
    dev = data["device"]
    assert dev["gemm_peak_gflops"]["cpu"] > 0 and dev["cores_logical"] >= 1
    assert "torch" in dev["versions"]
    for r in results:
        assert r["lookahead_ms"] == 60 and r["resolution"] == 32
        assert r["first_frame_floor_ms"] == pytest.approx(r["chunk"] * 40 + 60)
        assert r["first_frame_delay_ms"] >= r["first_frame_floor_ms"]
        assert r["frames"] == 25 and r["fps"] > 0 and r["rtf"] > 0
        assert 0 <= r["deadline_miss_rate"] <= 1
        assert set(r["modules"]) >= {"appearance", "audio", "generator", "decoder", "convert"}
        assert r["flops_per_frame"] > 0
        assert r["gflops"] == pytest.approx(r["flops_per_frame"] * r["fps"] / 1e9, rel=1e-3)
        assert r["fraction_of_peak"] == pytest.approx(
            r["gflops"] / dev["gemm_peak_gflops"]["cpu"], rel=1e-3
        )
        assert r["bundle_bytes"] > 0  # the checkpoint's size
        assert r["peak_rss_mb"] > 0
        # torch eager fp32 is its own reference
        assert r["reference"] and r["speedup_vs_torch"] == 1.0


def test_the_allocator_setting_is_recorded(bench_run):
    data = json.loads(bench_run[0].read_text())
    said = data["settings"]["allocator"]
    assert said in data["notes"]
    assert said == "allocator as the system has it (EDGETALK_BENCH_ALLOCATOR=system)"


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_bench_fixes_glibcs_thresholds_unless_the_user_set_them():
    """In a process of its own, as `edgetalk bench` runs: mallopt takes both thresholds; a
    user's MALLOC_* variable, or EDGETALK_BENCH_ALLOCATOR=system, leaves the allocator alone."""
    code = "from edgetalk.benchmarks.allocator import steady_allocator; print(steady_allocator())"
    base = {k: v for k, v in os.environ.items() if k != "EDGETALK_BENCH_ALLOCATOR"}

    def said(**env):
        r = subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert said().startswith("glibc malloc fixed for the run: blocks mapped from 32 MB")
    assert said(MALLOC_TRIM_THRESHOLD_="1000000") == ("allocator as set by MALLOC_TRIM_THRESHOLD_")
    assert said(EDGETALK_BENCH_ALLOCATOR="system").endswith("(EDGETALK_BENCH_ALLOCATOR=system)")


def test_schema_catches_broken_records(bench_run, tmp_path):
    data = json.loads(bench_run[0].read_text())
    assert SCHEMA["properties"]["results"]["items"]["properties"]["fps"]["description"]
    bad = copy.deepcopy(data)
    del bad["results"][0]["fps"]
    bad["results"][1]["deadline_miss_rate"] = 1.5
    bad["results"][1]["modules"]["decoder"]["p50_ms"] = "fast"
    problems = validate(bad)
    assert any("missing 'fps'" in p for p in problems)
    assert any("deadline_miss_rate" in p and "maximum" in p for p in problems)
    assert any("decoder.p50_ms" in p for p in problems)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(InputError, match="does not match the bench schema"):
        load_report(f)


def test_plots_are_pngs(bench_run):
    _, plots = bench_run
    for name in ("ffd_vs_fps.png", "module_latency.png"):
        p = plots / name
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_merges_devices(bench_run, tmp_path, capsys):
    path, _ = bench_run
    data = json.loads(path.read_text())
    other = copy.deepcopy(data)
    other["device"]["name"] = "edge-box"
    for r in other["results"]:
        r["fps"] *= 2
    b = tmp_path / "b.json"
    b.write_text(json.dumps(other))
    out, plots = tmp_path / "report.md", tmp_path / "plots"
    code, stdout, _ = run_cli(["bench", "report", path, b, "--out", out, "--plots", plots], capsys)
    assert code == 0
    table = out.read_text()
    assert "| device" in table
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| laptop") or line.startswith("| edge-box")
    ]
    # one device table row each, plus one result row per configuration each
    assert sum(r.startswith("| laptop") for r in rows) == 1 + len(data["results"])
    assert sum(r.startswith("| edge-box") for r in rows) == 1 + len(data["results"])
    assert "edge-box" in stdout
    for name in ("ffd_vs_fps.png", "module_latency.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG"


def test_report_rejects_malformed_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "edgetalk-bench", "results": [')
    code, _, err = run_cli(["bench", "report", bad], capsys)
    assert code == 2 and "not valid JSON" in err and str(bad) in err
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    code, _, err = run_cli(["bench", "report", other], capsys)
    assert code == 2 and "not an edgetalk bench report" in err
    code, _, err = run_cli(["bench", "report", tmp_path / "nope.json"], capsys)
    assert code == 2 and "not found" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bundle", "/no/such/bundle"], "bundle not found: /no/such/bundle"),
        (["--backend", "warp-drive"], "unknown backend 'warp-drive'; known backends:"),
        (["--export", "tflite:int8"], "unknown export target 'tflite'"),
        (["--export", "onnx:int3"], "unknown precision 'int3'"),
        (["--backend", "torch", "--chunk", "0"], "--chunk values must be 1..64"),
        (["--backend", "torch", "--chunk", "1,999"], "--chunk values must be 1..64; got 999"),
        (["--backend", "torch", "--chunk", "a,b"], "--chunk takes whole numbers"),
        (["--backend", "torch", "--repeats", "0"], "argument --repeats: must be 1..1000, got 0"),
        (["--backend", "torch:int8"], "the torch backend runs fp32, bf16"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--checkpoint", "/no/such.safetensors"], "checkpoint not found"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys):
    code, _, err = run_cli(["bench", *args, "--seconds", "1"], capsys)
    assert code == 2
    assert err.startswith("edgetalk bench: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_bundle_only_backend_points_to_export(micro_ckpt):
    need("onnxruntime", "the onnx extra is not installed")
    with pytest.raises(EdgeTalkError, match="--export onnx:fp32"):
        make_plan(Request(checkpoint=micro_ckpt, backends=["onnxruntime"]))


def test_parse_chunks():
    assert parse_chunks("1,4, 24,4") == [1, 4, 24]


# ---- plans: references, presets, bundles -----------------------------------------------------
def test_plan_preset_adds_nothing_heavy():
    plan = make_plan(Request(preset="large", backends=["torch", "torch:bf16"], chunks=[1, 4]))
    labels = [c.label for c in plan.configs]
    assert labels == ["torch fp32 c1", "torch bf16 c1", "torch fp32 c4", "torch bf16 c4"]
    assert all(c.cfg.name == "large" and "random weights" in c.source for c in plan.configs)
    assert [c.reference for c in plan.configs] == [True, False, True, False]


def test_bf16_alone_gets_an_fp32_reference(micro_ckpt):
    plan = make_plan(Request(checkpoint=micro_ckpt, backends=["torch:bf16"], chunks=[2]))
    assert [(c.label, c.reference) for c in plan.configs] == [
        ("torch fp32 c2", True),
        ("torch bf16 c2", False),
    ]


@pytest.fixture(scope="module")
def exported(micro_ckpt, tmp_path_factory):
    """bench --export onnx:fp32 at chunk 2 into a cache dir (one real export, then a bench)."""
    need("onnxruntime", "the onnx extra is not installed")
    root = tmp_path_factory.mktemp("bundles")
    out = root / "x.json"
    args = ["bench", "--checkpoint", micro_ckpt, "--export", "onnx:fp32", "--chunk", "2", *QUICK]
    args += ["--cache-dir", root / "bench", "--json", out]
    assert main([str(a) for a in args]) == 0
    return root, json.loads(out.read_text())


def test_export_sweep_runs_bundles_against_torch(exported):
    root, data = exported
    assert validate(data) == []
    by = {(r["backend"], r["chunk"]): r for r in data["results"]}
    assert set(by) == {("torch", 2), ("onnxruntime", 2)}
    ort, ref = by[("onnxruntime", 2)], by[("torch", 2)]
    assert ort["chunk_fixed"] and not ort["reference"] and ort["target"] == "onnx"
    assert ort["bundle_bytes"] > 0 and ort["source"].startswith(str(root / "bench"))
    assert ort["speedup_vs_torch"] == pytest.approx(ort["fps"] / ref["fps"], rel=1e-3)
    assert ref["speedup_vs_torch"] == 1.0


def test_export_is_reused_and_bundles_are_discovered(exported, micro_ckpt):
    root, _ = exported
    logs = []
    req = Request(
        checkpoint=micro_ckpt, exports=["onnx:fp32"], chunks=[2], cache_dir=root / "bench"
    )
    plan = make_plan(req, log=logs.append)
    assert any("reusing" in line for line in logs)
    assert [c.backend for c in plan.configs] == ["torch", "onnxruntime"]
    # No backend flags: torch plus every bundle found under the bundles root.
    plan = make_plan(Request(checkpoint=micro_ckpt, bundles_root=root))
    assert sorted(c.label for c in plan.configs) == ["onnxruntime fp32 c2", "torch fp32 c2"]
    # --bundle DIR, with a --chunk it cannot follow: noted, and run at its own chunk.
    bundle = root / "bench" / "micro-onnx-fp32-c2"
    plan = make_plan(Request(checkpoint=micro_ckpt, bundles=[bundle], chunks=[1]))
    assert any("fixed at 2" in n for n in plan.notes)
    assert [c.cfg.chunk for c in plan.configs] == [2, 2]


def test_loop_audio_is_trimmed_to_whole_frames():
    from edgetalk.benchmarks.measure import bench_audio

    pcm = bench_audio(30.0)  # longer than the embedded sentence: looped
    assert pcm.shape == (750 * SAMPLES_PER_FRAME,) and pcm.dtype == np.float32
    assert bench_audio(0.01).shape == (SAMPLES_PER_FRAME,)


# ---- optional dependencies, CUDA names, references kept, threads and load -------------------
def test_missing_psutil_is_one_line_naming_the_extra(monkeypatch, micro_ckpt, capsys):
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if `pip install edgetalk` alone
    code, _, err = run_cli(["bench", "--checkpoint", micro_ckpt, "--backend", "torch"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "psutil" in err and "pip install 'edgetalk[bench]'" in err


def test_missing_matplotlib_only_matters_for_plots(monkeypatch, tmp_path, capsys):
    from edgetalk.benchmarks.deps import MissingExtra
    from edgetalk.benchmarks.memory import PeakMemory
    from edgetalk.benchmarks.plots import _pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = ["bench", "--preset", "tiny", "--backend", "torch", "--plots", tmp_path / "p"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "matplotlib" in err and "edgetalk[bench]" in err
    with pytest.raises(MissingExtra, match=r"edgetalk\[bench\]"):
        _pyplot()
    monkeypatch.setitem(sys.modules, "psutil", None)
    with pytest.raises(MissingExtra, match="psutil"):
        PeakMemory()


def test_cuda_backend_by_name(monkeypatch, micro_ckpt, capsys):
    import torch

    from edgetalk.runtime_cuda.backend_cuda import CudaBackend

    if not torch.cuda.is_available():  # here: one line saying why, not a parser refusal
        code, _, err = run_cli(
            ["bench", "--checkpoint", micro_ckpt, "--backend", "cuda:fp16"], capsys
        )
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "backend 'cuda' cannot run here" in err and "CUDA" in err
    # Where it can run, cuda:fp16 is planned (with its torch reference), not refused.
    monkeypatch.setattr(CudaBackend, "availability", classmethod(lambda cls: (True, "")))
    plan = make_plan(Request(checkpoint=micro_ckpt, backends=["cuda:fp16"], chunks=[2]))
    assert [(c.label, c.precision, c.reference) for c in plan.configs] == [
        ("torch fp32 c2", "fp32", True),
        ("cuda fp16 c2", "fp16", False),
    ]


def test_failed_export_keeps_the_torch_reference(monkeypatch, micro_ckpt, tmp_path):
    from edgetalk.export import pipeline

    def fail(*a, **k):
        raise EdgeTalkError("appearance: parity failed")

    monkeypatch.setattr(pipeline, "export_bundle", fail)
    req = Request(checkpoint=micro_ckpt, exports=["onnx:int8"], chunks=[1, 2], cache_dir=tmp_path)
    plan = make_plan(req, log=lambda s: None)
    assert [(c.label, c.reference) for c in plan.configs] == [
        ("torch fp32 c1", True),
        ("torch fp32 c2", True),
    ]
    assert [s["config"] for s in plan.skipped] == ["export onnx:int8 c1", "export onnx:int8 c2"]


def test_busy_load_runs_only_while_inside():
    from edgetalk.benchmarks.load import BusyLoad

    with BusyLoad(2) as load:
        procs = list(load.procs)
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_threads_and_load_in_one_run(micro_ckpt, tmp_path):
    out = tmp_path / "t.json"
    args = ["bench", "--checkpoint", micro_ckpt, "--backend", "torch", "--chunk", "2"]
    args += ["--seconds", "0.5", "--repeats", "1", "--warmup", "0", "--json", out]
    args += ["--threads", "1,2", "--load", "1"]
    assert main([str(a) for a in args]) == 0
    data = json.loads(out.read_text())
    assert validate(data) == []
    rows = {(r["threads"], r["load"]): r for r in data["results"]}
    assert set(rows) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    for t in (1, 2):
        quiet, loaded = rows[(t, 0)], rows[(t, 1)]
        assert "fps_vs_quiet" not in quiet
        # the report rounds the ratio to 4 decimals: a collapse under load (torch at two threads
        # beside a busy process can keep under 5% of its FPS) makes that more than 1e-3 of it
        assert loaded["fps_vs_quiet"] == pytest.approx(loaded["fps"] / quiet["fps"], abs=5.1e-5)
        assert loaded["label"] == f"torch fp32 c2 t{t} load1"


@pytest.mark.parametrize(
    "module, backend, extra", [("onnxruntime", "onnxruntime", "ort"), ("mlx", "mlx", "mlx")]
)
def test_missing_backend_library_names_its_extra(monkeypatch, micro_ckpt, module, backend, extra):
    from edgetalk.errors import BackendUnavailable

    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(BackendUnavailable, match=rf"pip install 'edgetalk\[{extra}\]'"):
        make_plan(Request(checkpoint=micro_ckpt, backends=[backend], chunks=[2]))


def test_rounds_merge_every_run_of_every_round():
    from edgetalk.benchmarks.suite import merge_rounds

    def rec(fps_values, ffd_values, rss):
        spread = {
            "fps": {"values": fps_values},
            "first_frame_delay_ms": {"values": ffd_values},
            "rtf": {"values": [0.5] * len(fps_values)},
            "deadline_miss_rate": {"values": [0.0] * len(fps_values)},
        }
        return {"fps": float(np.median(fps_values)), "spread": spread, "peak_rss_mb": rss}

    merged = merge_rounds(
        [rec([10, 12], [300, 310], 1), rec([30, 34], [200, 220], 2), rec([20, 21], [250, 260], 3)]
    )
    assert merged["fps"] == 20.5 and merged["first_frame_delay_ms"] == 255.0
    assert sorted(merged["spread"]["fps"]["values"]) == [10, 12, 20, 21, 30, 34]
    assert merged["rounds"] == 3 and merged["peak_rss_mb"] == 3  # the median-fps round's
    single = rec([5], [100], 9)
    assert merge_rounds([single]) is single


def test_rounds_run_the_plan_round_robin(micro_ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["bench", "--checkpoint", micro_ckpt, "--backend", "torch", "--chunk", "1,2"]
    args += ["--seconds", "0.3", "--repeats", "1", "--warmup", "0", "--json", out, "--rounds", "2"]
    assert main([str(a) for a in args]) == 0
    log = capsys.readouterr().out
    order = [
        line.split("] ")[1].split(" (")[0] for line in log.splitlines() if line.startswith("[")
    ]
    assert order == [
        "torch fp32 c1 round 1/2",
        "torch fp32 c2 round 1/2",
        "torch fp32 c1 round 2/2",
        "torch fp32 c2 round 2/2",
    ]
    data = json.loads(out.read_text())
    assert validate(data) == []
    assert [r["rounds"] for r in data["results"]] == [2, 2]
    assert all(len(r["spread"]["fps"]["values"]) == 2 for r in data["results"])


def test_rounds_out_of_range_is_one_line(micro_ckpt, capsys):
    assert main(["bench", "--checkpoint", str(micro_ckpt), "--rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert "argument --rounds: must be 1..20, got 0" in err and "Traceback" not in err


def test_device_peak_is_every_core_and_threads_are_what_rows_run(monkeypatch):
    """The header's threads are those the rows without their own ran with (not torch's default
    on import), and the cpu peak is measured on every core, leaving torch's threads as found."""
    import torch

    from edgetalk.benchmarks import device as device_mod
    from edgetalk.runtime.threads import set_threads

    seen = []
    monkeypatch.setattr(
        device_mod, "measure_peaks", lambda *a: seen.append(torch.get_num_threads()) or {"cpu": 1.0}
    )
    before = torch.get_num_threads()
    set_threads(1)
    try:
        d = device_mod.device_info("x")
    finally:
        set_threads(None)
    assert d["threads"] == 1 and seen == [os.cpu_count()]
    assert torch.get_num_threads() == before


# ---- --overlap: throughput as `edgetalk run` renders a file ------------------------------------
def sleepy(micro_backend, calls=None):
    """The micro model with a 30 ms decoder and a 20 ms generator a chunk (sleeps, so the
    figures hold on a loaded machine): 50 ms a chunk in turn, about 30 overlapped. `calls`
    collects (backend, start, end) of every call."""
    import time

    from edgetalk.runtime.backend_torch import TorchBackend

    class Sleepy(TorchBackend):
        def run(self, module, inputs):
            t0 = time.perf_counter()
            time.sleep({"decoder": 0.03, "generator": 0.02}.get(module, 0.0))
            out = super().run(module, inputs)
            if calls is not None:
                calls.append((id(self), t0, time.perf_counter()))
            return out

    return Sleepy(micro_backend.model)


def test_overlap_throughput_decodes_beside_the_next_chunk(micro_backend):
    import dataclasses

    avatar = prepare_avatar(None, 32)
    pcm = speechlike(1.0)
    settings = Settings(seconds=1.0, repeats=1, warmup_seconds=0.2)
    overlap = dataclasses.replace(settings, overlap=True)
    serial = measure(sleepy(micro_backend), avatar, pcm, settings)
    alone = measure(sleepy(micro_backend), avatar, pcm, overlap)
    assert alone["frames"] == serial["frames"] == 25
    assert alone["fps"] > 1.3 * serial["fps"], (alone["fps"], serial["fps"])  # ~1.6x
    # Interleaved: turns of OVERLAP_TURN chunks, each configuration's last decoder finished
    # within its own turn, so no call of one runs while the other's turn is timed.
    calls: list = []
    pair = [sleepy(micro_backend, calls), sleepy(micro_backend, calls)]
    together = measure_group(pair, avatar, pcm, overlap)
    for rec in together:
        assert rec["frames"] == 25 and rec["modules"]["decoder"]["calls"] == 13
        assert rec["fps"] > 1.2 * serial["fps"], (rec["fps"], serial["fps"])  # ~1.4x
    a, b = ([(t0, t1) for who, t0, t1 in calls if who == id(x)] for x in pair)
    assert not [(x, y) for x in a for y in b if x[0] < y[1] and y[0] < x[1]]


def test_bench_overlap_follows_runs_spare_core_rule(micro_ckpt, tmp_path, capsys, monkeypatch):
    """On 2 cores, one thread overlaps (a core each) and two do not (as `edgetalk run`): each row
    says which it did, and the log says why."""
    from edgetalk.runtime import threads

    monkeypatch.setattr(threads, "cpu_count", lambda: 2)
    out = tmp_path / "o.json"
    args = ["bench", "--checkpoint", micro_ckpt, "--backend", "torch", *QUICK, "--overlap"]
    code, text, _ = run_cli([*args, "--threads", "1,2", "--json", out], capsys)
    assert code == 0
    report = load_report(out)
    assert validate(report) == [] and report["settings"]["overlap"] is True
    rows = {r["threads"]: r for r in report["results"]}
    assert rows[1]["overlapped"] is True and rows[2]["overlapped"] is False
    assert "no cores to spare at 2 threads, not overlapped" in text


def test_bench_overlap_is_recorded_and_said(micro_ckpt, tmp_path, capsys, monkeypatch):
    from edgetalk.runtime import threads

    monkeypatch.setattr(threads, "cpu_count", lambda: 2)  # one thread by default, a core spare
    out = tmp_path / "o.json"
    args = ["bench", "--checkpoint", micro_ckpt, "--backend", "torch", *QUICK, "--overlap"]
    code, text, _ = run_cli([*args, "--json", out], capsys)
    assert code == 0
    assert "(decoder overlapped)" in text and "overlapped (--overlap)" in text
    report = load_report(out)
    assert validate(report) == [] and report["settings"]["overlap"] is True
