"""Shared fixtures: small seeded models and audio/image files made on the fly (nothing downloaded)."""

from __future__ import annotations

import dataclasses
import importlib
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from edgetalk.models.config import AudioConfig, GeneratorConfig, ModelConfig, RenderConfig
from edgetalk.models.edgetalk import EdgeTalkModel
from edgetalk.runtime.backend_torch import TorchBackend

# Set by .ci/run. The README's test command installs every test dependency, so on CI a missing one is
# a failure, never a skip that hides it; on a developer's machine the same tests skip with the reason.
ON_CI = bool(os.environ.get("EDGETALK_CI"))
# bench fixes glibc's malloc thresholds for its process (benchmarks/allocator.py); tests run bench
# inside pytest's process, whose other tests should keep the system's allocator
os.environ.setdefault("EDGETALK_BENCH_ALLOCATOR", "system")


def as_from_a_terminal() -> None:
    """preexec_fn for a child that a test stops with SIGINT: SIGINT back to its default, as in a
    terminal. A shell without job control starts background jobs (`.ci/run &`) with SIGINT
    ignored, children inherit that, and Python then installs no KeyboardInterrupt handler: the
    test's Ctrl-C would be lost, not the program's."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def need(module: str, reason: str):
    """pytest.importorskip, except that on CI the import error fails the test."""
    if ON_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


def skip_or_fail(reason: str):
    """A missing tool or a dependency that does not work: a skip here, a failure on CI."""
    if ON_CI:
        pytest.fail(f"{reason} (on CI every test dependency must be present and working)")
    pytest.skip(reason)


# A very small member of the family: same code paths, shapes small enough for long streams.
MICRO = ModelConfig(
    name="micro",
    chunk=2,
    audio=AudioConfig(n_mels=16, hidden=16, conv_layers=2, kernel=3, token_dim=16),
    generator=GeneratorConfig(dim=32, layers=2, heads=2, steps=2, window=4),
    render=RenderConfig(resolution=32, app_channels=8, hidden=8, flow_blocks=1, refine_channels=4),
)
# MICRO at chunk 1 and 64 px: an ONNX export of it holds the frame in row bands as well.
BANDED = dataclasses.replace(
    MICRO, chunk=1, render=dataclasses.replace(MICRO.render, resolution=64)
)


def seeded_model(cfg: ModelConfig, seed: int = 0) -> EdgeTalkModel:
    torch.manual_seed(seed)
    model = EdgeTalkModel(cfg).eval()
    # Give the zero-initialised output layers weights so every path carries signal in tests.
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.01)
        # Non-trivial motion statistics, so normalisation is exercised.
        model.generator.motion_mean.normal_(0, 0.1)
        model.generator.motion_std.uniform_(0.05, 0.5)
    return model


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    """The seeded micro model saved as a checkpoint file, for commands that take --checkpoint."""
    from edgetalk.models.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ck") / "micro.safetensors"
    save_checkpoint(seeded_model(MICRO), path)
    return path


@pytest.fixture
def micro_backend() -> TorchBackend:
    return TorchBackend(seeded_model(MICRO))


def speechlike(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Voiced bursts separated by pauses: a cheap stand-in for speech with silences."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 6))
    envelope = (np.sin(2 * np.pi * 2.5 * t) > -0.2).astype(np.float32)
    noise = rng.standard_normal(t.shape) * 0.02
    return (0.3 * voice * envelope + noise * envelope).astype(np.float32)


@pytest.fixture
def wav_file(tmp_path):
    def make(seconds=1.2, rate=16000, channels=1, name="speech.wav", seed=0):
        x = speechlike(seconds, seed, rate)
        if channels > 1:
            x = np.stack([x] * channels, axis=1)
        path = tmp_path / name
        sf.write(path, x, rate)
        return path

    return make


def av_ends(path) -> tuple[int, float, float]:
    """(video frames, end of the picture, end of the sound) in seconds, from decoding the file.

    Ends, not durations: a live recording is a fragmented mp4 with no edit list, so its audio
    starts with the AAC encoder's priming and its video with the B-frame delay; players keep both
    on one clock, and sound and picture in sync end together."""
    import av

    with av.open(str(path)) as c:
        vf = [f for f in c.decode(c.streams.video[0])]
    with av.open(str(path)) as c:
        af = [f for f in c.decode(c.streams.audio[0])]
    v_end = float(vf[-1].pts * vf[-1].time_base) + 1 / 25 if vf else 0.0
    a_end = float((af[-1].pts + af[-1].samples) * af[-1].time_base) if af else 0.0
    return len(vf), v_end, a_end


# ---- CPU steal --------------------------------------------------------------------------------
# On a shared VM the hypervisor can take a large share of the CPU ("steal"): measured 40-58 % of
# both cores during the browser tests on this project's 2-core VM in session 13, when a chunk
# took 0.5 s instead of 0.16 s. Speed floors and receiver-side A/V figures judged then measure the
# hypervisor, not EdgeTalk: above STEAL_LIMIT the tests print the figures and the steal, and
# judge only what does not depend on speed. Everything else stays asserted.
STEAL_LIMIT = 0.25


def _cpu_ticks() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    steal = fields[7] if len(fields) > 7 else 0
    return steal, sum(fields[:8])  # guest time is already counted in user


class StealMeter:
    """The share of CPU time the hypervisor took from this machine since it was made."""

    def __init__(self):
        self.start = _cpu_ticks()

    def share(self) -> float:
        end = _cpu_ticks()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return 0.0  # not Linux, or no time passed: nothing known to excuse
        return (end[0] - self.start[0]) / (end[1] - self.start[1])

    def speed_judged(self, what: str) -> bool:
        """True when the machine had its CPU; else prints why `what` is reported, not judged."""
        share = self.share()
        if share <= STEAL_LIMIT:
            return True
        print(
            f"\n{what}: reported, not judged: the hypervisor took {share:.0%} of the CPU during "
            f"this test (limit {STEAL_LIMIT:.0%})"
        )
        return False


# ---- slow CPUs ----------------------------------------------------------------------------------
# The live tests' FPS floors were set on the AMD EPYC CI-class VM, where the shipped model streams
# at 39 FPS through torch eager (chunk 4, one thread: the 2-core default; README, Benchmarks). The
# VM behind CI changes class: on a first-generation EPYC (Zen 1) the same stream runs at 20-25 FPS,
# and the browser test's 11 FPS floor failed at 8.3 with nothing in EdgeTalk slow. So a floor that
# is missed is judged once more against this machine's own speed: scaled by its measured capacity
# over REFERENCE_FPS (lower only, never raised). A stalled or half-speed stream fails anywhere.
REFERENCE_FPS = 35.0


def machine_capacity_fps(seconds: float = 2.0) -> float:
    """The shipped model's throughput here: torch eager, chunk 4, default threads, no pacing
    (`edgetalk bench`'s throughput run on the embedded avatar)."""
    from edgetalk.benchmarks.measure import bench_audio, throughput_run
    from edgetalk.runtime.avatar import prepare_avatar
    from edgetalk.runtime.loader import open_backend
    from edgetalk.runtime.scheduler import StreamScheduler

    be = open_backend(chunk=4)
    avatar = prepare_avatar(None, be.cfg.render.resolution)
    warm = StreamScheduler(be, avatar)
    throughput_run(warm, bench_audio(0.5))
    warm.close()
    sched = StreamScheduler(be, avatar)
    run = throughput_run(sched, bench_audio(seconds))
    sched.close()
    return run.fps


def floor_for_this_machine(measured: float, floor: float, what: str) -> float:
    """`floor` when `measured` reaches it; else the floor scaled to this machine's capacity
    (printed, with the capacity), which the caller asserts against."""
    return _bound_for_this_machine(measured, floor, what, ceiling=False)


def ceiling_for_this_machine(measured: float, ceiling: float, what: str) -> float:
    """For a duration that must stay under `ceiling` (a stall): the same, the ceiling stretched
    (never shrunk) by how much slower than REFERENCE_FPS this machine is. Too slow for real time,
    the pacer raises the delay, and the picture pauses that long once."""
    return _bound_for_this_machine(measured, ceiling, what, ceiling=True)


def _bound_for_this_machine(measured: float, bound: float, what: str, ceiling: bool) -> float:
    if (measured <= bound) if ceiling else (measured >= bound):
        return bound
    cap = machine_capacity_fps()
    slow = min(1.0, cap / REFERENCE_FPS)
    scaled = bound / slow if ceiling else bound * slow
    word, side, fmt = ("ceiling", "over", ".2f") if ceiling else ("floor", "under", ".1f")
    print(
        f"\n{what}: {measured:{fmt}} {side} the {word} {bound:g}; this machine streams the shipped "
        f"model at {cap:.1f} FPS (reference {REFERENCE_FPS:g}), so the {word} here is {scaled:{fmt}}"
    )
    return scaled


def tiny_real_folder(tmp_path, item_id: str, identity: str):
    """A one-clip real data folder (catalog.json, videos/, audio/): 2.4 s of a GRID speaker
    (MIT, rizkiarm/LipNet). The identity decides the split: a held-out one makes it eval data."""
    import json
    import shutil
    from pathlib import Path

    data = Path(__file__).parent / "data"
    root = Path(tmp_path) / "real"
    (root / "videos").mkdir(parents=True)
    (root / "audio").mkdir()
    shutil.copy(data / "real_tiny.mp4", root / "videos" / "tiny.mp4")
    shutil.copy(data / "real_tiny.wav", root / "audio" / "tiny.wav")
    item = {
        "id": item_id,
        "kind": "video",
        "identity": identity,
        "license": "MIT",
        "source_repo": "rizkiarm/LipNet",
        "file": "videos/tiny.mp4",
        "audio_file": "audio/tiny.wav",
        "duration_s": 2.4,
    }
    (root / "catalog.json").write_text(json.dumps({"items": [item]}))
    return root


def exported_before(path, dst):
    """A copy of the bundle at `path` as an export before the stored parts wrote it: no parts
    (nor the decoder heads cut from them), no record of the graphs' shapes or external data."""
    import json
    import shutil

    from edgetalk.runtime.backend_onnxruntime import GRAPH_IO
    from edgetalk.runtime.bundle import EXTERNAL_DATA, MANIFEST
    from edgetalk.runtime.composite import COMPOSITES, head_role
    from edgetalk.runtime.photo_split import SPLITS, part_roles

    shutil.copytree(path, dst)
    m = json.loads((dst / MANIFEST).read_text())
    for part in m.pop(COMPOSITES, {}):
        fname = m["files"].pop(head_role(part))
        del m["sha256"][fname]
        (dst / fname).unlink()
    for part in m.pop(SPLITS):
        for role in part_roles(part):
            fname = m["files"].pop(role)
            del m["sha256"][fname]
            (dst / fname).unlink()
    del m[GRAPH_IO], m[EXTERNAL_DATA]
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def with_manifest(path, dst, change):
    """A copy at `dst` of the bundle at `path` whose manifest `change(manifest)` edited (its
    files' hashes untouched)."""
    import json
    import shutil

    from edgetalk.runtime.bundle import MANIFEST

    shutil.copytree(path, dst)
    m = json.loads((dst / MANIFEST).read_text())
    change(m)
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def export_seeded(root, name: str, cfg: ModelConfig, precision: str, seed: int):
    """The path of an ONNX export at `precision` of `cfg` with seeded weights, under `root`; the
    checkpoint is saved beside it once per name."""
    from edgetalk.export.pipeline import export_bundle
    from edgetalk.models.checkpoint import save_checkpoint

    ck = root / f"{name}.safetensors"
    if not ck.exists():
        save_checkpoint(seeded_model(cfg, seed=seed), ck)
    out = root / f"{name}-{precision}"
    r = export_bundle("onnx", precision, checkpoint=ck, out=out, progress=False)
    assert r.ok, r.manifest["parity"]
    return r.path
