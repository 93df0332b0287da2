"""The aiohttp application: the page, the signalling and the JSON endpoints.

    GET  /                      the page (serve/static/index.html)
    GET  /static/...            its script and style
    GET  /api/config            {token_required} (and, with the token, the backend and limits)
    GET  /api/health            active / max sessions (no session ids)
    POST /api/avatar            an image (raw body) -> prepare_avatar with the face check
    GET  /api/avatar/{id}.png   the prepared crop of an avatar ("default" or an upload)
    POST /offer                 {sdp, type: "offer", avatar} -> {sdp, type: "answer", id, secret}
    GET  /api/stats?id=         the session's own measurements (JSON)
    POST /api/interrupt         {id} -> Session.interrupt()
    POST /api/close?id=         stop a session (the page's Stop button and its pagehide)

The token (when the server has one) travels only in the X-EdgeTalk-Token header, never in a URL:
the page takes it from the URL's #fragment (which browsers never send) or from its token box.
Every POST must carry that header (empty without a token): browsers will not send a custom header
cross-site without a CORS preflight, which is never granted. On a loopback address only loopback
Host headers are answered (no DNS rebinding). A session is controlled only with the secret its
offer returned (X-EdgeTalk-Session header): another token holder cannot stop, interrupt or read it.

Untrusted input is bounded before work is done: request bodies (size, and a time limit to arrive),
headers (the connection's first request must arrive within HEADER_TIMEOUT_S), JSON bodies (types
checked), SDP offers (64 KB, exactly the page's audio + video sections, parsed off the event loop),
photos (PNG/JPEG/WebP/BMP by magic bytes, a pixel cap, decoded in a small pool, per-client rate),
offers (per-client rate, one pending offer per client, a connect timeout, a maximum length).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..runtime.netaddr import LOOPBACK_NAMES, names_loopback

log = logging.getLogger("edgetalk.serve")

STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
UPLOAD_MAX_PIXELS = 4096 * 4096  # below the CLI's 50 MP: a phone photo fits, a bomb costs ~50 MB
UPLOAD_WORKERS = 2  # photos decoded at once (their own threads: sessions keep the default pool)
UPLOAD_QUEUE = 4  # photos decoding or waiting; more: "busy"
UPLOADS_PER_MINUTE = 10  # per client address
OFFERS_PER_MINUTE = 20  # per client address
PENDING_GRACE_S = 3.0  # an offer still unconnected after this yields its slot to another client
MAX_SDP_BYTES = 64 * 1024  # the page's offer is ~4 KB
MAX_JSON_BYTES = MAX_SDP_BYTES + 4096
BODY_TIMEOUT_S = 10.0  # a request body must arrive within this long
UPLOAD_TIMEOUT_S = 60.0  # ... a photo's (20 MB on a slow link)
HEADER_TIMEOUT_S = 10.0  # headers of a connection's request, and an idle keep-alive connection
MAX_UPLOADED_AVATARS = 16
TOKEN_HEADER = "X-EdgeTalk-Token"
SESSION_HEADER = "X-EdgeTalk-Session"
AVATAR_ID = re.compile(r"default|[0-9a-f]{16}")
SECURITY_HEADERS = {
    # Only this server's own script, style and media; no framing (clickjacking), no plugins.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _host_of(host_header: str) -> str:
    h = host_header.strip()
    if h.startswith("["):  # [::1]:8080
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def secret_ok(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode(), secret.encode())


def png_bytes(rgb: np.ndarray) -> bytes:
    import av

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
    return b"".join(bytes(p) for p in codec.encode(frame))


def display_name(filename: str) -> str:
    """The client's file name as a label only (it never becomes a path): printable, short."""
    name = re.sub(r"[^\w .,()+-]", "_", Path(filename.replace("\\", "/")).name)[:80].strip()
    return name or "photo"


def check_offer_sdp(sdp: str) -> None:
    """Parse the offer (run it off the event loop) and allow exactly what the page sends: one
    audio section (the microphone) and one video section (the avatar it receives)."""
    from aiortc.sdp import SessionDescription

    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise InputError(f"the offer's SDP is over {MAX_SDP_BYTES // 1024} KB")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception:  # aiortc raises many types on malformed SDP
        raise InputError("the offer's SDP cannot be parsed") from None
    kinds = sorted(m.kind for m in desc.media)
    if kinds != ["audio", "video"]:
        raise InputError(
            "the offer must have exactly one audio section (the microphone) and one video "
            f"section, as the page sends; it has {', '.join(kinds) or 'none'}"
        )


