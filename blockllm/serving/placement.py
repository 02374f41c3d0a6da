"""Locality-aware placement: which worker hosts which models' chains, and why.

Chains are kept whole on a worker where one fits (no activation transfer), models that share
blocks gravitate to the same worker (their shared blocks are loaded once and their requests batch
together there), hot models get replicas, and cold ones are left out when memory runs short. A
chain no single worker can hold is split once, at a block boundary, over two workers (or on
request, with `split=`). The plan is executed as Dask tasks pinned with `workers=` (client.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from zoo_store import Manifest


@dataclass(frozen=True)
class WorkerInfo:
    address: str
    capacity_bytes: int  # weight bytes it may hold


@dataclass(frozen=True)
class Segment:
    """Layers [start, end) of a model's chain on one worker (start 0: with the embedding; end
    None: to the last layer, with the head)."""

    worker: str
    start: int
    end: int | None


@dataclass(frozen=True)
class PlacementPlan:
    assignments: dict[str, tuple[str, ...]]  # worker -> models it hosts whole
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)  # worker -> {model: why}
    unplaced: dict[str, str] = field(default_factory=dict)  # model -> why not
    splits: dict[str, tuple[Segment, ...]] = field(default_factory=dict)  # model -> its segments, in order
    layer_starts: dict[str, list[int]] = field(default_factory=dict)  # split model -> first layer of each layer block

    def workers_for(self, model: str) -> list[str]:
        """Workers that take requests for `model`: the ones holding it whole, or its first segment."""
        whole = [w for w, models in self.assignments.items() if model in models]
        return whole or ([self.splits[model][0].worker] if model in self.splits else [])

    def segments_on(self, worker: str) -> list[tuple[str, int, int | None, str | None]]:
        """(model, start, end, next worker) for each segment placed on `worker`."""
        out = []
        for model, segs in self.splits.items():
            for i, s in enumerate(segs):
                if s.worker == worker:
                    out.append((model, s.start, s.end, segs[i + 1].worker if i + 1 < len(segs) else None))
        return out

    def explain(self, block: str, manifests: Mapping[str, Manifest]) -> list[str]:
        """Why `block` is on each worker that holds it."""
        lines = []
        for worker, models in self.assignments.items():
            users = [m for m in models if block in manifests[m].fingerprints()]
            if users:
                lines.append(f"{block[:12]} on {worker}: needed by {', '.join(users)} ({'; '.join(self.reasons[worker][m] for m in users)})")
        for model, segs in self.splits.items():
            for s in segs:
                if block in _segment_blocks(manifests[model], s.start, s.end, self.layer_starts.get(model) or block_layers(manifests[model])):
                    lines.append(f"{block[:12]} on {s.worker}: layers [{s.start}, {s.end if s.end is not None else 'end'}) of {model} ({self.reasons[s.worker][model]})")
        return lines


def _blocks(m: Manifest) -> set[str]:
    return m.fingerprints()


def _bytes(blocks: set[str], block_bytes: Mapping[str, int]) -> int:
    return sum(block_bytes[b] for b in blocks)


def block_layers(m: Manifest, layer_starts: Mapping[str, Sequence[int]] | None = None) -> list[int]:
    """The first layer of each layer block of a chain (embed, layers..., head): as given (from the
    blocks' specs), else one layer per block."""
    given = (layer_starts or {}).get(m.key)
    return list(given) if given is not None else list(range(len(m.chain) - 2))


def _segment_blocks(m: Manifest, start: int, end: int | None, starts: list[int]) -> set[str]:
    """Blocks a segment holds: its layer blocks, the embedding if first, the head if last; and the
    adapters on its layer blocks."""
    idx = [i + 1 for i, a in enumerate(starts) if a >= start and (end is None or a < end)]
    out = {m.chain[i] for i in idx}
    if start == 0:
        out.add(m.chain[0])
    if end is None:
        out.add(m.chain[-1])
    out |= {a.fingerprint for a in m.adapters if a.index in idx}
    return out


def plan_placement(
    manifests: Mapping[str, Manifest],
    block_bytes: Mapping[str, int],
    workers: list[WorkerInfo],
    traffic: Mapping[str, float] | None = None,
    current: Mapping[str, set[str]] | None = None,
    *,
    replicate_above: float = 1.5,
    split: Mapping[str, int] | None = None,
    layer_starts: Mapping[str, Sequence[int]] | None = None,
) -> PlacementPlan:
    """Greedy, hottest model first: put it where it adds the fewest new bytes and least load.

    A model whose share of traffic exceeds `replicate_above / len(workers)` gets a replica on
    further workers. `current` (worker -> models) makes the plan sticky: staying is preferred
    to moving when the scores tie. A model no worker can hold whole is split in two at the block
    boundary (and over the two workers) that adds the fewest new bytes; `split` (model -> layer)
    asks for a split at that layer. `layer_starts` (model -> first layer of each layer block,
    from the blocks' specs) defaults to one layer per block.
    """
    split = dict(split or {})
    splits: dict[str, tuple[Segment, ...]] = {}
    # Segments run in a worker's segment engine, apart from its whole chains: they share blocks
    # only with other segments (a block both uses is loaded twice), so they are counted apart.
    seg_held: dict[str, set[str]] = {w.address: set() for w in workers}
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
        for _ in range(replicas if key not in split else 0):
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
            used[best] = _bytes(held[best], block_bytes) + _bytes(seg_held[best], block_bytes)
            load[best] += share / replicas
            assigned[best].append(key)
            reasons[best][key] = best_why + (f"; replica {placed + 1} of {replicas}" if replicas > 1 else "")
            placed += 1
        if placed:
            continue
        m = manifests[key]
        starts = block_layers(m, layer_starts)
        cuts = [split[key]] if key in split else starts[1:]
        if key in split and split[key] not in starts[1:]:
            unplaced[key] = f"cannot split at layer {split[key]}: the block boundaries are {starts[1:]}"
            continue
        best, best_score = None, None
        for k in cuts:
            front, back = _segment_blocks(m, 0, k, starts), _segment_blocks(m, k, None, starts)
            for u in workers:
                for v in workers:
                    if u.address == v.address:
                        continue
                    nu = _bytes(front - seg_held[u.address], block_bytes)
                    nv = _bytes(back - seg_held[v.address], block_bytes)
                    if used[u.address] + nu > capacity[u.address] or used[v.address] + nv > capacity[v.address]:
                        continue
                    score = (nu + nv, load[u.address] + load[v.address], u.address, v.address, k)
                    if best_score is None or score < best_score:
                        best, best_score = (k, u.address, v.address, front, back, nu, nv), score
        if best is None:
            unplaced[key] = "no worker has room for its blocks, and no split over two workers fits"
            continue
        k, u, v, front, back, nu, nv = best
        whole = sum(block_bytes[b] for b in blocks)
        room = max((capacity[a] - used[a] for a in capacity), default=0)
        why = (
            f"split requested at layer {k}" if key in split
            else f"its chain ({whole / 1e6:.1f} MB) fits no single worker (most room: {room / 1e6:.1f} MB); split at layer {k}, the fewest new bytes"
        )
        for a, part, new, what in ((u, front, nu, f"layers [0, {k}) + embedding"), (v, back, nv, f"layers [{k}, end) + head")):
            mates = sorted(x for x, segs in splits.items() if any(sg.worker == a for sg in segs) and _blocks(manifests[x]) & part)
            seg_held[a] |= part
            used[a] = _bytes(held[a], block_bytes) + _bytes(seg_held[a], block_bytes)
            load[a] += share / 2
            reasons[a][key] = f"{why}; {what} here; traffic share {share:.0%}; adds {new / 1e6:.1f} MB" + (f"; shares blocks with {', '.join(mates)}" if mates else "")
        splits[key] = (Segment(u, 0, k), Segment(v, k, None))
    return PlacementPlan(
        {w: tuple(ms) for w, ms in assigned.items()}, reasons, unplaced, splits,
        {k: block_layers(manifests[k], layer_starts) for k in splits},
    )
