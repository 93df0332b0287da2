"""`edgetalk live`: live audio (microphone, a PCM pipe or a socket) -> a live talking head.

The output goes to a virtual camera, a preview window, an mp4 or nowhere (`--null`, for timing).
Ctrl-C (or SIGTERM) and the end of the source stop it cleanly: the mp4 is finished, and a summary
(frames, FPS, first-frame delay, late/dropped frames, interruptions) is printed.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .. import cliargs
    from .audio_io import MAX_RATE, MIN_RATE
    from .rest_pose import add_open_mouth_option
    from .threads import add_threads_option

    p = sub.add_parser(
        "live",
        help="live talking head from a microphone, a PCM pipe or a socket",
        description="Animate a photo from live audio in real time and send the frames to a "
        "virtual camera, a preview window, an mp4 or nowhere. When no audio comes, the avatar "
        "idles. Ctrl-C stops it and prints a summary.",
    )
    p.add_argument("--avatar", type=Path, help="face photo (default: the embedded avatar)")
    p.add_argument(
        "--no-face-check", action="store_true", help="accept an image with no detectable face"
    )
    add_open_mouth_option(p)
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--checkpoint", type=Path, help="safetensors checkpoint (default: embedded tiny)"
    )
    model.add_argument("--bundle", type=Path, help="exported bundle directory; picks the backend")
    p.add_argument("--backend", help="override the backend (e.g. torch, onnxruntime, mlx)")
    p.add_argument("--seed", type=cliargs.seed, default=0, help="noise seed")
    add_threads_option(p)

    src = p.add_mutually_exclusive_group()
    src.add_argument("--mic", action="store_true", help="the default microphone (sounddevice)")
    src.add_argument(
        "--pcm-stdin",
        action="store_true",
        help="raw s16le PCM on stdin (mono unless --channels; 16 kHz unless --rate)",
    )
    src.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="TCP server for length-prefixed s16le PCM (see docs/live.md for the wire format)",
    )
    p.add_argument("--mic-device", help="microphone name or index (default: the system's)")
    p.add_argument(
        "--rate",
        type=cliargs.int_in(MIN_RATE, MAX_RATE),
        default=16000,
        help="sample rate of --pcm-stdin / --listen audio",
    )
    p.add_argument(
        "--channels", type=cliargs.int_in(1, 64), default=1, help="channels of --pcm-stdin audio"
    )

    partner = p.add_mutually_exclusive_group()
    partner.add_argument(
        "--partner-mic", action="store_true", help="the other side of the conversation: a mic"
    )
    partner.add_argument(
        "--partner-listen", metavar="HOST:PORT", help="the other side, as a second socket"
    )
    p.add_argument("--partner-device", help="microphone name or index for --partner-mic")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow --listen on a non-loopback address (needs a token)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="file holding the shared secret socket clients send first (AUTH); or set "
        "EDGETALK_TOKEN",
    )
    p.add_argument(
        "--token", help="the shared secret itself (visible in `ps`: prefer --token-file)"
    )

    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--virtualcam",
        action="store_true",
        help="send frames to a virtual camera (pyvirtualcam; OBS on macOS)",
    )
    out.add_argument("--preview", action="store_true", help="show frames in a window (OpenCV)")
    out.add_argument("--out", type=Path, metavar="OUT.mp4", help="record an mp4 with the audio")
    out.add_argument("--null", action="store_true", help="discard frames (timing, tests)")
    p.add_argument("--cam-device", help="virtual camera device (e.g. /dev/video2)")

    p.add_argument(
        "--seconds",
        type=cliargs.float_in(0, above=True),
        help="stop after this many seconds (default: until the end)",
    )
    p.add_argument(
        "--late-policy",
        choices=("drop", "mark"),
        default="drop",
        help="frames more than one chunk late: drop them (and catch up) or deliver them marked",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if not (args.mic or args.pcm_stdin or args.listen):
        raise InputError("choose an audio source: --mic, --pcm-stdin or --listen 127.0.0.1:PORT")
    if not (args.virtualcam or args.preview or args.out or args.null):
        raise InputError("choose an output: --virtualcam, --preview, --out OUT.mp4 or --null")
    if (args.token or args.token_file) and not args.listen and not args.partner_listen:
        raise InputError("--token / --token-file are for --listen / --partner-listen")
    if args.out:
        from .sinks import check_out_file

        check_out_file(args.out, (args.avatar, args.checkpoint))
    if args.virtualcam:
        from .sinks import VirtualCamSink

        VirtualCamSink.check_available()  # fail before loading the model
    if args.preview:
        from .sinks import PreviewSink

        PreviewSink.check_available()

    from .socket_source import SocketSource, parse_hostport
    from .sources import MicSource, PcmStdinSource
    from .tokens import resolve_token

    token = None
    if args.listen or args.partner_listen:
        token = resolve_token(args.token, args.token_file)

    sources = []
    try:
        if args.mic:
            own = MicSource(args.mic_device)
        elif args.pcm_stdin:
            own = PcmStdinSource(rate=args.rate, channels=args.channels)
        else:
            host, port = parse_hostport(args.listen)
            own = SocketSource(
                host, port, rate=args.rate, allow_remote=args.allow_remote, token=token
            )
        sources.append(own)
        partner = None
        if args.partner_mic:
            partner = MicSource(args.partner_device)
        elif args.partner_listen:
            host, port = parse_hostport(args.partner_listen)
            partner = SocketSource(
                host, port, rate=args.rate, allow_remote=args.allow_remote, token=token
            )
        if partner is not None:
            sources.append(partner)

        session = session_from_args(args, late_policy=args.late_policy)
        sink = _open_sink(args, session.resolution)
        print(
            f"live: {own.describe()}"
            + (f" + partner {partner.describe()}" if partner else "")
            + f" -> {_sink_name(args)}; {session.backend.describe()}, chunk {session.chunk}"
            + f"; the photo's mouth: {session.mouth_rest.note}; Ctrl-C to stop",
            flush=True,
        )
        return play(session, sink, sources, partner=partner, seconds=args.seconds)
    finally:
        for s in sources:
            s.close()


def session_from_args(args: argparse.Namespace, late_policy: str, chunk: int | None = None):
    """A realtime Session from the flags `live` and `run --realtime` share."""
    from .session import Session
    from .threads import set_threads

    set_threads(getattr(args, "threads", None))
    kwargs = {"chunk": chunk} if chunk is not None else {}
    return Session(
        avatar=args.avatar,
        bundle=args.bundle,
        checkpoint=args.checkpoint,
        backend=args.backend,
        seed=args.seed,
        face_check=not args.no_face_check,
        open_mouth=getattr(args, "open_mouth", "close"),
        realtime=True,
        late_policy=late_policy,
        **kwargs,
    )


def run_realtime(args: argparse.Namespace) -> int:
    """`edgetalk run --realtime`: the file is played in real time through a live Session."""
    from .audio_io import default_speech
    from .sinks import Mp4Sink
    from .sources import FileSource

    audio_path = args.audio or default_speech()
    if args.audio is None:
        print(f"no --audio given: using the embedded example speech ({audio_path.name})")
    source = FileSource(audio_path, partner=args.partner_audio, realtime=True)
    for note in source.notes:
        print(f"note: {note}")
    session = session_from_args(args, late_policy="mark", chunk=args.chunk)  # keep every frame
    sink = Mp4Sink(args.out, session.resolution, live=True)
    print(f"run --realtime: playing {source.describe()} -> {args.out}", flush=True)
    try:
        return play(session, sink, [source])
    finally:
        source.close()


def play(session, sink, sources, partner=None, seconds: float | None = None) -> int:
    """Feed the sources into the session and its frames into the sink until the end, Ctrl-C or
    `seconds`. Always closes the sink (a playable mp4) and prints the summary."""
    import numpy as np

    from ..errors import SinkError
    from .scheduler import Frame
    from .sources import feed

    errors: list[BaseException] = []

    def pump(source, is_partner):
        try:
            feed(session, source, partner=is_partner)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            session.close()

    stopped = ""
    threads: list[threading.Thread] = []
    try:
        session.start()
        for s in sources:
            threads.append(
                threading.Thread(
                    target=pump, args=(s, s is partner), name=f"edgetalk-{s.name}", daemon=True
                )
            )
        if seconds is not None:
            threads.append(threading.Timer(seconds, session.close))
        for t in threads:
            t.daemon = True
            t.start()
        for f in session.frames():
            sink.write(Frame(f.index, f.t, f.rgb))
            audio = f.audio
            if f.partner_audio is not None:
                audio = np.clip(audio + f.partner_audio, -1.0, 1.0)
            sink.write_audio(audio)
            if getattr(sink, "stop_requested", False):
                stopped = "window closed"
                break
    except KeyboardInterrupt:
        stopped = "stopped (Ctrl-C)"
    except SinkError as e:  # reported after the summary; the session stops cleanly
        stopped = "stopped: the output failed"
        errors.insert(0, e)
    finally:
        for t in threads:
            if isinstance(t, threading.Timer):
                t.cancel()
        for s in sources:
            s.close()
        session.abort()
        try:
            sink.close()
        except SinkError as e:
            if not errors:
                errors.append(e)
        # Join our threads while the interpreter is alive: a thread that drops the last reference
        # to the session at exit frees torch tensors during finalization, and torch then aborts
        # the process (pytorch#38228). A source stuck in a blocking read is left behind after 2 s.
        for t in threads:
            t.join(timeout=2.0)
    stats = session.stats
    if stopped:
        print(f"live: {stopped}")
    for s in sources:
        for note in s.notes:
            print(f"note: {s.name}: {note}")
        if getattr(s, "protocol_errors", 0) or getattr(s, "refused", 0):
            print(
                f"note: {s.name}: {s.connections} client(s), {s.refused} refused, "
                f"{s.protocol_errors} protocol error(s)"
            )
    if getattr(sink, "path", None) is not None:
        print(f"wrote {sink.path}: {getattr(sink, 'frames', stats.frames)} frames")
    print("summary: " + stats.summary().replace("\n", "\n         "), flush=True)
    if errors:
        raise errors[0]
    return 0


def _open_sink(args, resolution: int):
    from .sinks import Mp4Sink, NullSink, PreviewSink, VirtualCamSink

    if args.virtualcam:
        return VirtualCamSink(resolution, device=args.cam_device)
    if args.preview:
        return PreviewSink()
    if args.out:
        return Mp4Sink(args.out, resolution, live=True)
    return NullSink()


def _sink_name(args) -> str:
    if args.virtualcam:
        return "virtual camera"
    if args.preview:
        return "preview window"
    if args.out:
        return str(args.out)
    return "null sink"
