"""Ray Serve plug-ins for avatar sessions: sticky routing and autoscaling on sessions in use.

A session's media lives in one worker replica (its aiortc peer and Session), so every call about
that session must reach that replica; Serve's default router picks any replica. SessionRouter reads
two keyword arguments of a call:

  replica="<replica id>"  a call about a placed session: only that replica. When it is gone (died,
                          stopped) the call goes to any replica, which answers {"gone": true}
                          instead of the router waiting for a replica that will never come back.
  exclude=(ids...)        a new session: the replicas not tried yet, most free slots first (the
                          slots each replica reports every second). When every replica was tried,
                          any one gets it and answers "exhausted": the page's busy message.

Calls with neither (load, sessions listing) go to any replica.
"""

from __future__ import annotations

import math
import random

from ray.serve.request_router import FIFOMixin, RequestRouter


def replica_key(replica) -> str:
    return replica.replica_id.unique_id


class SessionRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        target = kwargs.get("replica")
        if target is not None:
            same = [r for r in candidate_replicas if replica_key(r) == target]
            return [same] if same else [candidate_replicas[:1]]
        if "exclude" in kwargs:
            tried = set(kwargs["exclude"] or ())
            fresh = [r for r in candidate_replicas if replica_key(r) not in tried]
            if not fresh:
                return [candidate_replicas[:1]]
            fresh.sort(key=lambda r: -float((r.routing_stats or {}).get("free", 0)))
            return [[r] for r in fresh]
        # Any replica, in random order (one rank of all would favour the first on equal queues).
        return [[r] for r in random.sample(candidate_replicas, len(candidate_replicas))]


def sessions_policy(ctx) -> tuple[int, dict]:
    """Replicas for the sessions in use plus one free slot, so the next visitor finds one while
    a new replica warms up. Each replica reports {"sessions", "slots"} (record_autoscaling_stats);
    Serve then applies min/max replicas and the up/downscale delays."""
    metrics = ctx.aggregated_metrics or {}
    in_use = sum(metrics.get("sessions", {}).values())
    slots = max(metrics.get("slots", {}).values(), default=1) or 1
    return math.ceil((in_use + 1) / slots), {}
