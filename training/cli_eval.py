"""`edgetalk eval`: score a model (checkpoint or bundle) on held-out identities and voices."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score lip sync, identity, stability, quality and listening on held-out data",
        description="Render held-out synthetic clips with the model and score them from pixels "
        "(mediapipe face mesh, dlib face embedding), beside ground truth and a loudness baseline.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="safetensors checkpoint (default: embedded)")
    src.add_argument("--bundle", type=Path, help="an exported bundle (scored through its backend)")
    p.add_argument("--backend", help="override the bundle's backend")
    p.add_argument("--clips", type=int, default=4, help="held-out monologue clips")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each clip")
    p.add_argument("--listen-clips", type=int, default=2, help="held-out dyadic clips")
    p.add_argument(
        "--long-minutes",
        type=float,
        default=5.0,
        help="continuous stream for identity and drift (0 skips it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the full report here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..runtime.loader import open_backend
    from .evaluate import evaluate, format_report

    backend = open_backend(bundle=args.bundle, checkpoint=args.checkpoint, backend=args.backend)
    print(f"evaluating {backend.describe()} on held-out identities and voices ...")
    report = evaluate(
        backend,
        clips=args.clips,
        seconds=args.seconds,
        long_minutes=args.long_minutes,
        listen_clips=args.listen_clips,
        seed=args.seed,
    )
    report["model"] = str(args.bundle or args.checkpoint or "embedded tiny")
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0
