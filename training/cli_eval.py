"""`edgetalk eval`: score a model (checkpoint or bundle) on held-out identities and voices."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import cliargs


def register(sub: argparse._SubParsersAction) -> None:
    from ..runtime.threads import add_threads_option

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
    p.add_argument(
        "--clips",
        type=cliargs.int_in(1),
        help="held-out monologue clips (default 4; --real: all held-out)",
    )
    p.add_argument(
        "--seconds",
        type=cliargs.float_in(0, 3600, above=True),
        help="length of each clip (default 8; --real: whole clips)",
    )
    p.add_argument(
        "--listen-clips", type=cliargs.int_in(0), default=2, help="held-out dyadic clips"
    )
    p.add_argument(
        "--long-minutes",
        type=cliargs.float_in(0, 24 * 60),
        default=5.0,
        help="continuous stream for identity and drift (0 skips it)",
    )
    p.add_argument("--seed", type=cliargs.seed, default=0)
    p.add_argument(
        "--chunk",
        type=cliargs.chunk,
        metavar="C",
        help="frames per generator call (default: the model's, or the bundle's): the judder "
        "ratio is measured at chunk boundaries, so score each chunk size a user may run",
    )
    add_threads_option(p)
    p.add_argument(
        "--real",
        type=Path,
        metavar="DIR",
        help="score on real talking clips instead: a folder with catalog.json, videos/ and audio/ "
        "(its held-out identities; training/real_data.py lists them)",
    )
    p.add_argument(
        "--previous",
        type=Path,
        metavar="CKPT",
        help="with --real: also score these weights as 'previous' (default with --checkpoint: "
        "the embedded weights)",
    )
    p.add_argument(
        "--no-previous", action="store_true", help="with --real: do not score previous weights"
    )
    p.add_argument(
        "--all-clips",
        action="store_true",
        help="with --real: every clip of the folder, not only the held-out identities",
    )
    p.add_argument(
        "--no-fitted",
        action="store_true",
        help="with --real: skip the decoder-on-fitted-motion row (fitting costs time)",
    )
    p.add_argument(
        "--open-mouth",
        choices=("close", "keep"),
        help="a photo whose mouth is open: close it at rest, as run/live/serve do (the default "
        "with --real), or keep the photo's mouth as the rest (the default on synthetic clips, "
        "whose ground truth is drawn relative to the photo, laugh and all)",
    )
    p.add_argument("--json", type=cliargs.report_file, help="write the full report here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..runtime.loader import open_backend
    from ..runtime.threads import set_threads

    set_threads(args.threads)
    from .evaluate import evaluate, format_report

    backend = open_backend(
        bundle=args.bundle, checkpoint=args.checkpoint, backend=args.backend, chunk=args.chunk
    )
    if args.real is not None:
        return main_real(args, backend)
    print(f"evaluating {backend.describe()} on held-out identities and voices ...")
    report = evaluate(
        backend,
        clips=4 if args.clips is None else args.clips,
        seconds=8.0 if args.seconds is None else args.seconds,
        long_minutes=args.long_minutes,
        listen_clips=args.listen_clips,
        seed=args.seed,
        open_mouth=args.open_mouth or "keep",
    )
    report["model"] = str(args.bundle or args.checkpoint or "embedded tiny")
    report["open_mouth"] = args.open_mouth or "keep"
    print(format_report(report))
    if args.json:
        cliargs.write_report(args.json, json.dumps(report, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


def main_real(args: argparse.Namespace, backend) -> int:
    from ..errors import InputError
    from ..runtime.loader import open_backend
    from .eval_real import evaluate_real, format_real_report

    if not args.real.is_dir():
        raise InputError(f"--real {args.real}: not a folder")
    previous = None
    compare = args.previous is not None or args.checkpoint is not None or args.bundle is not None
    if compare and not args.no_previous:
        previous = open_backend(checkpoint=args.previous, chunk=backend.cfg.chunk)
    split = "all" if args.all_clips else "eval"
    print(f"evaluating {backend.describe()} on real clips in {args.real} ({split}) ...")
    report = evaluate_real(
        backend,
        args.real,
        previous=previous,
        clips=args.clips,
        max_seconds=args.seconds,
        long_minutes=args.long_minutes,
        split=split,
        fitted=not args.no_fitted,
        seed=args.seed,
        open_mouth=args.open_mouth or "close",
    )
    report["model"] = str(args.bundle or args.checkpoint or "embedded tiny")
    report["previous"] = str(args.previous or "embedded tiny") if previous else None
    print(format_real_report(report))
    if args.json:
        cliargs.write_report(args.json, json.dumps(report, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0
