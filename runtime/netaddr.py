"""Is a listening address loopback-only? Two questions, with two answers on purpose.

- `names_loopback(host)`: the text names loopback (`localhost`, `127.0.0.1`, `[::1]`), decided
  without DNS. For a configured host or a request's Host header, which must not depend on a
  resolver an attacker might influence (DNS rebinding).
- `resolves_to_loopback(host)`: every address `host` resolves to is loopback. For binding a
  socket: what counts is where the socket will actually listen.
"""

from __future__ import annotations

import ipaddress
import socket

from ..errors import InputError

LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def names_loopback(host: str) -> bool:
    """True when `host` (a name or an address literal, [brackets] allowed) is loopback by itself."""
    h = host.strip("[]")
    if h.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def resolves_to_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve listen address {host!r}: {e}") from None
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
