"""Coverage-guided fuzzing of EdgeTalk's input paths with atheris (libFuzzer), bounded in time.

Outside CI (it needs `pip install atheris`; the property tests cover the same oracles in CI):

    python -m edgetalk.tests.fuzz.run_atheris socket --seconds 300
    python -m edgetalk.tests.fuzz.run_atheris all --seconds 120 --json runs/fuzz.json

Targets: wav (audio file reader + resampler), socket (wire format), pcm (stdin framing), image
(avatar loader), manifest (bundle manifest parser). Each runs in its own process (libFuzzer owns the
process), with a per-input timeout and an RSS limit, so a hang, a crash or runaway memory is a
finding. The report gives executions, coverage and findings per target.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("wav", "socket", "pcm", "image", "manifest")


def seeds(target: str, corpus: Path) -> None:
    """A few valid inputs to start from, so the fuzzer begins inside each format."""
    import io
    import struct

    import numpy as np

    corpus.mkdir(parents=True, exist_ok=True)
    if target == "wav":
        import soundfile as sf

        for rate, ch in ((16000, 1), (44100, 2)):
            buf = io.BytesIO()
            sf.write(buf, np.zeros((64, ch), np.float32), rate, format="WAV", subtype="PCM_16")
            (corpus / f"seed_{rate}_{ch}.wav").write_bytes(buf.getvalue())
    elif target == "socket":
        msg = struct.pack(">I", 4) + b"\x01\x00\x02\x00" + struct.pack(">I", 0xFFFFFFFF)
        (corpus / "seed").write_bytes(b"\x00" + msg + struct.pack(">I", 0xFFFFFFFE))
    elif target == "pcm":
        (corpus / "seed").write_bytes(b"\x03\x01" + bytes(range(64)))
    elif target == "image":
        from PIL import Image

        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.new("RGB", (24, 20), (200, 120, 90)).save(buf, format=fmt)
            (corpus / f"seed.{fmt.lower()}").write_bytes(buf.getvalue())
    elif target == "manifest":
        from .targets import fake_bundle

        with tempfile.TemporaryDirectory() as d:
            (corpus / "seed.json").write_text(json.dumps(fake_bundle(Path(d) / "b")))


def fuzz_one(target: str) -> None:
    """The libFuzzer entry point (runs in the child process)."""
    import atheris

    # Third-party libraries first, uninstrumented: coverage is wanted in EdgeTalk's own code.
    import av  # noqa: F401
    import numpy  # noqa: F401
    import soundfile  # noqa: F401
    import soxr  # noqa: F401
    from PIL import Image  # noqa: F401

    with atheris.instrument_imports(include=["edgetalk"], enable_loader_override=False):
        from edgetalk.runtime import audio_io, avatar, bundle, socket_source, sources  # noqa: F401

        from . import targets

    bundle_dir = Path(tempfile.mkdtemp()) / "bundle"
    if target == "manifest":
        targets.fake_bundle(bundle_dir)

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        if target == "wav":
            targets.check_audio_file(fdp.ConsumeBytes(fdp.remaining_bytes()), ".wav")
        elif target == "image":
            targets.check_image_file(fdp.ConsumeBytes(fdp.remaining_bytes()), ".png")
        elif target == "socket":
            cuts = [fdp.ConsumeIntInRange(0, 255) for _ in range(fdp.ConsumeIntInRange(0, 4))]
            targets.check_socket_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()), cuts)
        elif target == "pcm":
            channels = fdp.ConsumeIntInRange(1, 2)
            sizes = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 3))]
            targets.check_pcm_stdin(fdp.ConsumeBytes(fdp.remaining_bytes()), sizes, channels)
        elif target == "manifest":
            targets.check_manifest(fdp.ConsumeBytes(fdp.remaining_bytes()), bundle_dir)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


def run(target: str, seconds: int, workdir: Path) -> dict:
    corpus = workdir / target / "corpus"
    seeds(target, corpus)
    artifacts = workdir / target / "findings"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "edgetalk.tests.fuzz.run_atheris", "--child", target,
        f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048", "-max_len=65536",
        f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus),
    ]  # fmt: skip
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    log = p.stdout + p.stderr
    (workdir / target / "log.txt").write_text(log)
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    progress = re.findall(r"^#(\d+)\s", log, flags=re.M)  # when libFuzzer printed no final stats
    if "number_of_executed_units" not in stats and progress:
        stats["number_of_executed_units"] = progress[-1]
    return {
        "target": target,
        "seconds": round(time.time() - t0, 1),
        "executions": int(stats.get("number_of_executed_units", 0)),
        "coverage_edges": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "corpus_inputs": sum(1 for _ in corpus.iterdir()),
        "findings": sorted(f.name for f in artifacts.iterdir()),
        "exit_code": p.returncode,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        sys.argv = [sys.argv[0], *argv[2:]]
        fuzz_one(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=(*TARGETS, "all"))
    ap.add_argument("--seconds", type=int, default=60, help="time per target")
    ap.add_argument("--workdir", type=Path, default=Path("runs/fuzz"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzzing needs atheris: pip install atheris", file=sys.stderr)
        return 2
    results = []
    for t in TARGETS if args.target == "all" else (args.target,):
        r = run(t, args.seconds, args.workdir)
        results.append(r)
        print(
            f"{t:9s} {r['executions']:>9,} executions in {r['seconds']:.0f} s, "
            f"coverage {r['coverage_edges']} edges, {len(r['findings'])} finding(s) "
            f"{r['findings'][:3]}",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
