"""The aiohttp application: the page, the signalling and the JSON endpoints.

    GET  /                      the page (serve/static/index.html)
    GET  /static/...            its script and style
    GET  /api/config            {token_required} (and, with the token, the backend and limits)
    GET  /api/health            active / max sessions
    POST /api/avatar            an image (raw body) -> prepare_avatar with the face check
    GET  /api/avatar/{id}.png   the prepared crop of an avatar ("default" or an upload)
    POST /offer                 {sdp, type: "offer", avatar} -> {sdp, type: "answer", id}
    GET  /api/stats?id=         the session's own measurements (JSON)
    POST /api/interrupt         {id} -> Session.interrupt()
    POST /api/close?id=         stop a session (the page's Stop button and its pagehide beacon)

Every /api and /offer request needs the token when the server has one (header X-EdgeTalk-Token or
?token=). POSTs other than /api/close must carry that header (empty without a token): browsers
will not send a custom header cross-site without a CORS preflight, which is never granted. On a
loopback address only loopback Host headers are answered (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import logging
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger("edgetalk.serve")

STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOADED_AVATARS = 16
TOKEN_HEADER = "X-EdgeTalk-Token"
LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_of(host_header: str) -> str:
    h = host_header.strip()
    if h.startswith("["):  # [::1]:8080
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def png_bytes(rgb: np.ndarray) -> bytes:
    import av

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
    return b"".join(bytes(p) for p in codec.encode(frame))


@dataclass
class ServeConfig:
    bundle: Path | None = None
    checkpoint: Path | None = None
    backend: str | None = None
    avatar: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_sessions: int = 1
    seed: int = 0
    late_policy: str = "drop"
    cert: Path | None = None
    key: Path | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.max_sessions < 1:
            raise InputError("--max-sessions must be 1 or more")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be 0..65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise InputError("--token must not be empty")
        if not is_loopback(self.host) and not self.token:
            raise InputError(
                f"serving on {self.host} (not a loopback address) lets other machines in: "
                "give --token T, and open the page as http://HOST:PORT/?token=T"
            )
        if (self.cert is None) != (self.key is None):
            raise InputError("give --cert and --key together")


class AvatarServer:
    """Holds the opened backend, the avatars and the live peers (at most max_sessions)."""

    def __init__(self, config: ServeConfig):
        from ..runtime.avatar import prepare_avatar
        from ..runtime.loader import open_backend

        config.check()
        self.config = config
        self.backend = open_backend(
            bundle=config.bundle, checkpoint=config.checkpoint, backend=config.backend
        )
        self.resolution = self.backend.cfg.render.resolution
        default = prepare_avatar(config.avatar, self.resolution, face_check=True)
        name = config.avatar.name if config.avatar else "the embedded avatar"
        self.avatars: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict(
            default=(default, name)
        )
        self.peers: dict[str, object] = {}
        self.reserved = 0
        self.finished: OrderedDict[str, dict] = OrderedDict()  # last stats of ended sessions
        self.sessions_started = 0
        self._png_cache: dict[str, bytes] = {}
        self.warm_up()

    def warm_up(self, chunks: int = 3) -> None:
        """Run a few chunks of silence once: the first calls into a backend are slow (lazy
        initialisation), and the first visitor's first-frame delay should not pay for them."""
        from ..models.config import SAMPLES_PER_FRAME
        from ..runtime.session import Session

        s = Session(
            avatar=self.avatars["default"][0],
            backend=self.backend,
            face_check=False,
            realtime=False,
        )
        s.push_audio(np.zeros(chunks * s.chunk * SAMPLES_PER_FRAME, np.float32))
        s.close()
        for _ in s.frames():
            pass

    # ---- slots -----------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.peers) + self.reserved

    def try_reserve(self) -> bool:
        if self.active >= self.config.max_sessions:
            return False
        self.reserved += 1
        return True

    def unreserve(self) -> None:
        self.reserved = max(0, self.reserved - 1)

    def release(self, peer) -> None:
        if self.peers.pop(peer.id, None) is not None:
            try:
                stats = peer.stats()
            except Exception:  # the slot is freed whatever happens
                stats = {"id": peer.id, "closed": True, "close_reason": peer.close_reason}
            self.finished[peer.id] = stats
            while len(self.finished) > 32:
                self.finished.popitem(last=False)
            log.info(
                "session %s ended (%s): %s",
                peer.id[:8],
                peer.close_reason,
                peer.session.stats.summary().replace("\n", "; "),
            )

    def busy_message(self) -> str:
        n = self.config.max_sessions
        return (
            f"busy: this server runs at most {n} avatar session{'s' if n != 1 else ''} at a time "
            "and all are in use; try again when one ends"
        )

    # ---- avatars ---------------------------------------------------------------------------------
    def prepare_upload(self, data: bytes, filename: str) -> tuple[str, np.ndarray]:
        """The same preparation and face check as the CLI's --avatar (runs in a worker thread)."""
        import uuid

        from ..runtime.avatar import prepare_avatar

        if not data:
            raise InputError("the uploaded file is empty")
        name = Path(filename or "photo").name[:120] or "photo"
        suffix = Path(name).suffix.lower()[:8] or ".img"
        with tempfile.TemporaryDirectory(prefix="edgetalk-avatar-") as d:
            path = Path(d) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                crop = prepare_avatar(path, self.resolution, face_check=True)
            except InputError as e:
                msg = str(e).replace(str(path), name)
                cut = msg.find(", or pass --no-face-check")
                raise InputError(msg[:cut] + "." if cut > 0 else msg) from None
        avatar_id = uuid.uuid4().hex[:16]
        self.avatars[avatar_id] = (crop, name)
        while len(self.avatars) > MAX_UPLOADED_AVATARS + 1:
            oldest = next(k for k in self.avatars if k != "default")
            self.avatars.pop(oldest)
            self._png_cache.pop(oldest, None)
        return avatar_id, crop

    def avatar_png(self, avatar_id: str) -> bytes | None:
        if avatar_id not in self.avatars:
            return None
        if avatar_id not in self._png_cache:
            self._png_cache[avatar_id] = png_bytes(self.avatars[avatar_id][0])
        return self._png_cache[avatar_id]

    def make_session(self, crop: np.ndarray):
        from ..runtime.session import Session

        return Session(
            avatar=crop,  # already prepared and face-checked: a no-op crop
            backend=self.backend,
            seed=self.config.seed,
            face_check=False,
            realtime=True,
            late_policy=self.config.late_policy,
        )

    async def close_all(self) -> None:
        await asyncio.gather(
            *(p.close("server stopping") for p in list(self.peers.values())),
            return_exceptions=True,
        )


