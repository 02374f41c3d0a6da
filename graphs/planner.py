"""Chain planning: serve a request to model M with M's own chain or substitutes within M's error budget.

The chain is a layered graph: layer i holds M's own block at chain index i plus every block with an
`equiv` edge into it that the requesting tenant may run. A path picks one block per layer; its cost is
the expected latency (compute + loading a block that is not resident + queueing on a loaded one +
a transfer where consecutive blocks share no worker) plus a dissimilarity penalty per unit of score,
and its error is the SUM of the scores of its substitutions (summing is conservative: errors of
substitutions at different depths compound roughly additively; `planner.aggregate: max` is the
permissive alternative). The planner finds the cheapest path whose error stays within
`manifest.error_budget` by dynamic programming over Pareto labels (cost, error) per block.

Rules that no score overrides: a budget of 0 (the default) means M's own chain; a block another
tenant keeps private is never chosen; a chain block with a LoRA adapter attached is never replaced
(the adapter was trained on that exact block).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from zoo_store import Fingerprint, Manifest, Zoo
from zoo_store import config as _config

from .block_graph import BlockGraph, EquivEdge
from .exceptions import InvalidErrorBudgetError, PlanForbiddenError, PlanningError

Resident = Mapping[Fingerprint, Collection[str]] | Collection[Fingerprint]


def validate_error_budget(budget: Any, *, model: str = "the model") -> float:
    """A model owner's error budget: a finite number >= 0 (0 = never substitute)."""
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not math.isfinite(budget)
        or budget < 0
    ):
        raise InvalidErrorBudgetError(
            f"error budget of {model} must be a finite number >= 0 (0 turns substitution off), not {budget!r}"
        )
    return float(budget)


def set_error_budget(zoo: Zoo, tenant: str, name: str, budget: float) -> Manifest:
    """Change a model's error budget (its owner's policy, kept in its manifest)."""
    manifest = zoo.get_manifest(tenant, name)
    updated = dataclasses.replace(
        manifest, error_budget=validate_error_budget(budget, model=manifest.key)
    )
    zoo.put_manifest(updated, overwrite=True)
    return updated


@dataclass(frozen=True)
class CostModel:
    """Expected latency of a block, in milliseconds; see blockllm.yaml `planner.*`."""

    load_bandwidth: float = 2.0e9  # bytes/s: zoo -> device, for a block that is not resident
    compute_bandwidth: float = 3.0e12  # bytes/s of weights read per forward (memory-bound decode)
    queue_ms: float = 5.0  # ms per unit of load (queued batches) on a block
    transfer_ms: float = 0.5  # ms for activations to cross to another worker
    penalty_ms: float = 100.0  # ms per unit of equivalence score
    aggregate: str = "sum"  # how substitution scores add up against the budget: sum | max

    def __post_init__(self) -> None:
        if self.aggregate not in ("sum", "max"):
            raise ValueError(f"planner aggregate must be 'sum' or 'max', not {self.aggregate!r}")

    @classmethod
    def from_config(cls) -> CostModel:
        c = _config.get("planner", {}) or {}
        return cls(
            load_bandwidth=float(c.get("load-bandwidth", cls.load_bandwidth)),
            compute_bandwidth=float(c.get("compute-bandwidth", cls.compute_bandwidth)),
            queue_ms=float(c.get("queue-ms", cls.queue_ms)),
            transfer_ms=float(c.get("transfer-ms", cls.transfer_ms)),
            penalty_ms=float(c.get("penalty-ms", cls.penalty_ms)),
            aggregate=str(c.get("aggregate", cls.aggregate)),
        )

    def combine(self, error: float, score: float) -> float:
        return error + score if self.aggregate == "sum" else max(error, score)


@dataclass(frozen=True)
class Substitution:
    """At chain index `index` (block position `position`), `substitute` ran instead of `original`."""

    position: tuple[str, int, int]
    original: Fingerprint
    substitute: Fingerprint
    score: float
    metric: str
    index: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "position": list(self.position),
            "original": self.original,
            "substitute": self.substitute,
            "score": self.score,
            "metric": self.metric,
            "metrics": dict(self.metrics),
        }


