"""`SocketSource`: live audio over TCP, length-prefixed s16le PCM (`edgetalk live --listen`).

## Wire format

Every message starts with a 4-byte big-endian unsigned header:

| header                  | meaning                                                                 |
|-------------------------|-------------------------------------------------------------------------|
| 2 .. 1,048,576, even    | AUDIO: that many bytes of s16le mono PCM at the server's rate follow    |
| 0xFFFFFFFF              | INTERRUPT (barge-in): the avatar stops talking; queued speech is dropped |
| 0xFFFFFFFE              | END: the sender is done; the live session flushes and ends              |
| 0xFFFFFFFD              | AUTH: 1 byte n (1..255) then n bytes of UTF-8 token; must come first,    |
|                         | within 5 s of connecting, when the server has a token (--token)         |
| anything else           | protocol error (0, odd, over 1 MiB): that connection gets an error line |

The server answers with text lines: `OK ...` when a client is accepted, `BUSY ...` (then it closes)
when another client is already connected, and `ERROR <reason>` (then it closes) on a protocol error:
a bad header, a frame cut short, an incomplete frame after 10 s, a bad token, or no AUTH within 5 s
(so a silent peer cannot hold the only slot). An error ends only that connection: the session keeps
running (the avatar idles) and the next client is accepted. One client at a time; clients may come
and go. An address whose token was wrong (or which sent no AUTH in time) is refused for a while
(1 s, doubling up to 60 s) before its next try: guessing tokens is slow. Refused connections get
their line from a bounded number of threads; beyond that they are closed at once.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

from ..errors import InputError
from ..models.config import SAMPLE_RATE
from .audio_io import StreamResampler, s16le_to_float
from .netaddr import resolves_to_loopback
from .sources import AudioSource, BoundedQueue, Control

MAX_FRAME_BYTES = 1 << 20  # 1 MiB: about 33 s of 16 kHz s16le mono in one socket frame
CTRL_INTERRUPT = 0xFFFFFFFF
CTRL_END = 0xFFFFFFFE
CTRL_AUTH = 0xFFFFFFFD
FRAME_TIMEOUT_S = 10.0  # a message must complete within this long of its start (slowloris)
AUTH_TIMEOUT_S = 5.0  # with a token: AUTH must be complete this long after connecting
AUTH_BACKOFF_S = (1.0, 60.0)  # an address's refusal after failed AUTH: first, doubling up to max
MAX_LINGER_THREADS = 8  # refused connections being closed gracefully at once; more: closed at once
MAX_TRACKED_ADDRESSES = 4096  # addresses remembered for the AUTH backoff
MAX_ERRORS_KEPT = 32  # recent per-connection error messages kept on a SocketSource

END = Control("END")  # a client asked to end the stream


class ProtocolError(Exception):
    """A peer broke the wire format. `messages` holds those it completed before the error."""

    messages: tuple = ()


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InputError(f"--listen wants HOST:PORT (e.g. 127.0.0.1:7000), got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class FrameReader:
    """Incremental parser of the socket wire format: `feed(bytes)` returns the complete messages.

    Pure (no socket, no clock), so any byte stream cut anywhere parses the same, which the
    property tests and the fuzz harness check. It holds at most one message: a length prefix is
    validated before its payload is buffered, so memory is bounded by MAX_FRAME_BYTES whatever a
    peer sends. Messages: ("audio", bytes), ("interrupt",), ("end",). Raises ProtocolError.
    """

    def __init__(self, token: bytes | None = None):
        self.token = token
        self.authed = token is None
        self.ended = False
        self.failed: ProtocolError | None = None
        self.parts = 0  # message parts (header, payload, token) completed so far
        self._buf = bytearray()
        self._need = 4  # bytes of the current message still to read
        self._kind = "header"  # header | payload | token_size | token

    @property
    def mid_message(self) -> bool:
        """True while a message has begun but not completed."""
        return bool(self._buf) or self._kind != "header"

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple]:
        if self.failed is not None:
            raise ProtocolError(f"stream already broken: {self.failed}")
        out: list[tuple] = []
        view = memoryview(data)
        try:
            while len(view):
                if self.ended:
                    break  # bytes after END are ignored
                take = min(self._need - len(self._buf), len(view))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < self._need:
                    break
                msg, self._buf = bytes(self._buf), bytearray()
                self._step(msg, out)
        except ProtocolError as e:  # what came before the bad bytes is still delivered
            e.messages = tuple(out)
            self.failed = e
            raise
        return out

    def _step(self, msg: bytes, out: list[tuple]) -> None:
        self.parts += 1
        kind = self._kind
        self._kind, self._need = "header", 4
        if kind == "payload":
            out.append(("audio", msg))
        elif kind == "token_size":
            if msg[0] == 0:
                raise ProtocolError("empty token: AUTH needs 1..255 token bytes")
            self._kind, self._need = "token", msg[0]
        elif kind == "token":
            if self.token is not None and not hmac.compare_digest(msg, self.token):
                raise ProtocolError("bad token")
            self.authed = True
        else:
            (n,) = struct.unpack(">I", msg)
            if n == CTRL_AUTH:
                self._kind, self._need = "token_size", 1
            elif not self.authed:
                raise ProtocolError("this server needs a token: send AUTH first (see --token)")
            elif n == CTRL_INTERRUPT:
                out.append(("interrupt",))
            elif n == CTRL_END:
                self.ended = True
                out.append(("end",))
            elif n == 0 or n % 2 or n > MAX_FRAME_BYTES:
                raise ProtocolError(
                    f"bad length prefix {n}: an audio frame is 2..{MAX_FRAME_BYTES} bytes and "
                    "even (whole s16le samples); 0xFFFFFFFF interrupts, 0xFFFFFFFE ends"
                )
            else:
                self._kind, self._need = "payload", n


class SocketSource(AudioSource):
    """A TCP server for length-prefixed s16le PCM (the wire format is in the module docstring).

    Binds 127.0.0.1 by default. A non-loopback address needs `allow_remote=True` and a token.
    One client at a time: a second concurrent client gets a `BUSY` line and is closed.
    """

    name = "socket"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        rate: int = SAMPLE_RATE,
        allow_remote: bool = False,
        token: str | None = None,
        log: Callable[[str], None] | None = None,
        end_on_close: bool = False,
    ):
        super().__init__()
        if not resolves_to_loopback(host):
            if not allow_remote:
                raise InputError(
                    f"refusing to listen on {host}: other machines could reach it. Use "
                    "127.0.0.1, or pass --allow-remote with --token-file FILE (or EDGETALK_TOKEN) to "
                    "accept remote clients"
                )
            if not token:
                raise InputError(
                    "--allow-remote needs a token (--token-file FILE or EDGETALK_TOKEN): remote "
                    "clients must authenticate"
                )
        if token is not None and not 1 <= len(token.encode()) <= 255:
            raise InputError("--token must be 1 to 255 bytes")
        self.rate = StreamResampler(rate).rate
        self.token = token.encode() if token else None
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.end_on_close = end_on_close  # the stream ends when the client disconnects
        try:
            self.server = socket.create_server((host, port), reuse_port=False)
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.server.settimeout(0.2)
        self.address = self.server.getsockname()[:2]
        self.queue = BoundedQueue()
        self.errors: deque[str] = deque(maxlen=MAX_ERRORS_KEPT)
        self.connections = 0
        self.refused = 0
        self.protocol_errors = 0
        self._lock = threading.Lock()
        self._active: socket.socket | None = None
        self._linger = threading.BoundedSemaphore(MAX_LINGER_THREADS)
        self._auth_fails: OrderedDict[str, tuple[int, float]] = OrderedDict()  # ip -> (n, until)
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(
            target=self._accept_loop, name="edgetalk-listen", daemon=True
        )
        self._accept.start()

    def describe(self) -> str:
        return f"TCP {self.address[0]}:{self.address[1]} (s16le mono {self.rate} Hz, one client)"

    # ---- server threads ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            wait = self._backoff_left(addr[0])
            if wait > 0:
                self.refused += 1
                self._refuse(
                    conn, f"ERROR failed AUTH from this address: try again in {math.ceil(wait)} s"
                )
                continue
            with self._lock:
                busy = self._active is not None
                if not busy:
                    self._active = conn
                    self.connections += 1
            if busy:
                self.refused += 1
                self.log(f"edgetalk live: refused {addr[0]}:{addr[1]}: another client is connected")
                self._refuse(conn, "BUSY another client is connected; one client at a time")
                continue
            t = threading.Thread(target=self._serve, args=(conn, addr), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _refuse(self, conn: socket.socket, line: str) -> None:
        """Send the line and close; a bounded number of threads wait for it to arrive."""
        _send_line(conn, line)
        if not self._linger.acquire(blocking=False):
            _close(conn)  # a flood: no thread per connection
            return

        def linger() -> None:
            try:
                _linger_close(conn)
            finally:
                self._linger.release()

        threading.Thread(target=linger, name="edgetalk-refuse", daemon=True).start()

    def _backoff_left(self, ip: str) -> float:
        with self._lock:
            _, until = self._auth_fails.get(ip, (0, 0.0))
        return until - time.monotonic()

    def _auth_failed(self, ip: str) -> None:
        lo, hi = AUTH_BACKOFF_S
        with self._lock:
            n, _ = self._auth_fails.pop(ip, (0, 0.0))
            self._auth_fails[ip] = (n + 1, time.monotonic() + min(hi, lo * 2**n))
            while len(self._auth_fails) > MAX_TRACKED_ADDRESSES:
                self._auth_fails.popitem(last=False)

    def _serve(self, conn: socket.socket, addr) -> None:
        who = f"{addr[0]}:{addr[1]}"
        resample = StreamResampler(self.rate)
        reader = FrameReader(self.token)
        connected = time.monotonic()
        try:
            conn.settimeout(0.25)
            _send_line(conn, f"OK edgetalk live: s16le mono {self.rate} Hz")
            started, parts = None, 0  # when the message being read began (idling is allowed)
            while not self._closed.is_set() and not reader.ended:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    data = None
                if data == b"":
                    if reader.mid_message:
                        raise ProtocolError(
                            f"connection closed {reader.buffered} bytes into a message"
                        )
                    break  # the client closed the connection between messages
                try:
                    msgs = reader.feed(data) if data else []
                except ProtocolError as e:
                    self._deliver(e.messages, resample)
                    raise
                self._deliver(msgs, resample)
                now = time.monotonic()
                if not reader.mid_message:
                    started = None
                elif started is None or reader.parts != parts:
                    started = now  # a new message began in this read
                parts = reader.parts
                if not reader.authed and now - connected > AUTH_TIMEOUT_S:
                    raise ProtocolError(f"no AUTH within {AUTH_TIMEOUT_S:.0f} s of connecting")
                if started is not None and now - started > FRAME_TIMEOUT_S:
                    raise ProtocolError(
                        f"incomplete frame: {reader.buffered} bytes after {FRAME_TIMEOUT_S:.0f} s"
                    )
        except ProtocolError as e:
            if str(e) == "bad token" or "AUTH within" in str(e):
                self._auth_failed(addr[0])  # a wrong token, or a peer that never sent one
            self.protocol_errors += 1
            self.errors.append(f"{who}: {e}")
            self.log(
                f"edgetalk live: client {who}: error: {e} (connection closed; still listening)"
            )
            _send_line(conn, f"ERROR {e}")
        except OSError as e:
            self.errors.append(f"{who}: {e}")
            self.log(f"edgetalk live: client {who}: connection lost ({e})")
        finally:
            tail = resample.flush()
            if tail.size:
                self.queue.put(tail)
            if reader.ended or self.end_on_close:
                self.queue.put(END)
            with self._lock:  # free before the client sees the connection end
                self._active = None
            _linger_close(conn)

    def _deliver(self, msgs, resample) -> None:
        for msg in msgs:
            if msg[0] == "audio":
                self.queue.put(resample(s16le_to_float(msg[1])))
            elif msg[0] == "interrupt":
                self.queue.put_interrupt()

    # ---- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        while True:
            item = self.queue.get(0.1)
            if item is None:
                if self._closed.is_set():
                    return
                continue
            if item is END:
                return
            yield item

    def close(self) -> None:
        super().close()
        _close(self.server)
        with self._lock:
            if self._active is not None:
                with contextlib.suppress(OSError):
                    self._active.shutdown(socket.SHUT_RDWR)
        self.queue.close()
        for t in [self._accept, *self._threads]:
            t.join(timeout=2.0)


def _send_line(conn: socket.socket, text: str) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(text.encode() + b"\n")


def _linger_close(conn: socket.socket, timeout: float = 1.0) -> None:
    """Close so that lines already sent arrive: half-close, then discard what the client still
    sends (bounded in time and bytes). Closing with unread input would reset the connection."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(0.1)
        deadline, left = time.monotonic() + timeout, MAX_FRAME_BYTES
        while time.monotonic() < deadline and left > 0:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            left -= len(data)
    _close(conn)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
