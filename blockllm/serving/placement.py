"""Locality-aware placement: which worker hosts which models' chains, and why.

Chains are kept whole on a worker (consecutive blocks never cross a worker boundary), models
that share blocks gravitate to the same worker (their shared blocks are loaded once and their
requests batch together there), hot models get replicas, and cold ones are left out when memory
runs short. The plan is executed as Dask tasks pinned with `workers=` (see client.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from zoo_store import Manifest


@dataclass(frozen=True)
class WorkerInfo:
    address: str
    capacity_bytes: int  # weight bytes it may hold


@dataclass(frozen=True)
class PlacementPlan:
    assignments: dict[str, tuple[str, ...]]  # worker -> models it hosts
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)  # worker -> {model: why}
    unplaced: dict[str, str] = field(default_factory=dict)  # model -> why not

    def workers_for(self, model: str) -> list[str]:
        return [w for w, models in self.assignments.items() if model in models]

    def explain(self, block: str, manifests: Mapping[str, Manifest]) -> list[str]:
        """Why `block` is on each worker that holds it."""
        lines = []
        for worker, models in self.assignments.items():
            users = [m for m in models if block in manifests[m].fingerprints()]
            if users:
                lines.append(f"{block[:12]} on {worker}: needed by {', '.join(users)} ({'; '.join(self.reasons[worker][m] for m in users)})")
        return lines


def _blocks(m: Manifest) -> set[str]:
    return m.fingerprints()


def plan_placement(
    manifests: Mapping[str, Manifest],
    block_bytes: Mapping[str, int],
    workers: list[WorkerInfo],
    traffic: Mapping[str, float] | None = None,
    current: Mapping[str, set[str]] | None = None,
    *,
    replicate_above: float = 1.5,
) -> PlacementPlan:
    """Greedy, hottest model first: put it where it adds the fewest new bytes and least load.

    A model whose share of traffic exceeds `replicate_above / len(workers)` gets a replica on
    further workers. `current` (worker -> models) makes the plan sticky: staying is preferred
    to moving when the scores tie.
    """
    traffic = dict(traffic or {}) or {k: 1.0 for k in manifests}  # unknown traffic: assume uniform
    current = {w: set(ms) for w, ms in (current or {}).items()}
    total = sum(traffic.values()) or 1.0
    held: dict[str, set[str]] = {w.address: set() for w in workers}
    used: dict[str, int] = {w.address: 0 for w in workers}
    load: dict[str, float] = {w.address: 0.0 for w in workers}
    assigned: dict[str, list[str]] = {w.address: [] for w in workers}
    reasons: dict[str, dict[str, str]] = {w.address: {} for w in workers}
    unplaced: dict[str, str] = {}
    capacity = {w.address: w.capacity_bytes for w in workers}

    order = sorted(manifests, key=lambda k: (-traffic.get(k, 0.0), k))
    for key in order:
        blocks = _blocks(manifests[key])
        share = traffic.get(key, 0.0) / total
        replicas = 1 + int(share * len(workers) > replicate_above) * (len(workers) - 1)
        placed = 0
        for _ in range(replicas):
            best, best_score, best_why = None, None, ""
            for w in workers:
                a = w.address
                if key in assigned[a]:
                    continue
                new = sum(block_bytes[b] for b in blocks - held[a])
                if used[a] + new > capacity[a]:
                    continue
                shared = sum(block_bytes[b] for b in blocks & held[a])
                sticky = key in current.get(a, set())
                # fewer new bytes first, then lighter load, then where it already is
                score = (new, load[a], not sticky, a)
                if best_score is None or score < best_score:
                    best, best_score = a, score
                    mates = sorted(m for m in assigned[a] if _blocks(manifests[m]) & blocks)
                    best_why = (
                        f"traffic share {share:.0%}; shares {shared / 1e6:.1f} MB of blocks with "
                        f"{', '.join(mates) or 'nothing here'}; adds {new / 1e6:.1f} MB; load before {load[a]:.2f}"
                        + ("; already here" if sticky else "")
                    )
            if best is None:
                break
            held[best] |= blocks
            used[best] = sum(block_bytes[b] for b in held[best])
            load[best] += share / replicas
            assigned[best].append(key)
            reasons[best][key] = best_why + (f"; replica {placed + 1} of {replicas}" if replicas > 1 else "")
            placed += 1
        if not placed:
            unplaced[key] = "no worker has room for its blocks"
    return PlacementPlan({w: tuple(ms) for w, ms in assigned.items()}, reasons, unplaced)
