"""The Ray Serve request router of the engine deployment: prefix affinity
(affinity.rank over the replicas' queue depths), falling back to the
least-loaded replica. The ingress passes each request's routing key as the
`affinity` keyword of its call; Ray Serve probes queue depths and retries
within the ranks this returns. Each router registers itself (`ROUTERS`) so
the ingress, in the same process, can read the replicas' routing stats
(health, metrics, queue depth) and its affinity counters for its `/health` and
`/metrics`."""

from __future__ import annotations

import weakref
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from mistralrs_serve.scale.affinity import rank

ROUTERS: weakref.WeakSet[AffinityRouter] = weakref.WeakSet()
# a key's replica is passed over when its queue is this much longer than the shortest
DEFAULT_IMBALANCE = 8


class AffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs: Any) -> None:
        self.imbalance = imbalance
        self.affinity_hits = 0
        self.affinity_misses = 0  # a key whose replica was too busy, or gone
        # imported here, not at the top: Ray may ship this class by value, with a copy of this
        # module's globals, and the ingress must find the router in the module it imports
        from mistralrs_serve.scale import router as this_module

        this_module.ROUTERS.add(self)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        kwargs = pending_request.kwargs if pending_request is not None else {}
        avoid = set(kwargs.get("avoid") or ())
        if avoid and set(by_id) - avoid:  # those that failed this request, while others remain
            by_id = {rid: r for rid, r in by_id.items() if rid not in avoid}
        queues = {rid: self._depth(r) for rid, r in by_id.items()}
        key = kwargs.get("affinity")
        holder = kwargs.get("holder")  # an engine replica's own id: Ray's id for it, from its stats
        if holder is not None:
            holder = next(
                (rid for rid, r in by_id.items() if (r.routing_stats or {}).get("replica") == holder), None
            )
        order, owned = rank(key, queues, getattr(self, "imbalance", DEFAULT_IMBALANCE), holder)
        if key is not None and holder is None:  # a holder's request goes there whatever its key
            if owned:
                self.affinity_hits += 1
            else:
                self.affinity_misses += 1
        # the first choice alone, then the others: Ray Serve tries a rank before the next
        return [[by_id[order[0]]], [by_id[r] for r in order[1:]]] if len(order) > 1 else [[by_id[order[0]]]]

    def _depth(self, replica: RunningReplica) -> int | None:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return int(cached)
        stats = replica.routing_stats or {}
        depth = stats.get("queue_depth")
        return int(depth) if isinstance(depth, int) else None

    def replica_stats(self) -> list[dict[str, Any]]:
        """Each live replica's last routing stats (health, metrics), with Ray's id for it."""
        return [
            {"ray_replica_id": rid.unique_id, **(r.routing_stats or {})}
            for rid, r in self.curr_replicas.items()
        ]
