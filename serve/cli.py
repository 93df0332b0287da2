"""`edgetalk serve`: a local web page where your microphone drives a live talking head (WebRTC)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from ..runtime.threads import add_threads_option

    p = sub.add_parser(
        "serve",
        help="web page: your microphone in, the talking head out (WebRTC)",
        description="Serve a web page where the browser's microphone animates the avatar live "
        "over WebRTC: avatar upload, start/stop, interrupt and live stats. Loopback only unless "
        "--host is another address, which then needs a token (one is made if none is given).",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--checkpoint", type=Path, help="safetensors checkpoint (default: embedded tiny)"
    )
    model.add_argument("--bundle", type=Path, help="exported bundle directory; picks the backend")
    p.add_argument("--backend", help="override the backend (e.g. torch, onnxruntime, mlx)")
    p.add_argument("--avatar", type=Path, help="default face photo (default: the embedded avatar)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: any free)")
    p.add_argument(
        "--token-file",
        type=Path,
        help="file holding the access token the page must present (or set EDGETALK_TOKEN); "
        "off loopback one is always required, and made if none is given",
    )
    p.add_argument("--token", help="the access token itself (visible in `ps`: prefer --token-file)")
    p.add_argument(
        "--max-sessions", type=int, default=1, help="avatar sessions at once (default 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    add_threads_option(p)
    p.add_argument(
        "--late-policy",
        choices=("drop", "mark"),
        default="drop",
        help="frames more than one chunk late: drop them (and catch up) or send them anyway",
    )
    p.add_argument("--cert", type=Path, help="TLS certificate (PEM): serve https")
    p.add_argument("--key", type=Path, help="TLS private key (PEM) for --cert")
    p.add_argument(
        "--max-session-minutes",
        type=float,
        default=120.0,
        help="end a session after this long (default 120; 0: no limit)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from ..errors import InputError

    try:
        import aiohttp  # noqa: F401
        import aiortc  # noqa: F401
    except ImportError as e:
        raise InputError(
            f"edgetalk serve needs aiohttp and aiortc ({e.name} is missing): "
            "pip install 'edgetalk[serve]'"
        ) from None
    from ..runtime.threads import set_threads
    from ..runtime.tokens import masked, resolve_token, save_private
    from .server import AvatarServer, ServeConfig, serve_forever

    set_threads(args.threads)  # every session shares the backend opened with these threads

    cfg = ServeConfig(
        bundle=args.bundle,
        checkpoint=args.checkpoint,
        backend=args.backend,
        avatar=args.avatar,
        host=args.host,
        port=args.port,
        token=resolve_token(args.token, args.token_file),
        max_sessions=args.max_sessions,
        seed=args.seed,
        late_policy=args.late_policy,
        cert=args.cert,
        key=args.key,
        max_session_s=args.max_session_minutes * 60.0,
    )
    cfg.check()  # before loading the model: a refused host/token fails at once
    if cfg.token_generated:
        where = save_private(cfg.token, Path.home() / ".config" / "edgetalk" / "serve-token")
        print(
            f"serve: {cfg.host} is reachable from other machines, so a token is required; made "
            f"one ({masked(cfg.token)}) and saved it to {where} (readable only by you). Type it "
            "into the page, or open http://HOST:PORT/#token=TOKEN",
            flush=True,
        )
    elif cfg.token:
        print(
            f"serve: the page needs the access token ({masked(cfg.token)}): type it in, or open "
            "http://HOST:PORT/#token=TOKEN (a #fragment never reaches a server or its logs)",
            flush=True,
        )
    logging.basicConfig(level=logging.INFO, format="serve: %(message)s")
    for name in ("aiortc", "aioice", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server = AvatarServer(cfg)
    asyncio.run(serve_forever(server))
    return 0
