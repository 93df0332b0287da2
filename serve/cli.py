"""`edgetalk serve`: a local web page where your microphone drives a live talking head (WebRTC)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .. import cliargs
    from ..runtime.rest_pose import add_open_mouth_option
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
    p.add_argument(
        "--port",
        type=cliargs.int_in(0, 65535),
        default=8080,
        help="TCP port (default 8080; 0: any free)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="file holding the access token the page must present (or set EDGETALK_TOKEN); "
        "off loopback one is always required, and made if none is given",
    )
    p.add_argument("--token", help="the access token itself (visible in `ps`: prefer --token-file)")
    p.add_argument(
        "--max-sessions",
        type=cliargs.int_in(1, 1024),
        default=1,
        help="avatar sessions at once (default 1)",
    )
    p.add_argument("--seed", type=cliargs.seed, default=0, help="noise seed")
    add_threads_option(p)
    p.add_argument(
        "--late-policy",
        choices=("drop", "mark"),
        default="drop",
        help="frames more than one chunk late: drop them (and catch up) or send them anyway",
    )
    add_open_mouth_option(p)
    p.add_argument("--cert", type=Path, help="TLS certificate (PEM): serve https")
    p.add_argument("--key", type=Path, help="TLS private key (PEM) for --cert")
    p.add_argument(
        "--max-session-minutes",
        type=cliargs.float_in(0, 7 * 24 * 60),
        default=120.0,
        help="end a session after this long (default 120; 0: no limit)",
    )
    ray = p.add_argument_group(
        "Ray Serve (scale out)",
        "--ray runs the sessions on Ray Serve worker replicas (pip install 'edgetalk[ray]'); the "
        "page and its rules stay the same",
    )
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on Ray Serve: the cluster's address (HEAD_IP:6379), or none to start "
        "Ray on this machine",
    )
    ray.add_argument(
        "--replicas",
        type=cliargs.int_in(1, 1024),
        default=1,
        help="avatar worker replicas (default 1)",
    )
    ray.add_argument(
        "--max-replicas",
        type=cliargs.int_in(1, 1024),
        help="autoscale from --replicas up to this on sessions in use (default: fixed)",
    )
    ray.add_argument(
        "--sessions-per-replica",
        type=cliargs.int_in(1, 1024),
        default=1,
        help="sessions one worker replica (one opened backend) runs at once (default 1)",
    )
    ray.add_argument(
        "--replica-cpus",
        type=cliargs.float_in(0, 1024),
        default=1.0,
        help="Ray CPUs per replica (default 1)",
    )
    ray.add_argument(
        "--replica-gpus",
        type=cliargs.float_in(0, 64),
        default=0.0,
        help="GPU fraction per replica, e.g. 0.25 for four replicas per GPU (default 0)",
    )
    ray.add_argument(
        "--ice-host",
        help="address in the replicas' ICE candidates (default: each Ray node's address)",
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
        open_mouth=args.open_mouth,
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
    if args.ray is not None:
        return _main_ray(args, cfg)
    server = AvatarServer(cfg)
    asyncio.run(serve_forever(server))
    return 0


def _main_ray(args: argparse.Namespace, cfg) -> int:
    import signal
    import threading

    from ..errors import InputError

    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        raise InputError(
            "edgetalk serve --ray needs Ray Serve: pip install 'edgetalk[ray]'"
        ) from None
    from .ray_app import APP_NAME, RayOptions, run

    if args.max_sessions != 1:
        raise InputError(
            "with --ray, sessions are --replicas x --sessions-per-replica: drop --max-sessions"
        )
    options = RayOptions(
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        sessions_per_replica=args.sessions_per_replica,
        cpus=args.replica_cpus,
        gpus=args.replica_gpus,
        threads=args.threads,
        ice_host=args.ice_host,
    )
    options.check()
    url = run(cfg, options, None if args.ray == "local" else args.ray)
    print(
        f"serve: open {url} in a browser; Ray Serve, {options.replicas}"
        f"{'' if not options.max_replicas else f'..{options.max_replicas}'} avatar worker "
        f"replica(s) x {options.sessions_per_replica} session(s); Ctrl-C to stop",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("serve: stopping", flush=True)
    serve.delete(APP_NAME)
    return 0
