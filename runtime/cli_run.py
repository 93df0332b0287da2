"""`edgetalk run`: an audio file (plus an optional partner track) -> a talking-head mp4."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .. import cliargs
    from .rest_pose import add_open_mouth_option
    from .threads import add_threads_option

    p = sub.add_parser(
        "run",
        help="render a talking-head mp4 from an audio file",
        description="Render a talking-head mp4 from a photo and an audio file, streaming chunk by "
        "chunk exactly as the live path does.",
    )
    p.add_argument(
        "--audio",
        type=Path,
        help="speech to lip-sync (any rate/channels; default: the embedded example sentence)",
    )
    p.add_argument(
        "--partner-audio",
        type=Path,
        help="the other side of a conversation: the avatar listens while it speaks",
    )
    p.add_argument("--avatar", type=Path, help="face photo (default: the embedded avatar)")
    p.add_argument(
        "--no-face-check",
        action="store_true",
        help="accept an image with no detectable face (centre crop)",
    )
    add_open_mouth_option(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoint", type=Path, help="safetensors checkpoint (default: embedded tiny)"
    )
    src.add_argument("--bundle", type=Path, help="exported bundle directory; picks the backend")
    p.add_argument("--backend", help="override the backend (e.g. torch, onnxruntime, mlx)")
    p.add_argument("--out", type=Path, default=Path("edgetalk.mp4"), help="output mp4")
    p.add_argument(
        "--chunk", type=cliargs.chunk, help="frames per generator call (default: the model's)"
    )
    p.add_argument(
        "--seed", type=cliargs.seed, default=0, help="noise seed (same seed, same video)"
    )
    add_threads_option(p)
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="keep to --threads: by default, on a machine with at least twice --threads cores, "
        "each chunk's decoder runs beside the next chunk's audio and generator (the same "
        "frames, sooner)",
    )
    p.add_argument(
        "--piece-ms",
        type=cliargs.int_in(1, 60_000),
        default=200,
        help="audio is fed to the scheduler in pieces of this size, as a stream would be",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="play the file in real time through a live session (as `edgetalk live` would)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .sinks import check_out_file

    # before any work: the output must not replace an input, nor land where it cannot be written
    check_out_file(args.out, (args.audio, args.partner_audio, args.avatar, args.checkpoint))
    if getattr(args, "realtime", False):
        from .cli_live import run_realtime

        return run_realtime(args)
    import numpy as np
    from tqdm import tqdm

    from ..models.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
    from .audio_io import default_speech, read_audio
    from .avatar import prepare_avatar
    from .loader import open_backend
    from .rest_pose import measure
    from .scheduler import StreamScheduler
    from .sinks import Mp4Sink
    from .threads import spare_cores

    audio_path = args.audio or default_speech()
    if args.audio is None:
        print(f"no --audio given: using the embedded example speech ({audio_path.name})")
    own = read_audio(audio_path)
    for note in own.notes:
        print(f"note: audio: {note}")
    partner = None
    if args.partner_audio is not None:
        pa = read_audio(args.partner_audio)
        for note in pa.notes:
            print(f"note: partner audio: {note}")
        n = max(own.pcm.shape[0], pa.pcm.shape[0])
        own.pcm = np.pad(own.pcm, (0, n - own.pcm.shape[0]))
        partner = np.pad(pa.pcm, (0, n - pa.pcm.shape[0]))

    backend = open_backend(
        bundle=args.bundle,
        checkpoint=args.checkpoint,
        backend=args.backend,
        chunk=args.chunk,
        threads=args.threads,
    )
    res = backend.cfg.render.resolution
    avatar = prepare_avatar(args.avatar, res, face_check=not args.no_face_check)
    rest = measure(avatar, args.open_mouth)
    print(f"the photo's mouth: {rest.note}")
    # A file is rendered as fast as the machine allows: with cores to spare, chunk k's decoder
    # overlaps chunk k+1's generator (scheduler.py), the frames bit-identical.
    spare = not args.no_overlap and spare_cores(args.threads)
    sched = StreamScheduler(backend, avatar, seed=args.seed, mouth_rest=rest, overlap=spare)

    pcm = own.pcm
    total_frames = -(-pcm.shape[0] // SAMPLES_PER_FRAME)
    piece = max(1, int(args.piece_ms * SAMPLE_RATE / 1000))
    t0 = time.perf_counter()
    with Mp4Sink(args.out, res) as sink:
        sink.write_audio(pcm if partner is None else np.clip(pcm + partner, -1.0, 1.0))
        with tqdm(
            total=total_frames, unit="frame", desc="rendering", leave=False, disable=None
        ) as bar:
            for i in range(0, pcm.shape[0], piece):
                part = None if partner is None else partner[i : i + piece]
                for frame in sched.push_audio(pcm[i : i + piece], part):
                    sink.write(frame)
                    bar.update(1)
            for frame in sched.flush():
                sink.write(frame)
                bar.update(1)
        written = sink.frames
    wall = time.perf_counter() - t0
    overlap = "; decoder overlapped on spare cores" if sched.overlapping else ""
    sched.close()
    print(
        f"wrote {args.out}: {written} frames ({written / FPS:.2f} s video, {own.seconds:.2f} s audio) "
        f"at {res}x{res}, {backend.describe()}, chunk {backend.cfg.chunk}{overlap}; "
        f"{written / wall:.1f} frames/s including encoding"
    )
    return 0
