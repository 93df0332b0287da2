"""The page's sessions placed on Ray Serve worker replicas (the ingress side of serve/ray_app.py).

RayFront is a PageHost: serve/server.py's build_app serves the same page and API from it, with the
same token, host-header, body and rate rules. Only the sessions are elsewhere: an offer goes to a
worker replica with a free slot (serve/ray_router.py), which answers it with its own aiortc peer, so
media flows between the browser and that replica's node. Every later call about the session goes
to that replica. A replica that dies ends its sessions with LOST_MESSAGE on the page (the next
stats poll, or the reaper within REAP_S) and frees nothing here but a table entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .media import CONNECT_TIMEOUT_S
from .server import PageHost, ServeConfig, SessionsBusy, secret_ok

log = logging.getLogger("edgetalk.serve")

CALL_TIMEOUT_S = 15.0  # a replica that does not answer a signalling call within this is lost
REAP_S = 2.0  # how often the replicas holding sessions are asked which are still live
LOST_MESSAGE = (
    "the avatar worker running this session stopped (its process or machine went away); "
    "press Start for a new session"
)


class ReplicaGone(Exception):
    pass


@dataclass
class Placed:
    replica: str
    secret: str
    client: str
    where: dict
    created: float = field(default_factory=time.monotonic)
    connected: bool = False
    last: dict = field(default_factory=dict)  # the last stats relayed


class RayFront(PageHost):
    def __init__(
        self,
        config: ServeConfig,
        resolution: int,
        default: np.ndarray,
        name: str,
        worker,
        backend: str,
    ):
        super().__init__(config, resolution, default, name)
        self.worker = worker  # the avatar workers' DeploymentHandle
        self.backend = backend
        self.placed: dict[str, Placed] = {}
        self.opening = 0
        self.lost_sessions = 0
        self._reaper: asyncio.Task | None = None

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    # ---- PageHost --------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.placed) + self.opening

    def describe_backend(self) -> str:
        return self.backend

    def pending_of(self, client: str) -> int:
        now = time.monotonic()
        waiting = sum(
            1
            for p in self.placed.values()
            if p.client == client and not p.connected and now - p.created < CONNECT_TIMEOUT_S
        )
        return waiting + self.pending.get(client, 0)

    async def _call(self, method: str, *args, **kwargs):
        from ray.exceptions import ActorUnavailableError, RayActorError

        response = self.worker.options(method_name=method).remote(*args, **kwargs)
        try:
            return await asyncio.wait_for(response, CALL_TIMEOUT_S)
        except (RayActorError, ActorUnavailableError, asyncio.TimeoutError) as e:
            response.cancel()
            raise ReplicaGone(type(e).__name__) from None

    async def open_session(self, client: str, sdp: str, avatar_id: str) -> dict:
        crop, name = self.avatars[avatar_id]
        tried: list[str] = []
        self.opening += 1
        try:
            # Each try is a replica not tried yet; more tries than replicas end in "exhausted".
            for _ in range(64):
                try:
                    r = await self._call("open", client, sdp, crop, name, exclude=tuple(tried))
                except ReplicaGone:  # died under the offer: the router forgets it, try again
                    continue
                if r.get("busy"):
                    if r.get("exhausted") or r["replica"] in tried:
                        break
                    tried.append(r["replica"])
                    continue
                if "error" in r:
                    if r["status"] == 400:
                        raise InputError(r["error"])
                    raise RuntimeError(r["error"])
                self.placed[r["id"]] = Placed(r["replica"], r["secret"], client, r["where"])
                self.sessions_started += 1
                log.info("session %s placed on %s", r["id"][:8], r["where"])
                return {k: r[k] for k in ("sdp", "type", "id", "secret")}
            raise SessionsBusy(self.busy_message())
        finally:
            self.opening -= 1

    def _end(self, pid: str, stats: dict | None = None, error: str | None = None) -> None:
        p = self.placed.pop(pid, None)
        if p is None:
            return
        final = {**p.where, **p.last, **(stats or {}), "id": pid, "closed": True}
        if error is not None:
            final.update(state="closed", close_reason="avatar worker lost", error=error)
            self.lost_sessions += 1
        self.remember_finished(pid, p.secret, final)

    def _lose_replica(self, replica: str) -> None:
        lost = [pid for pid, p in self.placed.items() if p.replica == replica]
        for pid in lost:
            self._end(pid, error=LOST_MESSAGE)
        if lost:
            log.warning("replica %s is gone: %d session(s) ended", replica, len(lost))

    async def _on_session(self, op: str, pid: str, secret: str):
        """(placed, result) of op on the caller's own session; result None: not there."""
        p = self.placed.get(pid) if isinstance(pid, str) else None
        if p is None or not secret_ok(secret, p.secret):
            return None, None
        try:
            r = await self._call("session", op, pid, secret, replica=p.replica)
        except ReplicaGone:
            r = {"gone": True}
        if r.get("gone"):
            self._lose_replica(p.replica)
            return p, None
        result = r["result"]
        if isinstance(result, dict) and op != "close":
            p.last = {**p.where, **result}
            p.connected = p.connected or result.get("state") == "connected"
            if result.get("closed"):
                self._end(pid, p.last)
        elif result is None:  # the replica no longer knows it
            self._end(pid)
        return p, result

    async def session_stats(self, pid: str, secret: str) -> dict | None:
        p, result = await self._on_session("stats", pid, secret)
        if isinstance(result, dict):
            return {**p.where, **result}
        return self.finished_stats(pid, secret)

    async def interrupt_session(self, pid: str, secret: str) -> dict | None:
        p, result = await self._on_session("interrupt", pid, secret)
        return {**p.where, **result} if isinstance(result, dict) else None

    async def close_session(self, pid: str, secret: str) -> bool:
        p, result = await self._on_session("close", pid, secret)
        if p is None:
            return False
        self._end(pid, {"state": "closed", "close_reason": "stopped by the page"})
        return True

    # ---- the reaper ------------------------------------------------------------------------------
    async def reap(self) -> None:
        """Ask each replica holding sessions which are live: sessions of a dead replica end with
        LOST_MESSAGE, ended ones leave the table, connection states are refreshed."""
        for replica in {p.replica for p in self.placed.values()}:
            try:
                r = await self._call("sessions", replica=replica)
            except ReplicaGone:
                r = {"gone": True}
            if r.get("gone"):
                self._lose_replica(replica)
                continue
            live = r["live"]
            for pid, p in list(self.placed.items()):
                if p.replica != replica:
                    continue
                if pid in live:
                    p.connected = p.connected or live[pid] == "connected"
                else:
                    await self._on_session("stats", pid, p.secret)  # its final stats, then out

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_S)
            try:
                await self.reap()
            except Exception:  # the reaper must keep running
                log.exception("reaping sessions failed")

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for pid, p in list(self.placed.items()):
            with contextlib.suppress(ReplicaGone):
                await self._call("session", "close", pid, p.secret, replica=p.replica)
        self.placed.clear()
        await super().close_all()