class RateLimit:
    """At most `per_minute` events per key in any minute (a token bucket), for a bounded set of
    keys (the least recently seen are forgotten)."""

    def __init__(self, per_minute: int, keys: int = 4096):
        self.rate = per_minute / 60.0
        self.burst = float(per_minute)
        self.keys = keys
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        level, last = self.buckets.pop(key, (self.burst, now))
        level = min(self.burst, level + (now - last) * self.rate)
        ok = level >= 1.0
        self.buckets[key] = (level - 1.0 if ok else level, now)
        while len(self.buckets) > self.keys:
            self.buckets.popitem(last=False)
        return ok


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
    open_mouth: str = "close"  # a photo's open mouth: closed at rest (runtime/rest_pose.py)
    cert: Path | None = None
    key: Path | None = None
    max_session_s: float = 2 * 3600.0  # 0: no limit
    extra: dict = field(default_factory=dict)
    token_generated: bool = False

    def check(self) -> None:
        if self.max_sessions < 1:
            raise InputError("--max-sessions must be 1 or more")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be 0..65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise InputError("the token must not be empty")
        if not self.max_session_s >= 0:  # NaN too
            raise InputError("--max-session-minutes must be 0 (no limit) or more")
        if not names_loopback(self.host) and not self.token:
            # Other machines can reach it: never without a token. One nobody can guess is made,
            # and shown to the operator only (serve/cli.py saves it to a private file).
            from ..runtime.tokens import generate_token

            self.token = generate_token()
            self.token_generated = True
        if (self.cert is None) != (self.key is None):
            raise InputError("give --cert and --key together")


class SessionsBusy(Exception):
    """Every slot is taken: the page shows the message as it is (HTTP 503, busy)."""


class PageHost:
    """What the page's HTTP API needs whoever runs the sessions: the config, the avatars (uploads
    are checked here), the rate limits and the pending offers. Subclasses place the sessions:
    AvatarServer in this process, serve/ray_front.py on Ray Serve replicas."""

    def __init__(self, config: ServeConfig, resolution: int, default: np.ndarray, name: str):
        self.config = config
        self.resolution = resolution
        self.avatars: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict(
            default=(default, name)
        )
        self.pending: dict[str, int] = {}  # client address -> offers being set up
        # last stats of ended sessions, with their secrets: id -> (secret, stats)
        self.finished: OrderedDict[str, tuple[str, dict]] = OrderedDict()
        self.sessions_started = 0
        self._png_cache: dict[str, bytes] = {}
        self.decoder = ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="edgetalk-avatar")
        self.decoding = 0  # photos in the decoder pool or waiting for it
        self.upload_rate = RateLimit(UPLOADS_PER_MINUTE)
        self.offer_rate = RateLimit(OFFERS_PER_MINUTE)

    # ---- what a subclass provides ----------------------------------------------------------------
    active: int = 0  # sessions in use or being set up

    def describe_backend(self) -> str:
        raise NotImplementedError

    def pending_of(self, client: str) -> int:
        raise NotImplementedError

    async def open_session(self, client: str, sdp: str, avatar_id: str) -> dict:
        """Answer an offer: {sdp, type, id, secret}. Raises SessionsBusy or InputError."""
        raise NotImplementedError

    async def session_stats(self, pid: str, secret: str) -> dict | None:
        """The caller's own session's stats (ended ones too), or None: unknown id and wrong
        secret look the same."""
        raise NotImplementedError

    async def interrupt_session(self, pid: str, secret: str) -> dict | None:
        raise NotImplementedError

    async def close_session(self, pid: str, secret: str) -> bool:
        raise NotImplementedError

    async def close_all(self) -> None:
        self.decoder.shutdown(wait=False, cancel_futures=True)

    # ---- shared ----------------------------------------------------------------------------------
    def busy_message(self) -> str:
        n = self.config.max_sessions
        return (
            f"busy: this server runs at most {n} avatar session{'s' if n != 1 else ''} at a time "
            "and all are in use; try again when one ends"
        )

    # ---- avatars ---------------------------------------------------------------------------------
    def prepare_upload(self, data: bytes, filename: str) -> tuple[str, np.ndarray]:
        """The same image rules and face check as the CLI's --avatar, from memory (no file is
        written, so the client names nothing on disk), with the uploads' lower pixel cap. Runs in
        the decoder pool."""
        import uuid

        from ..runtime.avatar import decode_image, prepare_avatar

        if not data:
            raise InputError("the uploaded file is empty")
        name = display_name(filename)
        rgb = decode_image(data, name, max_pixels=UPLOAD_MAX_PIXELS)
        try:
            crop = prepare_avatar(rgb, self.resolution, face_check=True)
        except InputError as e:
            msg = str(e).replace("the image", name, 1)
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

    def remember_finished(self, pid: str, secret: str, stats: dict) -> None:
        self.finished[pid] = (secret, stats)
        while len(self.finished) > 32:
            self.finished.popitem(last=False)

    def finished_stats(self, pid: str, secret: str) -> dict | None:
        done = self.finished.get(pid)
        if done is not None and secret_ok(secret, done[0]):
            return {**done[1], "closed": True}
        return None


