"""The prefix-aware routing (`deploy.routing`) as a Ray Serve request router (`ray.serve.request_router`).

Serve's router asks `choose_replicas` for ranks of replicas and sends the request to the least-loaded replica of
the first rank with room (queue length under `max_ongoing_requests`, the batch's rows), trying the next rank
otherwise: each rank here is one replica, in `routing.rank`'s order. `on_request_routed` records the prompt's
prefix keys for the replica it went to, and the request as in flight there until `on_request_completed` (the
loads `rank` reads: this router's own requests, exact, never a stale probe); a replica that dies or leaves is
forgotten.
"""

from __future__ import annotations

from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from skipjack.deploy import routing


def prompt_of(pending: PendingRequest | None) -> list[int]:
    """The request's prompt ids: a decode call's engine `Request`, or the ids of an embedding or scoring call."""
    arg = pending.args[0] if pending is not None and pending.args else None
    ids = getattr(arg, "prompt", arg)
    return ids if isinstance(ids, list) else []


class PrefixRouter(RequestRouter):
    def initialize_state(self, block: int = routing.BLOCK, capacity: int = routing.CAPACITY) -> None:
        self.block, self.table = block, routing.PrefixTable(capacity)
        self.inflight: dict[str, str] = {}  # internal request id -> the replica it was sent to

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ids = prompt_of(pending_request)
        ks = routing.keys(ids, self.block)
        by = {r.replica_id.unique_id: r for r in candidate_replicas}
        sent = Counter(self.inflight.values())
        loads = {i: sent[i] for i in by}
        full = min(r.max_ongoing_requests for r in candidate_replicas)
        return [[by[i]] for i in routing.rank(ks, self.table.match(ks), loads, full, len(ids) / self.block)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.table.record(routing.keys(prompt_of(pending_request), self.block), replica_id.unique_id)
        self.inflight[pending_request.metadata.internal_request_id] = replica_id.unique_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.inflight.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self.table.forget(replica_id.unique_id)
