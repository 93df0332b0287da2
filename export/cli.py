"""`edgetalk export`: checkpoint -> parity-gated bundle(s) for any target in converters/."""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_PARITY_FAILED = 3


def register(sub: argparse._SubParsersAction) -> None:
    from .. import cliargs
    from ..converters.target import PRECISIONS, targets

    p = sub.add_parser(
        "export",
        help="export the model to ONNX, CoreML, MLX or TensorRT (static shapes, fp32/fp16/int8)",
        description="Trace the four modules with static KV-cache shapes, quantize, check every "
        "module and a 100-frame stream against PyTorch, and write a self-describing bundle.",
    )
    p.add_argument("--target", required=True, choices=[*sorted(targets()), "all"])
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument(
        "--checkpoint", type=Path, help="safetensors checkpoint (default: embedded tiny)"
    )
    p.add_argument(
        "--chunk", type=cliargs.chunk, help="frames per generator call C (default: the model's)"
    )
    p.add_argument(
        "--lookahead",
        type=cliargs.float_in(0, 10_000),
        metavar="MS",
        help="audio lookahead in ms: a check only, since the weights fix it (refused if they differ)",
    )
    p.add_argument("--steps", type=cliargs.steps, help="flow-matching Euler steps N")
    p.add_argument("--window", type=cliargs.window, help="rolling KV window W in frames")
    p.add_argument(
        "--out",
        type=Path,
        help="bundle directory (default: bundles/<name>-<target>-"
        "<precision>-c<C>; with --target all, one folder per target inside it)",
    )
    p.add_argument("--force", action="store_true", help="rebuild modules that already exist")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..converters.parity import headline
    from ..converters.target import targets
    from . import speed
    from .pipeline import export_bundle

    chosen = [args.target]
    worst = 0
    if args.target == "all":  # "all" means every target this machine can build
        chosen = []
        for name, cls in sorted(targets().items()):
            ok, why = cls.availability()
            if ok:
                chosen.append(name)
            else:
                print(f"skipping {name}: {why}")
    for target in chosen:
        out = args.out
        if out is not None and args.target == "all":
            out = out / f"{target}-{args.precision}"
        result = export_bundle(
            target,
            args.precision,
            checkpoint=args.checkpoint,
            chunk=args.chunk,
            lookahead_ms=args.lookahead,
            steps=args.steps,
            window=args.window,
            out=out,
            force=args.force,
        )
        rows = [("module", "size", "parity", "result", "speed")]
        for m in result.modules:
            status = m.parity.get("status", "")
            figure = headline(m.parity) if status in ("pass", "fail") else status
            note = " (reused)" if m.skipped else ""
            rows.append(
                (m.name, _mb(m.size_bytes), figure, _verdict(status) + note, speed.column(m.info))
            )
        e2e = result.e2e
        e2e_fig = (
            f"PSNR {e2e['psnr_db']:.1f} dB over {e2e['frames']} frames"
            if "psnr_db" in e2e
            else e2e.get("status", "")
        )
        rows.append(("end-to-end", "", e2e_fig, _verdict(e2e.get("status", "")), ""))
        if not any(r[4] for r in rows[1:]):  # fp32, or a target that cannot time here
            rows = [r[:4] for r in rows]
        print(f"\n{target} {args.precision} -> {result.path}  ({result.seconds:.0f} s)")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, r in enumerate(rows):
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
        note = speed.verdict([(m.name, m.info) for m in result.modules], target, args.precision)
        if note:
            print(note)
        if not result.ok:
            bad = [m for m in result.modules if m.parity.get("status") == "fail"]
            what = ", ".join(f"{m.name} ({headline(m.parity)})" for m in bad) or (
                f"end-to-end ({e2e_fig}, threshold {e2e.get('threshold_db')} dB)"
            )
            print(
                f"edgetalk export: parity FAILED for {what}; the bundle was not written "
                f"(inspect {result.path}). A re-run rebuilds the failed modules; "
                "--force rebuilds every module"
            )
            worst = EXIT_PARITY_FAILED
    return worst


def _verdict(status: str) -> str:
    return {"pass": "PASS", "fail": "FAIL"}.get(status, "not run")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