# ---- HTTP ----------------------------------------------------------------------------------------
def _json(data: dict, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


def _error(message: str, status: int = 400, **extra):
    return _json({"error": message, **extra}, status=status)


def build_app(server: AvatarServer):
    from aiohttp import web

    cfg = server.config
    loopback_only = is_loopback(cfg.host)

    def token_ok(request) -> bool:
        if not cfg.token:
            return True
        given = request.headers.get(TOKEN_HEADER) or request.query.get("token") or ""
        return hmac.compare_digest(given.encode(), cfg.token.encode())

    @web.middleware
    async def guard(request, handler):
        if loopback_only and not is_loopback(_host_of(request.host or "")):
            return web.Response(
                status=403,
                text="edgetalk serve answers only to loopback addresses (open http://127.0.0.1:"
                f"{request.url.port or cfg.port}/)",
            )
        path = request.path
        protected = path == "/offer" or (path.startswith("/api/") and path != "/api/config")
        if protected and not token_ok(request):
            return _error(
                "this server needs its access token: open the page as "
                "http://HOST:PORT/?token=YOUR_TOKEN (the value given to edgetalk serve --token)",
                status=401,
                token_required=True,
            )
        if (
            request.method == "POST"
            and path != "/api/close"
            and TOKEN_HEADER not in request.headers
        ):
            return _error(f"missing {TOKEN_HEADER} header: requests must come from the page", 400)
        try:
            return await handler(request)
        except InputError as e:
            return _error(str(e), 400)

    async def index(request):
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def config(request):
        d = {"token_required": bool(cfg.token)}
        if token_ok(request):
            d.update(
                backend=server.backend.describe(),
                resolution=server.resolution,
                max_sessions=cfg.max_sessions,
                active=server.active,
                default_avatar=server.avatars["default"][1],
            )
        return _json(d)

    async def health(request):
        return _json(
            {
                "active": server.active,
                "max_sessions": cfg.max_sessions,
                "peers": list(server.peers),
                "sessions_started": server.sessions_started,
            }
        )

    async def upload_avatar(request):
        data = await request.read()
        if len(data) > MAX_UPLOAD_BYTES:
            return _error(f"the photo is over {MAX_UPLOAD_BYTES // 2**20} MB", 413)
        from urllib.parse import unquote

        filename = unquote(request.headers.get("X-Filename", "photo"))
        loop = asyncio.get_running_loop()
        try:
            avatar_id, crop = await loop.run_in_executor(
                None, server.prepare_upload, data, filename
            )
        except InputError as e:
            return _error(str(e), 400)
        preview = "data:image/png;base64," + base64.b64encode(png_bytes(crop)).decode()
        return _json({"id": avatar_id, "name": server.avatars[avatar_id][1], "preview": preview})

    async def avatar_png(request):
        png = server.avatar_png(request.match_info["id"])
        if png is None:
            return _error("unknown avatar", 404)
        return web.Response(body=png, content_type="image/png")

    async def offer(request):
        try:
            body = await request.json()
            sdp, kind = body["sdp"], body["type"]
        except (ValueError, KeyError, TypeError):
            return _error("the offer must be JSON {sdp, type: 'offer', avatar}", 400)
        if kind != "offer" or not isinstance(sdp, str):
            return _error("the offer must be JSON {sdp, type: 'offer', avatar}", 400)
        avatar_id = body.get("avatar") or "default"
        if avatar_id not in server.avatars:
            return _error("unknown avatar (the server restarted?): upload the photo again", 400)
        if not server.try_reserve():
            return _error(server.busy_message(), 503, busy=True)
        peer = None
        try:
            from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

            from .media import Peer

            crop, name = server.avatars[avatar_id]
            loop = asyncio.get_running_loop()
            session = await loop.run_in_executor(None, server.make_session, crop)
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: nothing outside
            peer = Peer(server, pc, session, name)
            peer.attach()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if "audio" not in kinds:
                raise InputError("the offer has no audio: the page must send its microphone")
            if "video" not in kinds:
                raise InputError("the offer has no video to receive (addTransceiver('video'))")
            peer.add_outgoing()
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            server.peers[peer.id] = peer
            server.unreserve()
            server.sessions_started += 1
            log.info("session %s: offer answered (avatar %s)", peer.id[:8], name)
            return _json(
                {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "id": peer.id}
            )
        except Exception as e:
            server.unreserve()
            if peer is not None:
                await peer.close(f"offer failed: {e}")
            if isinstance(e, InputError):
                return _error(str(e), 400)
            log.exception("offer failed")
            return _error(f"could not start a session: {type(e).__name__}: {e}", 500)

    def _peer(request, body: dict | None = None):
        pid = request.query.get("id") or (body or {}).get("id") or ""
        return server.peers.get(pid), pid

    async def stats(request):
        peer, pid = _peer(request)
        if peer is None:
            if pid in server.finished:
                return _json({**server.finished[pid], "closed": True})
            return _error("no such session", 404)
        return _json(peer.stats())

    async def interrupt(request):
        try:
            body = await request.json()
        except ValueError:
            body = {}
        peer, _ = _peer(request, body)
        if peer is None:
            return _error("no such session", 404)
        discarded = peer.interrupt()
        return _json({"discarded_frames": discarded, **peer.stats()})

    async def close(request):
        peer, pid = _peer(request)
        if peer is not None:
            await peer.close("stopped by the page")
        return _json({"closed": pid})

    async def on_shutdown(app):
        await server.close_all()

    app = web.Application(client_max_size=MAX_UPLOAD_BYTES + 65536, middlewares=[guard])
    app.add_routes(
        [
            web.get("/", index),
            web.get("/api/config", config),
            web.get("/api/health", health),
            web.post("/api/avatar", upload_avatar),
            web.get("/api/avatar/{id}.png", avatar_png),
            web.post("/offer", offer),
            web.get("/api/stats", stats),
            web.post("/api/interrupt", interrupt),
            web.post("/api/close", close),
            web.static("/static/", STATIC_DIR),
        ]
    )
    app.on_shutdown.append(on_shutdown)
    app["server"] = server
    return app


# ---- ICE on loopback -----------------------------------------------------------------------------
_ice_lock = threading.Lock()
_ice_users = 0
_ice_original = None


def restrict_ice_to(host: str):
    """Gather ICE host candidates only on the served address, so a loopback server opens no UDP
    port on other interfaces (aioice otherwise uses every interface but loopback). Returns an
    undo callable. A wildcard host (0.0.0.0, ::) keeps aioice's choice."""
    global _ice_users, _ice_original
    h = host.strip("[]")
    if h.lower() in LOOPBACK_NAMES:
        h = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return lambda: None
    if ip.is_unspecified:
        return lambda: None
    import aioice.ice

    addr = str(ip)

    def only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [addr] if (use_ipv6 if ip.version == 6 else use_ipv4) else []

    with _ice_lock:
        if _ice_users == 0:
            _ice_original = aioice.ice.get_host_addresses
        _ice_users += 1
        aioice.ice.get_host_addresses = only

    def undo() -> None:
        global _ice_users
        with _ice_lock:
            _ice_users -= 1
            if _ice_users == 0 and _ice_original is not None:
                aioice.ice.get_host_addresses = _ice_original

    return undo


# ---- running -------------------------------------------------------------------------------------
def _ssl_context(cfg: ServeConfig):
    if cfg.cert is None:
        return None
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    except (OSError, ssl.SSLError) as e:
        raise InputError(f"cannot load --cert/--key: {e}") from None
    return ctx


async def start_site(server: AvatarServer):
    """Start listening; returns (runner, url, undo_ice)."""
    from aiohttp import web

    cfg = server.config
    ssl_ctx = _ssl_context(cfg)
    app = build_app(server)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ssl_ctx)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise InputError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    port = runner.addresses[0][1]
    undo = restrict_ice_to(cfg.host)
    shown = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
    scheme = "https" if ssl_ctx else "http"
    url = f"{scheme}://{shown}:{port}/"
    return runner, url, undo


