"""`edgetalk bench`: the streaming scheduler, timed, for every backend x precision x chunk, and
`edgetalk bench report`: several devices' JSON files merged into one table and one set of plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cliargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark FPS, first-frame delay, RTF and per-module latency",
        description="Time the streaming scheduler end to end for each backend x precision x chunk "
        "(torch eager fp32 at the same chunk is always included as the reference). With no "
        "--backend/--bundle/--export: torch fp32 plus every bundle found under bundles/.",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        action="append",
        default=[],
        help="a bundle to run, with the backend its manifest picks (its chunk is fixed); repeatable",
    )
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        help="a backend that runs the checkpoint at every --chunk (torch, torch:bf16, ...); "
        "repeatable",
    )
    p.add_argument(
        "--export",
        action="append",
        default=[],
        help="TARGET:PRECISION[,...] (e.g. onnx:int8,onnx:fp32,mlx:fp16): export one bundle per "
        "--chunk into --cache-dir (reusing existing ones), then run them",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="safetensors checkpoint (default: tiny)")
    src.add_argument("--preset", help="a model preset with seeded random weights (tiny, large)")
    p.add_argument("--chunk", help="chunk sizes C, comma separated (default: the model's)")
    p.add_argument(
        "--seconds",
        type=cliargs.float_in(0, 3600, above=True),
        default=10.0,
        help="media seconds per stream",
    )
    p.add_argument(
        "--repeats",
        type=cliargs.int_in(1, 1000),
        default=3,
        help="runs per measurement (median kept)",
    )
    p.add_argument(
        "--rounds",
        type=cliargs.int_in(1, 20),
        default=1,
        help="run the whole plan N times round-robin and keep each row's median over all of "
        "them: ratios stay fair on a machine whose speed drifts (default 1)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="run the throughput of every configuration with the same chunk chunk by chunk in "
        "turn, each timed on its own, so a drifting machine hits them alike and the x-torch "
        "ratios hold (FFD is still measured one at a time; peak RSS is then of all together)",
    )
    p.add_argument(
        "--overlap",
        action="store_true",
        help="throughput as `edgetalk run` renders a file: each chunk's decoder on a second "
        "thread beside the next chunk's audio and generator, where the threads leave cores to "
        "spare, as run does (FFD is still the serial live path)",
    )
    p.add_argument(
        "--json",
        type=cliargs.report_file,
        help="write the results here (schema: benchmarks/schema.py)",
    )
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    p.add_argument(
        "--threads",
        help="CPU threads for torch and onnxruntime; a comma list (1,2) measures each "
        "(default: min(2, cores/2))",
    )
    p.add_argument(
        "--load",
        type=cliargs.int_in(0, 64),
        default=0,
        metavar="N",
        help="also measure every configuration with N busy processes beside it, and report "
        "its FPS under load as a ratio of its quiet FPS (default 0: quiet only)",
    )
    p.add_argument("--device-name", help="name of this machine in merged reports")
    p.add_argument(
        "--piece-ms",
        type=cliargs.float_in(0, 10_000, above=True),
        default=20.0,
        help="paced audio piece length",
    )
    p.add_argument(
        "--warmup",
        type=cliargs.float_in(0, 3600),
        default=1.0,
        help="seconds streamed before measuring (excluded)",
    )
    p.add_argument("--seed", type=cliargs.seed, default=0, help="noise seed and random-weight seed")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("bundles/bench"),
        help="where --export writes its bundles (default: bundles/bench)",
    )
    p.add_argument(
        "--bundles-root",
        type=Path,
        default=Path("bundles"),
        help="where bundles are looked for when no backend is named (default: bundles)",
    )
    p.set_defaults(func=main)

    rs = p.add_subparsers(dest="bench_command", metavar="report")
    r = rs.add_parser(
        "report",
        help="merge bench JSON files from several devices into one table and plots",
        description="Merge `edgetalk bench --json` files (one per device) into one Markdown table "
        "with a device column, and one set of plots.",
    )
    r.add_argument("files", type=Path, nargs="+", help="bench JSON files")
    r.add_argument(
        "--out", dest="report_out", type=cliargs.report_file, help="write the Markdown table here"
    )
    r.add_argument("--plots", dest="report_plots", type=Path, help="write PNG plots here")
    r.set_defaults(func=report_main)


def parse_threads(text: str | None) -> list[int] | None:
    from ..errors import InputError

    if text is None:
        return None
    out = []
    for part in str(text).split(","):
        try:
            n = int(part.strip())
        except ValueError:
            raise InputError(f"--threads takes whole numbers like 1 or 1,2; got {text!r}") from None
        if n < 1:
            raise InputError(f"--threads must be 1 or more, got {n}")
        if n not in out:
            out.append(n)
    return out


def main(args: argparse.Namespace) -> int:
    import json

    from ..runtime.threads import apply_torch_threads, default_threads, set_threads
    from .deps import require_bench_extra

    threads = parse_threads(args.threads)
    require_bench_extra(plots=args.plots is not None)
    from .allocator import steady_allocator

    allocator = steady_allocator()  # before any backend allocates

    from .configs import Request, make_plan, parse_chunks
    from .device import device_info
    from .measure import Settings
    from .plots import write_plots
    from .report import render_run
    from .schema import validate

    first = threads[0] if threads else default_threads()
    set_threads(first)
    apply_torch_threads(first)
    exports = [s.strip() for spec in args.export for s in spec.split(",") if s.strip()]
    backends = [s.strip() for spec in args.backend for s in spec.split(",") if s.strip()]
    req = Request(
        bundles=list(args.bundle),
        backends=backends,
        exports=exports,
        preset=args.preset,
        checkpoint=args.checkpoint,
        chunks=parse_chunks(args.chunk) if args.chunk else None,
        cache_dir=args.cache_dir,
        bundles_root=args.bundles_root,
        seed=args.seed,
    )
    settings = Settings(
        args.seconds, args.repeats, args.piece_ms, args.warmup, args.seed, overlap=args.overlap
    )
    plan = make_plan(req, log=print)
    print(f"{len(plan.configs)} configuration(s): " + ", ".join(c.label for c in plan.configs))
    for s in plan.skipped:
        print(f"skipped {s['config']}: {s['reason']}")
    print("measuring the fp32 GEMM peak ...")
    device = device_info(args.device_name)

    from .suite import run_plan

    used = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench_command")}
    command = [f"{k}={v}" for k, v in sorted(used.items()) if v not in (None, [], False)]
    report = run_plan(
        plan,
        settings,
        device,
        command=command,
        threads=threads,
        load=args.load,
        rounds=args.rounds,
        interleave=args.interleave,
    )
    report["settings"]["allocator"] = allocator
    report["notes"].append(allocator)
    problems = validate(report)
    if problems:  # a bug here, not bad input: say so loudly
        raise AssertionError("bench report does not match its schema: " + "; ".join(problems))
    print()
    print(render_run(report))
    if args.json:
        cliargs.write_report(args.json, json.dumps(report, indent=2, allow_nan=False) + "\n")
        print(f"\nwrote {args.json}")
    if args.plots:
        rows = [{**r, "device": device["name"]} for r in report["results"]]
        for path in write_plots(rows, args.plots):
            print(f"wrote {path}")
    return 0


def report_main(args: argparse.Namespace) -> int:
    from .deps import require_bench_extra

    if args.report_plots is not None:
        require_bench_extra(plots=True)
    from .plots import write_plots
    from .report import load_report, merge, render_merged

    reports = [load_report(p) for p in args.files]
    text = render_merged(reports)
    print(text)
    if args.report_out:
        cliargs.write_report(args.report_out, text + "\n")
        print(f"\nwrote {args.report_out}")
    if args.report_plots:
        _, rows = merge(reports)
        for path in write_plots(rows, args.report_plots):
            print(f"wrote {path}")
    return 0