class AvatarServer(PageHost):
    """Holds the opened backend and the live peers (at most max_sessions), in this process."""

    def __init__(self, config: ServeConfig):
        from ..runtime.avatar import prepare_avatar
        from ..runtime.loader import open_backend

        config.check()
        self.config = config
        self.backend = open_backend(
            bundle=config.bundle, checkpoint=config.checkpoint, backend=config.backend
        )
        default = prepare_avatar(config.avatar, self.backend.cfg.render.resolution, face_check=True)
        name = config.avatar.name if config.avatar else "the embedded avatar"
        super().__init__(config, self.backend.cfg.render.resolution, default, name)
        self.peers: dict[str, object] = {}
        self.reserved = 0
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

    def pending_of(self, client: str) -> int:
        """Offers of this client being set up or answered but not connected yet."""
        waiting = sum(
            1
            for p in self.peers.values()
            if getattr(p, "client", None) == client and p.connected_at is None
        )
        return waiting + self.pending.get(client, 0)

    def stale_offer(self, client: str):
        """The oldest session of another client still not connected PENDING_GRACE_S after its
        offer (a browser on this network connects in well under a second), or None. Such an
        offer gives its slot to a new one: repeating unconnected offers cannot hold a slot."""
        now = time.monotonic()
        stale = [
            p
            for p in self.peers.values()
            if p.connected_at is None
            and not p.closed
            and p.client != client
            and now - p.created > PENDING_GRACE_S
        ]
        return min(stale, key=lambda p: p.created, default=None)

    def release(self, peer) -> None:
        if self.peers.pop(peer.id, None) is not None:
            try:
                stats = peer.stats()
            except Exception:  # the slot is freed whatever happens
                stats = {"id": peer.id, "closed": True, "close_reason": peer.close_reason}
            self.remember_finished(peer.id, peer.secret, stats)
            log.info(
                "session %s ended (%s): %s",
                peer.id[:8],
                peer.close_reason,
                peer.session.stats.summary().replace("\n", "; "),
            )

    def make_session(self, crop: np.ndarray):
        from ..runtime.session import Session

        return Session(
            avatar=crop,  # already prepared and face-checked: a no-op crop
            backend=self.backend,
            seed=self.config.seed,
            face_check=False,
            open_mouth=self.config.open_mouth,
            realtime=True,
            late_policy=self.config.late_policy,
        )

    async def close_all(self) -> None:
        await asyncio.gather(
            *(p.close("server stopping") for p in list(self.peers.values())),
            return_exceptions=True,
        )
        await super().close_all()

    # ---- the sessions (PageHost) -----------------------------------------------------------------
    def describe_backend(self) -> str:
        return self.backend.describe()

    async def open_session(self, client: str, sdp: str, avatar_id: str) -> dict:
        crop, name = self.avatars[avatar_id]
        return await self.open_peer(client, sdp, crop, name)

    async def open_peer(self, client: str, sdp: str, crop: np.ndarray, name: str) -> dict:
        """A Session and its aiortc peer for this offer, in a free slot of this process."""
        if not self.try_reserve():
            stale = self.stale_offer(client)
            if stale is not None:
                await stale.close("did not connect; its slot went to another client")
            if not self.try_reserve():
                raise SessionsBusy(self.busy_message())
        peer = None
        try:
            from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

            from .media import Peer

            loop = asyncio.get_running_loop()
            session = await loop.run_in_executor(None, self.make_session, crop)
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: nothing outside
            peer = Peer(self, pc, session, name, client=client, max_s=self.config.max_session_s)
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
            self.peers[peer.id] = peer
            self.unreserve()
            self.sessions_started += 1
            log.info("session %s: offer answered (avatar %s)", peer.id[:8], name)
            return {
                "sdp": pc.localDescription.sdp,
                "type": pc.localDescription.type,
                "id": peer.id,
                "secret": peer.secret,
            }
        except BaseException:
            self.unreserve()
            if peer is not None:
                await peer.close("offer failed")
            raise

    def own_peer(self, pid: object, secret: str):
        """The caller's own live session, or None (unknown id and wrong secret look the same)."""
        peer = self.peers.get(pid) if isinstance(pid, str) else None
        if peer is None or not secret_ok(secret, peer.secret):
            return None
        return peer

    async def session_stats(self, pid: str, secret: str) -> dict | None:
        peer = self.own_peer(pid, secret)
        if peer is not None:
            return peer.stats()
        return self.finished_stats(pid, secret)

    async def interrupt_session(self, pid: str, secret: str) -> dict | None:
        peer = self.own_peer(pid, secret)
        if peer is None:
            return None
        discarded = peer.interrupt()
        return {"discarded_frames": discarded, **peer.stats()}

    async def close_session(self, pid: str, secret: str) -> bool:
        peer = self.own_peer(pid, secret)
        if peer is None:
            return False
        await peer.close("stopped by the page")
        return True


