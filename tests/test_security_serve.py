"""Security regressions of `edgetalk serve` (issue #16): each test is an attack that worked."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest

pytest.importorskip("aiohttp", reason="edgetalk serve needs aiohttp")
pytest.importorskip("aiortc", reason="edgetalk serve needs aiortc")

from edgetalk.serve import server as server_mod  # noqa: E402
from edgetalk.serve.server import BackgroundServer, ServeConfig  # noqa: E402

TOKEN = "sec-token-51c0"
AUTH = {"X-EdgeTalk-Token": TOKEN}


def _request(url, data=None, headers=None, method=None, timeout=20.0):
    # Only the loopback server these tests start.
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            is_json = r.headers.get("Content-Type", "").startswith("application/json")
            return r.status, json.loads(body or b"{}") if is_json else {}, dict(r.headers)
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body), dict(e.headers)
        except ValueError:
            return e.code, {"text": body.decode(errors="replace")}, dict(e.headers)


@pytest.fixture(scope="module")
def srv():
    old = getattr(server_mod, "HEADER_TIMEOUT_S", None)
    server_mod.HEADER_TIMEOUT_S = 2.0  # read when the site starts
    try:
        s = BackgroundServer(ServeConfig(port=0, token=TOKEN, max_sessions=1)).start()
    finally:
        server_mod.HEADER_TIMEOUT_S = old
    yield s
    s.stop()


def _offer_sdp(audio: int = 1, video: int = 1) -> str:
    from aiortc import RTCPeerConnection

    async def make():
        pc = RTCPeerConnection()
        for _ in range(audio):
            pc.addTransceiver("audio", direction="sendrecv")
        for _ in range(video):
            pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


@pytest.fixture(scope="module")
def offer_sdp():
    return _offer_sdp()


def _post(srv, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    return _request(srv.url + path, data=data, headers=h, method="POST")


def _wait_idle(srv, timeout=15.0):
    t0 = time.monotonic()
    while srv.server.active and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    assert srv.server.active == 0


# ---- 2, 3: uploads --------------------------------------------------------------------------------
def test_upload_playlist_naming_a_local_file_is_refused(srv, tmp_path):
    """`x.m3u8` with the line file:///.../face.mp4 was accepted and the local face came back."""
    from .test_security import _face_mp4

    _face_mp4(tmp_path / "face.mp4")
    m3u8 = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile://{tmp_path}/face.mp4\n"
    status, body, _ = _request(
        srv.url + "api/avatar",
        data=m3u8.encode(),
        headers={**AUTH, "X-Filename": "x.m3u8"},
        method="POST",
    )
    assert status == 400 and "not a PNG, JPEG, WebP or BMP" in body["error"]
    assert str(tmp_path) not in body["error"]


def _png_bomb(w: int, h: int) -> bytes:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    raw = zlib.compress(b"\0" * ((3 * w + 1) * h), 9)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_upload_pixel_cap_and_rate_limit(srv):
    """A 7000x7000 PNG (~150 KB) cost 9 s and 235 MB to decode; uploads were not rate-limited."""
    bomb = _png_bomb(7000, 7000)
    t0 = time.monotonic()
    status, body, _ = _request(
        srv.url + "api/avatar", data=bomb, headers={**AUTH, "X-Filename": "b.png"}, method="POST"
    )
    assert status == 400 and "7000x7000, over the 16,777,216-pixel limit" in body["error"]
    assert time.monotonic() - t0 < 3.0
    limit = srv.server.upload_rate
    srv.server.upload_rate = server_mod.RateLimit(3)
    try:
        codes = [
            _request(
                srv.url + "api/avatar",
                data=b"x",
                headers={**AUTH, "X-Filename": "a.png"},
                method="POST",
            )[0]
            for _ in range(5)
        ]
    finally:
        srv.server.upload_rate = limit
    assert codes == [400, 400, 400, 429, 429]
    assert srv.server.decoder._max_workers == server_mod.UPLOAD_WORKERS  # its own small pool


# ---- 5: sessions belong to their creator ----------------------------------------------------------
def test_session_secret_health_and_pending_offers(srv, offer_sdp):
    status, health, _ = _request(srv.url + "api/health", headers=AUTH)
    assert status == 200 and "peers" not in health  # no session ids for any token holder
    status, ans, _ = _post(srv, "offer", {"sdp": offer_sdp, "type": "offer"})
    assert status == 200, ans
    pid, secret = ans["id"], ans["secret"]
    assert len(secret) >= 40
    try:
        # a second offer from the same client while the first waits to connect
        status, body, _ = _post(srv, "offer", {"sdp": offer_sdp, "type": "offer"})
        assert status == 429 and "waiting to connect" in body["error"]
        # without the session's secret: another token holder cannot see, interrupt or close it
        mine = {"X-EdgeTalk-Session": secret}
        assert _request(srv.url + f"api/stats?id={pid}", headers=AUTH)[0] == 404
        assert _post(srv, "api/interrupt", {"id": pid})[0] == 404
        assert _post(srv, f"api/close?id={pid}", b"")[0] == 404
        assert srv.server.active == 1
        status, st, _ = _request(srv.url + f"api/stats?id={pid}", headers={**AUTH, **mine})
        assert status == 200 and st["id"] == pid
        assert _post(srv, "api/interrupt", {"id": pid}, mine)[0] == 200
    finally:
        assert _post(srv, f"api/close?id={pid}", b"", {"X-EdgeTalk-Session": secret})[0] == 200
    _wait_idle(srv)


