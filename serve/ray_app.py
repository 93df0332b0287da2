"""`edgetalk serve --ray`: the page on Ray Serve, its avatar sessions spread over worker replicas.

Two deployments:

  Ingress      one replica, on the head node. It serves the same aiohttp app as `edgetalk serve`
               (serve/server.py's build_app: page, offer/answer, stats, interrupt, close, avatar
               upload; token, host-header, body and rate rules) on its own host:port, with
               serve/ray_front.py placing the sessions. It relays SDP only, never media. (Ray's
               HTTP proxy is not used: the page's guards need aiohttp's streaming request bodies.)
  AvatarWorker N replicas (or min..max, autoscaled on sessions in use). Each opens the backend
               once, warms it up, and runs up to K sessions, each its own Session and its own
               aiortc peer, whose ICE host candidates are the replica node's address: media flows
               browser <-> replica.

As a `serve run` target (arguments as key=value, the same names as RayOptions and ServeConfig):

    serve run edgetalk.serve.ray_app:build replicas=2 sessions_per_replica=2 port=8080

Needs the `ray` extra: pip install 'edgetalk[ray]'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from ..errors import InputError
from .server import ServeConfig, SessionsBusy

log = logging.getLogger("edgetalk.serve")

APP_NAME = "edgetalk"
HEALTH_CHECK_S = 2.0  # a dead replica is noticed (and replaced) within a few of these


@dataclass
class RayOptions:
    replicas: int = 1  # worker replicas (the minimum when max_replicas is larger)
    max_replicas: int | None = None  # autoscale up to this on sessions in use; None: fixed
    sessions_per_replica: int = 1  # K: sessions one replica (one opened backend) runs at once
    cpus: float = 1.0  # Ray CPUs each worker replica reserves
    gpus: float = 0.0  # GPU fraction each worker replica reserves (e.g. 0.25: four per GPU)
    threads: int | None = None  # compute threads per replica (edgetalk's --threads)
    ice_host: str | None = None  # address for the replicas' ICE candidates; None: the node's

    def check(self) -> None:
        if self.replicas < 1:
            raise InputError("--replicas must be 1 or more")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise InputError("--max-replicas must be at least --replicas")
        if self.sessions_per_replica < 1:
            raise InputError("--sessions-per-replica must be 1 or more")
        if not (self.cpus >= 0 and self.gpus >= 0):  # NaN too
            raise InputError("--replica-cpus and --replica-gpus must be 0 or more")

    @property
    def capacity(self) -> int:
        return (self.max_replicas or self.replicas) * self.sessions_per_replica


def _udp_sockets() -> int | None:
    """UDP sockets this process holds (ICE ports), from /proc (Linux); None elsewhere."""
    inodes = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        try:
            with open(table) as f:
                n += sum(1 for line in f.readlines()[1:] if line.split()[9] in inodes)
        except OSError:
            continue
    return n


class AvatarWorker:
    """One opened backend, warmed up once, and up to K sessions with their own aiortc peers."""

    async def __init__(self, config: ServeConfig, options: RayOptions):
        import ray

        from ..runtime.threads import set_threads
        from .server import AvatarServer, restrict_ice_to

        set_threads(options.threads)
        cfg = dataclasses.replace(
            config, host="127.0.0.1", port=0, token=None, max_sessions=options.sessions_per_replica
        )
        # Opening and warming up take seconds: off this replica's event loop.
        self.server = await asyncio.to_thread(AvatarServer, cfg)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        node_ip = options.ice_host or ray.util.get_node_ip_address()
        self.undo_ice = restrict_ice_to(node_ip)  # candidates on this node's address only
        self.where = {
            "replica": self.replica,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": node_ip,
        }
        log.info("avatar worker %s ready: %s", self.replica, self.server.describe_backend())

    # ---- Serve hooks -----------------------------------------------------------------------------
    def record_routing_stats(self) -> dict:
        return {"free": self.server.config.max_sessions - self.server.active}

    def record_autoscaling_stats(self) -> dict:
        return {"sessions": self.server.active, "slots": self.server.config.max_sessions}

    async def __del__(self):
        await self.server.close_all()
        self.undo_ice()

    # ---- called by the ingress -------------------------------------------------------------------
    async def info(self) -> dict:
        return {"backend": self.server.describe_backend(), "resolution": self.server.resolution}

    async def open(self, client: str, sdp: str, crop, name: str, exclude=()) -> dict:
        if self.replica in exclude:  # the router sends here only when every replica was tried
            return {"busy": True, "exhausted": True, "replica": self.replica}
        try:
            answer = await self.server.open_peer(client, sdp, crop, name)
        except SessionsBusy as e:
            return {"busy": True, "replica": self.replica, "message": str(e)}
        except InputError as e:
            return {"error": str(e), "status": 400}
        except Exception:
            log.exception("offer failed")
            return {"error": "could not start a session (the server log has the details)"} | {
                "status": 500
            }
        return {**answer, "replica": self.replica, "where": self.where}

    async def session(self, op: str, pid: str, secret: str, replica: str | None = None) -> dict:
        if replica != self.replica:  # its replica is gone: the router sent it elsewhere
            return {"gone": True}
        if op == "stats":
            result = await self.server.session_stats(pid, secret)
        elif op == "interrupt":
            result = await self.server.interrupt_session(pid, secret)
        elif op == "close":
            result = await self.server.close_session(pid, secret)
        else:
            raise ValueError(op)
        if isinstance(result, dict):
            result = {**self.where, **result}
        return {"result": result}

    async def sessions(self, replica: str | None = None) -> dict:
        if replica is not None and replica != self.replica:
            return {"gone": True}
        return {"live": {pid: p.state for pid, p in self.server.peers.items()}}

    async def load(self, replica: str | None = None) -> dict:
        """Slots, session threads and UDP sockets in use (tests check nothing leaks)."""
        if replica is not None and replica != self.replica:
            return {"gone": True}
        names = [t.name for t in threading.enumerate()]
        return {
            **self.where,
            "active": self.server.active,
            "max_sessions": self.server.config.max_sessions,
            "threads": len(names),
            "session_threads": sum(
                n == "edgetalk-session" or n.startswith("edgetalk-serve-") for n in names
            ),
            "udp_sockets": _udp_sockets(),
        }


class Ingress:
    """The page and the signalling, on the same aiohttp app as `edgetalk serve`."""

    async def __init__(self, worker, config: ServeConfig, options: RayOptions):
        from ..runtime.avatar import prepare_avatar
        from .ray_front import RayFront
        from .server import start_site

        info = await worker.options(method_name="info").remote()
        default = await asyncio.to_thread(
            prepare_avatar, config.avatar, info["resolution"], face_check=True
        )
        name = config.avatar.name if config.avatar else "the embedded avatar"
        self.front = RayFront(config, info["resolution"], default, name, worker, info["backend"])
        self.runner, self.url, self.undo = await start_site(self.front)
        self.front.start()
        log.info("ingress: open %s (%s)", self.url, info["backend"])

    async def address(self) -> str:
        return self.url

    async def health(self) -> dict:
        f = self.front
        return {
            "active": f.active,
            "placed": {pid: {**p.where, "connected": p.connected} for pid, p in f.placed.items()},
            "lost_sessions": f.lost_sessions,
            "sessions_started": f.sessions_started,
        }

    async def __del__(self):
        await self.front.close_all()
        await self.runner.cleanup()
        self.undo()


def deployments(config: ServeConfig, options: RayOptions):
    """The application: Ingress bound to the AvatarWorker deployment with these options."""
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

    config.check()
    options.check()
    config = dataclasses.replace(config, max_sessions=options.capacity)
    scale: dict = {"num_replicas": options.replicas}
    if options.max_replicas is not None and options.max_replicas > options.replicas:
        scale = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=options.replicas,
                max_replicas=options.max_replicas,
                policy=AutoscalingPolicy(
                    policy_function="edgetalk.serve.ray_router:sessions_policy"
                ),
                upscale_delay_s=2.0,
                downscale_delay_s=60.0,
            )
        }
    worker = serve.deployment(AvatarWorker, name="AvatarWorker").options(
        **scale,
        ray_actor_options={"num_cpus": options.cpus, "num_gpus": options.gpus},
        max_ongoing_requests=64,  # signalling calls, short; sessions are bounded by K
        health_check_period_s=HEALTH_CHECK_S,
        health_check_timeout_s=10.0,
        request_router_config=RequestRouterConfig(
            request_router_class="edgetalk.serve.ray_router:SessionRouter",
            request_routing_stats_period_s=1.0,
        ),
    )
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=1,
        # On the head node: the address the page is opened at does not move.
        ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
        health_check_period_s=HEALTH_CHECK_S,
    )
    return ingress.bind(worker.bind(config, options), config, options)


_FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)} | {
    f.name: f for f in dataclasses.fields(RayOptions)
}


def build(args: dict):
    """`serve run edgetalk.serve.ray_app:build key=value ...` (Serve's application builder)."""
    from ..runtime.tokens import resolve_token

    cfg_kw, opt_kw = {}, {}
    args = dict(args)
    token = resolve_token(args.pop("token", None), _path(args.pop("token_file", None)))
    for key, value in args.items():
        if key not in _FIELDS or key in ("extra", "token_generated", "max_sessions"):
            raise InputError(f"unknown argument {key!r} for the edgetalk Ray Serve app")
        kind = str(_FIELDS[key].type)
        if "Path" in kind:
            value = _path(value)
        elif "int" in kind:
            value = int(value)
        elif "float" in kind:
            value = float(value)
        target = opt_kw if key in {f.name for f in dataclasses.fields(RayOptions)} else cfg_kw
        target[key] = value
    return deployments(ServeConfig(token=token, **cfg_kw), RayOptions(**opt_kw))


def _path(value) -> Path | None:
    return None if value in (None, "") else Path(value)


def run(config: ServeConfig, options: RayOptions, address: str | None) -> str:
    """Connect to (or start) Ray, deploy the app, and return the page's URL."""
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    serve.start(proxy_location="Disabled")  # the ingress serves HTTP itself
    handle = serve.run(deployments(config, options), name=APP_NAME, route_prefix=None)
    return handle.address.remote().result()