# ---- HTTP ----------------------------------------------------------------------------------------
def _json(data: dict, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


def _error(message: str, status: int = 400, **extra):
    return _json({"error": message, **extra}, status=status)


class _BodyTooBig(Exception):
    pass


async def _read_body(request, limit: int, timeout: float) -> bytes:
    """The whole body, at most `limit` bytes, arriving within `timeout` seconds (a client that
    declares 1 MB and sends 3 bytes does not hold a handler)."""
    if request.content_length is not None and request.content_length > limit:
        raise _BodyTooBig
    parts, n = [], 0

    async def read() -> None:
        nonlocal n
        while True:
            chunk = await request.content.read(65536)
            if not chunk:
                return
            n += len(chunk)
            if n > limit:
                raise _BodyTooBig
            parts.append(chunk)

    await asyncio.wait_for(read(), timeout)
    return b"".join(parts)


def _json_object(body: bytes, what: str) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{what} must be a JSON object") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a JSON object")
    return data


def build_app(server: PageHost):
    from aiohttp import web

    cfg = server.config
    loopback_only = names_loopback(cfg.host)

    def token_ok(request) -> bool:
        if not cfg.token:
            return True
        given = request.headers.get(TOKEN_HEADER, "")
        return hmac.compare_digest(given.encode(), cfg.token.encode())

    @web.middleware
    async def guard(request, handler):
        if loopback_only and not names_loopback(_host_of(request.host or "")):
            return web.Response(
                status=403,
                text="edgetalk serve answers only to loopback addresses (open http://127.0.0.1:"
                f"{request.url.port or cfg.port}/)",
            )
        path = request.path
        protected = path == "/offer" or (path.startswith("/api/") and path != "/api/config")
        if protected and not token_ok(request):
            return _error(
                "this server needs its access token: type it into the page, or open the page as "
                "http://HOST:PORT/#token=YOUR_TOKEN (the token edgetalk serve was given or made)",
                status=401,
                token_required=True,
            )
        if request.method == "POST":
            if TOKEN_HEADER not in request.headers:
                return _error(
                    f"missing {TOKEN_HEADER} header: requests must come from the page", 400
                )
            try:
                upload = path == "/api/avatar"
                request["body"] = await _read_body(
                    request,
                    MAX_UPLOAD_BYTES if upload else MAX_JSON_BYTES,
                    UPLOAD_TIMEOUT_S if upload else BODY_TIMEOUT_S,
                )
            except _BodyTooBig:
                r = _error("the request body is too large", 413)
                r.force_close()
                return r
            except asyncio.TimeoutError:
                r = _error("the request body did not arrive in time", 408)
                r.force_close()
                return r
        try:
            return await handler(request)
        except InputError as e:
            return _error(str(e), 400)
        except web.HTTPException:
            raise
        except Exception:  # the log has the traceback; the client never sees internals
            log.exception("%s %s failed", request.method, path)
            return _error("internal error (the server log has the details)", 500)

    async def security_headers(request, response) -> None:
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)

    async def index(request):
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def config(request):
        d = {"token_required": bool(cfg.token)}
        if token_ok(request):
            d.update(
                backend=server.describe_backend(),
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
                "sessions_started": server.sessions_started,
            }
        )

    async def upload_avatar(request):
        client = request.remote or "?"
        if not server.upload_rate.allow(client):
            return _error(
                f"too many photos: at most {UPLOADS_PER_MINUTE} a minute; wait a little", 429
            )
        if server.decoding >= UPLOAD_QUEUE:
            return _error("busy checking other photos; try again in a few seconds", 503)
        from urllib.parse import unquote

        filename = unquote(request.headers.get("X-Filename", "photo"))
        loop = asyncio.get_running_loop()
        server.decoding += 1
        try:
            avatar_id, crop = await loop.run_in_executor(
                server.decoder, server.prepare_upload, request["body"], filename
            )
        finally:
            server.decoding -= 1
        preview = "data:image/png;base64," + base64.b64encode(png_bytes(crop)).decode()
        return _json({"id": avatar_id, "name": server.avatars[avatar_id][1], "preview": preview})

    async def avatar_png(request):
        png = server.avatar_png(request.match_info["id"])
        if png is None:
            return _error("unknown avatar", 404)
        return web.Response(body=png, content_type="image/png")

    async def offer(request):
        bad = "the offer must be JSON {sdp, type: 'offer', avatar}"
        try:
            body = _json_object(request["body"], "the offer")
        except InputError:
            return _error(bad, 400)
        sdp, kind, avatar_id = body.get("sdp"), body.get("type"), body.get("avatar", "default")
        if kind != "offer" or not isinstance(sdp, str) or not isinstance(avatar_id, str | None):
            return _error(bad, 400)
        avatar_id = avatar_id or "default"
        if not AVATAR_ID.fullmatch(avatar_id) or avatar_id not in server.avatars:
            return _error("unknown avatar (the server restarted?): upload the photo again", 400)
        client = request.remote or "?"
        if server.pending_of(client) >= 1:
            return _error("this client already has an offer waiting to connect", 429)
        if not server.offer_rate.allow(client):
            return _error(f"too many offers: at most {OFFERS_PER_MINUTE} a minute", 429)
        loop = asyncio.get_running_loop()
        server.pending[client] = server.pending.get(client, 0) + 1
        try:
            # Parsed off the event loop, and before any Session exists.
            await loop.run_in_executor(None, check_offer_sdp, sdp)
            return await _start_peer(client, sdp, avatar_id)
        finally:
            server.pending[client] -= 1
            if not server.pending[client]:
                del server.pending[client]

    async def _start_peer(client: str, sdp: str, avatar_id: str):
        try:
            return _json(await server.open_session(client, sdp, avatar_id))
        except SessionsBusy as e:
            return _error(str(e), 503, busy=True)
        except InputError as e:
            return _error(str(e), 400)
        except Exception:
            log.exception("offer failed")
            return _error("could not start a session (the server log has the details)", 500)

    def _given_secret(request) -> str:
        return request.headers.get(SESSION_HEADER, "")

    async def stats(request):
        pid = request.query.get("id", "")
        st = await server.session_stats(pid, _given_secret(request))
        return _error("no such session", 404) if st is None else _json(st)

    async def interrupt(request):
        body = _json_object(request["body"] or b"{}", "the interrupt request")
        pid = body.get("id", request.query.get("id", ""))
        if not isinstance(pid, str):
            return _error("the interrupt request must be JSON {id: string}", 400)
        st = await server.interrupt_session(pid, _given_secret(request))
        return _error("no such session", 404) if st is None else _json(st)

    async def close(request):
        pid = request.query.get("id", "")
        if not await server.close_session(pid, _given_secret(request)):
            return _error("no such session", 404)
        return _json({"closed": pid})

    async def on_shutdown(app):
        await server.close_all()

    app = web.Application(client_max_size=MAX_UPLOAD_BYTES + 65536, middlewares=[guard])
    app.on_response_prepare.append(security_headers)
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
    # keepalive_timeout also bounds how long a new connection may take to send its first request
    # (aiohttp arms it at connect) and how long an idle keep-alive connection stays open.
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=HEADER_TIMEOUT_S
    )
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
    print(
        f"serve: open {url} in a browser; {server.backend.describe()}, "
        f"{server.resolution}x{server.resolution}, up to {cfg.max_sessions} session(s); "
        "Ctrl-C to stop",
        flush=True,
    )
    if not names_loopback(cfg.host) and cfg.cert is None:
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