def test_max_session_length(srv, offer_sdp):
    srv.server.config.max_session_s = 1.0
    try:
        status, ans, _ = _post(srv, "offer", {"sdp": offer_sdp, "type": "offer"})
        assert status == 200, ans
        time.sleep(2.0)
        h = {**AUTH, "X-EdgeTalk-Session": ans["secret"]}
        status, st, _ = _request(srv.url + f"api/stats?id={ans['id']}", headers=h)
        assert st["closed"] and "1-minute limit" not in st["close_reason"]
        assert "limit" in st["close_reason"]
    finally:
        srv.server.config.max_session_s = 7200.0
    _wait_idle(srv)


# ---- 6: SDP -----------------------------------------------------------------------------------
def test_sdp_sections_and_size(srv, offer_sdp):
    three = _offer_sdp(audio=2, video=1)
    status, body, _ = _post(srv, "offer", {"sdp": three, "type": "offer"})
    assert status == 400 and "exactly one audio section" in body["error"]
    assert srv.server.active == 0
    # 2.5 MB of audio sections blocked the event loop for 4.9 s: now refused at once, and the
    # server answers others meanwhile
    head, _, _ = offer_sdp.partition("m=audio")
    section = "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\na=mid:%d\r\n"
    big = head + "".join(section % i for i in range(40_000))
    assert len(big) > 2_000_000
    result = {}

    def send():
        result["offer"] = _post(srv, "offer", {"sdp": big, "type": "offer"})[:2]

    t = threading.Thread(target=send)
    t.start()
    worst = 0.0
    while t.is_alive():
        t0 = time.monotonic()
        _request(srv.url + "api/health", headers=AUTH)
        worst = max(worst, time.monotonic() - t0)
    t.join()
    assert result["offer"][0] == 413
    assert worst < 1.0, f"the event loop was blocked for {worst:.1f} s"


# ---- 7: slow clients ------------------------------------------------------------------------------
def _port(srv) -> int:
    return int(srv.url.rstrip("/").rsplit(":", 1)[1])


def test_slow_headers_and_body_are_cut_off(srv, monkeypatch):
    c = socket.create_connection(("127.0.0.1", _port(srv)), timeout=10)
    c.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    t0 = time.monotonic()
    closed = False
    try:
        while time.monotonic() - t0 < 6:  # one header line a second, for ever
            c.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.5)
    except OSError:
        closed = True
    if not closed:
        c.settimeout(0.5)
        try:
            closed = c.recv(1) == b""
        except (TimeoutError, OSError):
            closed = False
    c.close()
    assert closed, "headers sent a line at a time kept the connection open"

    monkeypatch.setattr(server_mod, "BODY_TIMEOUT_S", 1.0, raising=False)
    c = socket.create_connection(("127.0.0.1", _port(srv)), timeout=8)
    c.sendall(
        b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-EdgeTalk-Token: "
        + TOKEN.encode()
        + b'\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{"s'
    )
    try:
        reply = c.recv(200)
    except TimeoutError:
        reply = b""
    c.close()
    assert reply.startswith(b"HTTP/1.1 413") or reply.startswith(b"HTTP/1.1 408"), reply


# ---- 8: types -----------------------------------------------------------------------------------
def test_bodies_of_the_wrong_type_are_400_and_no_session_before_sdp(srv, offer_sdp, monkeypatch):
    made = []
    real = srv.server.make_session
    monkeypatch.setattr(srv.server, "make_session", lambda crop: made.append(1) or real(crop))
    cases = [
        ("offer", {"sdp": offer_sdp, "type": "offer", "avatar": [1]}),
        ("offer", [1]),
        ("offer", {"sdp": ["x"], "type": "offer"}),
        ("api/interrupt", [1]),
        ("api/interrupt", {"id": [1]}),
        ("offer", {"sdp": "v=0\r\nthis is not sdp\r\n", "type": "offer"}),
    ]
    for path, body in cases:
        status, reply, _ = _post(srv, path, body)
        assert status in (400, 404), (path, body, status, reply)
    assert made == [], "a Session was made for an offer whose SDP does not parse"