@dataclass(frozen=True)
class ChainPlan:
    """The chain a request runs, its substitutions with their measured scores, and why."""

    model: str
    tenant: str
    chain: tuple[Fingerprint, ...]
    substitutions: tuple[Substitution, ...]
    cost: float  # expected ms of the chosen chain, dissimilarity penalty included
    own_cost: float  # expected ms of the model's own chain
    error: float  # aggregated score of the substitutions (compared with the budget)
    budget: float
    graph_version: int
    explanation: str

    @property
    def substituted(self) -> bool:
        return bool(self.substitutions)

    def report(self) -> dict[str, Any]:
        """What a response carries: the substitutions made and their measured scores."""
        return {
            "model": self.model,
            "graph_version": self.graph_version,
            "budget": self.budget,
            "error": self.error,
            "substitutions": [s.to_dict() for s in self.substitutions],
        }

    def manifest(self, manifest: Manifest) -> Manifest:
        """`manifest` with the planned chain (adapters stay: their blocks are never replaced)."""
        if manifest.key != self.model or len(manifest.chain) != len(self.chain):
            raise PlanningError(f"plan for {self.model} does not fit model {manifest.key}")
        return dataclasses.replace(manifest, chain=self.chain)


@dataclass
class _Label:
    cost: float
    error: float
    subs: int
    prev: _Label | None
    fp: Fingerprint
    edge: EquivEdge | None