async def serve_forever(server: AvatarServer, stop: asyncio.Event | None = None) -> None:
    import signal

    runner, url, undo = await start_site(server)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    cfg = server.config
    shown = url + (f"?token={cfg.token}" if cfg.token else "")
    print(
        f"serve: open {shown} in a browser; {server.backend.describe()}, "
        f"{server.resolution}x{server.resolution}, up to {cfg.max_sessions} session(s); "
        "Ctrl-C to stop",
        flush=True,
    )
    if not is_loopback(cfg.host) and cfg.cert is None:
        print(
            "note: browsers give the microphone only to https pages or localhost: pass "
            "--cert/--key, or reach it through an ssh tunnel to 127.0.0.1",
            flush=True,
        )
    try:
        await stop.wait()
    finally:
        print("serve: stopping", flush=True)
        await server.close_all()
        await runner.cleanup()
        undo()


class BackgroundServer:
    """Run a server on its own event loop in a thread (tests, notebooks):

    with BackgroundServer(ServeConfig(port=0)) as srv:
        print(srv.url)
    """

    def __init__(self, config: ServeConfig, server: AvatarServer | None = None):
        self.server = server or AvatarServer(config)
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="edgetalk-serve", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # reported to start()
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        runner, self.url, undo = await start_site(self.server)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close_all()
            await runner.cleanup()
            undo()

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn, timeout: float = 10.0):
        """Run fn() on the server's loop (for inspecting peers safely) and return its result."""

        async def wrapper():
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