# ---- 9: the token and the headers ------------------------------------------------------------------
def test_token_only_in_a_header_and_security_headers(srv):
    assert _request(srv.url + f"api/health?token={TOKEN}")[0] == 401
    for path in ("", "api/config", "static/app.js"):
        _, _, headers = _request(srv.url + path)
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"


def test_errors_do_not_echo_internals(srv, offer_sdp, monkeypatch):
    def boom(crop):
        raise RuntimeError("internal detail /srv/secret/path")

    monkeypatch.setattr(srv.server, "make_session", boom)
    status, body, _ = _post(srv, "offer", {"sdp": offer_sdp, "type": "offer"})
    assert status == 500
    assert "secret" not in body["error"] and "RuntimeError" not in body["error"]
    assert srv.server.active == 0


def test_token_sources_and_a_generated_token(tmp_path, monkeypatch):
    from edgetalk.errors import InputError
    from edgetalk.runtime.tokens import TOKEN_ENV, masked, resolve_token

    f = tmp_path / "token"
    f.write_text("from-a-file\n")
    assert resolve_token(None, f) == "from-a-file"
    monkeypatch.setenv(TOKEN_ENV, "from-the-env")
    assert resolve_token(None, None) == "from-the-env"
    with pytest.raises(InputError, match="not both"):
        resolve_token("x", f)
    cfg = ServeConfig(host="0.0.0.0", port=0)
    cfg.check()  # off loopback without a token: one is made, not refused
    assert cfg.token_generated and len(cfg.token) >= 32
    assert cfg.token not in masked(cfg.token)


# ---- the first round's probes, again ----------------------------------------------------------------
def test_first_round_probes_still_fail(srv):
    """Path traversal out of /static, DNS rebinding, a cross-site form POST: all still refused."""
    port = _port(srv)
    for raw in (b"/static/../server.py", b"/static/..%2fserver.py", b"/static/%2e%2e/cli.py"):
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"GET " + raw + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
        c.close()
        assert reply.split(b" ")[1] in (b"403", b"404"), (raw, reply[:80])
        assert b"AvatarServer" not in reply and b"import" not in reply
    status, _, _ = _request(srv.url + "api/health", headers={**AUTH, "Host": "evil.example"})
    assert status == 403  # DNS rebinding
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}
    status, _, _ = _request(srv.url + "api/close?id=x", data=b"a=1", headers=form, method="POST")
    assert status in (400, 401)  # a cross-site form cannot send the token header


def test_generated_token_is_saved_privately_and_not_printed(tmp_path, monkeypatch, capsys):
    import os
    import stat

    from edgetalk.cli import main
    from edgetalk.serve import server as srv_mod

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("EDGETALK_TOKEN", raising=False)
    seen = {}

    class Stub:  # no model, no socket: only what the CLI prints and saves
        def __init__(self, cfg):
            seen["token"] = cfg.token

    async def no_serve(server):
        return None

    monkeypatch.setattr(srv_mod, "AvatarServer", Stub)
    monkeypatch.setattr(srv_mod, "serve_forever", no_serve)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 0
    out = capsys.readouterr().out
    saved = tmp_path / ".config" / "edgetalk" / "serve-token"
    assert saved.read_text().strip() == seen["token"] and len(seen["token"]) >= 32
    assert seen["token"] not in out and str(saved) in out
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600


def test_an_unconnected_offer_cannot_hold_the_only_slot(srv, offer_sdp, monkeypatch):
    """An offer that never connects held the only slot for 30 s, and repeating it for ever. Now
    another client's offer takes the slot from an offer still unconnected after a grace period."""
    import http.client

    monkeypatch.setattr(server_mod, "PENDING_GRACE_S", 0.5, raising=False)
    status, squatter, _ = _post(srv, "offer", {"sdp": offer_sdp, "type": "offer"})
    assert status == 200
    time.sleep(0.8)
    # another client (another loopback source address) now gets the slot
    conn = http.client.HTTPConnection(
        "127.0.0.1", _port(srv), timeout=20, source_address=("127.0.0.2", 0)
    )
    body = json.dumps({"sdp": offer_sdp, "type": "offer"})
    conn.request("POST", "/offer", body, {**AUTH, "Content-Type": "application/json"})
    r = conn.getresponse()
    other = json.loads(r.read())
    conn.close()
    assert r.status == 200, other
    h = {**AUTH, "X-EdgeTalk-Session": squatter["secret"]}
    st = _request(srv.url + f"api/stats?id={squatter['id']}", headers=h)[1]
    assert st["closed"] and "another client" in st["close_reason"]
    _post(srv, f"api/close?id={other['id']}", b"", {"X-EdgeTalk-Session": other["secret"]})
    _wait_idle(srv)