class ChainPlanner:
    """Plans chains over a BlockGraph (`plan(manifest, tenant, resident=..., load=...)`)."""

    def __init__(
        self, graph: BlockGraph, cost: CostModel | None = None, *, metric: str | None = None
    ) -> None:
        self.graph = graph
        self.cost = cost or CostModel.from_config()
        self.metric = metric or str(_config.get("equivalence.metric", "kl_ucb"))

    def _nbytes(self, fp: Fingerprint) -> int:
        return int(self.graph.node(fp)["nbytes"]) if fp in self.graph else 0

    def block_cost(
        self, fp: Fingerprint, resident: Resident | None, load: Mapping[Fingerprint, float]
    ) -> float:
        nbytes = self._nbytes(fp)
        ms = 1000.0 * nbytes / self.cost.compute_bandwidth
        if resident is not None and fp not in resident:
            ms += 1000.0 * nbytes / self.cost.load_bandwidth
        return ms + self.cost.queue_ms * max(0.0, float(load.get(fp, 0.0)))

    def _transfer(self, a: Fingerprint, b: Fingerprint, resident: Resident | None) -> float:
        if not isinstance(resident, Mapping) or a not in resident or b not in resident:
            return 0.0  # unknown, or a block loaded next to its predecessor
        return 0.0 if set(resident[a]) & set(resident[b]) else self.cost.transfer_ms

    def _allowed(
        self, edge: EquivEdge, original: Fingerprint, tenant: str, budget: float
    ) -> str | None:
        """None when `edge` may be used, else why not (for the explanation)."""
        g = self.graph
        if not g.visible_to(edge.substitute, tenant):
            return "private to another tenant"
        if g.position(edge.substitute) != g.position(original):
            return "other position"
        if edge.metric != self.metric:
            return f"scored by {edge.metric}, not {self.metric}"
        if not math.isfinite(edge.score) or edge.score < 0 or edge.score > budget:
            return f"score {edge.score:.4g} over budget"
        return None

    def plan(
        self,
        manifest: Manifest,
        tenant: str,
        *,
        resident: Resident | None = None,
        load: Mapping[Fingerprint, float] | None = None,
    ) -> ChainPlan:
        """The cheapest chain for `tenant`'s request to `manifest`'s model within its error budget.

        `resident`: blocks loaded now (a collection, or fingerprint -> workers holding it); None
        means unknown (all treated as resident). `load`: queued batches per block (default 0).
        """
        if manifest.tenant != tenant and manifest.visibility != "shared":
            raise PlanForbiddenError(tenant, manifest.key)
        budget = validate_error_budget(manifest.error_budget, model=manifest.key)
        load = load or {}
        pinned = {a.index for a in manifest.adapters}
        own_cost = self._path_cost(list(manifest.chain), resident, load)
        lines = [
            f"model {manifest.key} for tenant {tenant}: budget {budget:g} ({self.metric}, {self.cost.aggregate})"
        ]

        options: list[list[tuple[Fingerprint, EquivEdge | None]]] = []
        for i, fp in enumerate(manifest.chain):
            opts: list[tuple[Fingerprint, EquivEdge | None]] = [(fp, None)]
            if budget > 0 and i not in pinned:
                for edge in self.graph.substitutes_for(fp):
                    why = self._allowed(edge, fp, tenant, budget)
                    if why is None:
                        opts.append((edge.substitute, edge))
                    elif why == "private to another tenant":
                        lines.append(f"  [{i}] {edge.substitute[:10]}… not considered: {why}")
            options.append(opts)

        # Pareto labels (cost, error) per option of the current layer; the budget prunes labels.
        layer: list[list[_Label]] = []
        for i, opts in enumerate(options):
            nxt: list[list[_Label]] = []
            for fp, edge in opts:
                base = self.block_cost(fp, resident, load) + (
                    self.cost.penalty_ms * edge.score if edge else 0.0
                )
                cands: list[_Label] = []
                sources = [lab for labs in layer for lab in labs] if i else [None]
                for prev in sources:
                    err = self.cost.combine(
                        prev.error if prev else 0.0, edge.score if edge else 0.0
                    )
                    if err > budget + 1e-12:
                        continue
                    cost = (
                        (prev.cost if prev else 0.0)
                        + base
                        + (self._transfer(prev.fp, fp, resident) if prev else 0.0)
                    )
                    cands.append(
                        _Label(
                            cost,
                            err,
                            (prev.subs if prev else 0) + (edge is not None),
                            prev,
                            fp,
                            edge,
                        )
                    )
                nxt.append(_pareto(cands))
            layer = nxt
        finals = [lab for labs in layer for lab in labs]
        if not finals:  # cannot happen: the own chain has error 0 <= budget
            raise PlanningError(f"no chain for {manifest.key} within budget {budget}")
        best = min(finals, key=lambda lab: (round(lab.cost, 9), lab.subs, lab.error))

        chain: list[Fingerprint] = []
        subs: list[Substitution] = []
        lab: _Label | None = best
        while lab is not None:
            chain.append(lab.fp)
            lab = lab.prev
        chain.reverse()
        for i, (own, chosen) in enumerate(zip(manifest.chain, chain, strict=True)):
            if own == chosen:
                continue
            edge = next(e for fp, e in options[i] if fp == chosen and e is not None)
            subs.append(
                Substitution(
                    self.graph.position(own),
                    own,
                    chosen,
                    edge.score,
                    edge.metric,
                    i,
                    dict(edge.metrics),
                )
            )
        cost = best.cost
        for s in subs:
            state = "resident" if resident is None or s.substitute in resident else "not resident"
            own_state = "resident" if resident is None or s.original in resident else "not resident"
            lines.append(
                f"  [{s.index}] {s.position[0]} {s.position[1]}-{s.position[2]}: {s.original[:10]}… ({own_state}) -> "
                f"{s.substitute[:10]}… ({state}, load {float(load.get(s.substitute, 0.0)):g}), "
                f"{s.metric} {s.score:.4g} (context {self.graph.get_equiv(s.substitute, s.original).context or '?'})"
            )
        if pinned and budget > 0:
            lines.append(f"  pinned by LoRA adapters: chain indices {sorted(pinned)}")
        considered = sum(len(o) - 1 for o in options)
        if subs:
            lines.append(
                f"  chose {len(subs)} substitution(s) of {considered} allowed: error {best.error:.4g} <= {budget:g}, "
                f"cost {cost:.3f} ms vs own chain {own_cost:.3f} ms"
            )
        elif budget == 0:
            lines.append("  own chain: error budget 0 (substitution off)")
        else:
            lines.append(
                f"  own chain: cheapest ({own_cost:.3f} ms) among {considered} allowed substitute(s)"
            )
        return ChainPlan(
            model=manifest.key,
            tenant=tenant,
            chain=tuple(chain),
            substitutions=tuple(subs),
            cost=cost,
            own_cost=own_cost,
            error=best.error,
            budget=budget,
            graph_version=self.graph.version,
            explanation="\n".join(lines),
        )

    def _path_cost(
        self, chain: list[Fingerprint], resident: Resident | None, load: Mapping[Fingerprint, float]
    ) -> float:
        cost = sum(self.block_cost(fp, resident, load) for fp in chain)
        return cost + sum(
            self._transfer(a, b, resident) for a, b in zip(chain, chain[1:], strict=False)
        )


def _pareto(labels: list[_Label]) -> list[_Label]:
    """Labels no other label beats on both cost and error (ties: fewer substitutions)."""
    out: list[_Label] = []
    for lab in sorted(labels, key=lambda x: (x.cost, x.error, x.subs)):
        if not out or lab.error < out[-1].error - 1e-15:
            out.append(lab)
    return out


__all__ = [
    "ChainPlan",
    "ChainPlanner",
    "CostModel",
    "Resident",
    "Substitution",
    "set_error_budget",
    "validate_error_budget",
]
