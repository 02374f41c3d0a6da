"""The block graph: blocks as nodes, `next` edges from model chains, `equiv` edges from equivalence.

A networkx MultiDiGraph whose nodes are block fingerprints. Edge keys name the relation:
``next`` (some model's chain goes u -> v; the edge keeps the set of models), ``adapter`` (a LoRA
adapter block u attaches to chain block v) and ``equiv`` (block u can stand in for block v, with the
measured score, the metric, all metrics, the probe set, the context model and the date).
Node attributes (kind, position, bytes, family, owner tenant, visibility) come from the manifests:
a block used by a shared model is shared; a block used only by private models is private to their
tenants. Publication (versions in the zoo) lives in `graphs.versions`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import networkx as nx

from zoo_store import BlockSpec, Fingerprint, Manifest, Zoo
from zoo_store.types import canonical_json

from .exceptions import GraphFormatError, IncomparableBlocksError

SCHEMA = 1
NEXT, EQUIV, ADAPTER = "next", "equiv", "adapter"
Position = tuple[str, int, int]  # (kind, layer_start, layer_end), as BlockSpec.position


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()[:16]


def shape_signature(spec: BlockSpec) -> str:
    """Hash of a block's tensor names, shapes and dtypes (not its values)."""
    return _short_hash([[t.name, list(t.shape), t.dtype] for t in spec.tensors])


def arch_signature(spec: BlockSpec) -> str:
    """Hash of the config values a block's computation depends on."""
    return _short_hash(spec.arch)


def group_key(spec: BlockSpec) -> str:
    """Blocks with equal group keys may be compared: same family, position, shapes and arch."""
    kind, start, end = spec.position
    return f"{spec.family}/{kind}/{start}-{end}/{shape_signature(spec)}/{arch_signature(spec)}"


class SkipReason(str, Enum):
    """Why two blocks are never compared (the equivalence job counts each)."""

    POSITION = "position"  # other kind or layer range
    ADAPTER = "adapter"  # adapters are pinned to the base block they were trained on
    FAMILY = "family"  # other architecture family
    SHAPE = "shape"  # other tensor names, shapes or dtypes
    ARCH = "arch"  # same shapes, other config (rope, norm eps, ...)
    NO_CONTEXT = "no-context"  # no adapter-free model chain holds the block: nothing to probe it in
    UNSUPPORTED = (
        "unsupported-family"  # no runner for the block's family (cannot compute its outputs)
    )


def comparability(a: BlockSpec, b: BlockSpec) -> SkipReason | None:
    """None when `a` and `b` may be compared, else the (first) reason they may not."""
    if a.position != b.position:
        return SkipReason.POSITION
    if a.kind == "adapter":
        return SkipReason.ADAPTER
    if a.family != b.family:
        return SkipReason.FAMILY
    if shape_signature(a) != shape_signature(b):
        return SkipReason.SHAPE
    if arch_signature(a) != arch_signature(b):
        return SkipReason.ARCH
    return None


def check_comparable(a_fp: Fingerprint, a: BlockSpec, b_fp: Fingerprint, b: BlockSpec) -> None:
    reason = comparability(a, b)
    if reason is not None:
        raise IncomparableBlocksError(a_fp, b_fp, reason.value)


@dataclass(frozen=True)
class EquivEdge:
    """Block `substitute` can stand in for block `original`; lower `score` = more similar."""

    substitute: Fingerprint
    original: Fingerprint
    score: float
    metric: str
    metrics: dict[str, float] = field(default_factory=dict)
    probe_set: str = ""
    date: str = ""
    context: str = ""  # the model (tenant/name) whose chain the end-to-end check swapped into
    run: str = ""  # the job run that measured it

    def __post_init__(self) -> None:
        if (
            not isinstance(self.score, (int, float))
            or not math.isfinite(self.score)
            or self.score < 0
        ):
            raise ValueError(f"an equiv score must be a finite number >= 0, not {self.score!r}")
        if self.substitute == self.original:
            raise ValueError(
                "a block cannot be its own substitute (equal fingerprints are one node)"
            )

    def attrs(self) -> dict[str, Any]:
        d = asdict(self)
        del d["substitute"], d["original"]
        d["score"] = float(self.score)
        d["date"] = self.date or _now()
        return d


class BlockGraph:
    """A block graph over a networkx MultiDiGraph (`.g`); see the module docstring for its schema."""

    def __init__(self, g: nx.MultiDiGraph | None = None) -> None:
        self.g: nx.MultiDiGraph = g if g is not None else nx.MultiDiGraph()
        self.g.graph.setdefault("schema", SCHEMA)
        self.g.graph.setdefault("version", 0)
        self.g.graph.setdefault("models", {})

    # ------------------------------------------------------------------ building
    @classmethod
    def from_manifests(
        cls, manifests: Iterable[Manifest], spec_of: Callable[[Fingerprint], BlockSpec]
    ) -> BlockGraph:
        graph = cls()
        for m in sorted(manifests, key=lambda m: m.key):
            graph.add_model(m, spec_of)
        return graph

    @classmethod
    def from_zoo(cls, zoo: Zoo) -> BlockGraph:
        """Nodes and `next` / `adapter` edges of every model in the zoo (no `equiv` edges)."""
        return cls.from_manifests(zoo.list_models(), zoo.block_spec)

    def add_block(self, fp: Fingerprint, spec: BlockSpec) -> None:
        if fp in self.g:
            return
        self.g.add_node(
            fp,
            kind=spec.kind,
            family=spec.family,
            position=list(spec.position),
            layer_start=spec.layer_start,
            layer_end=spec.layer_end,
            nbytes=spec.nbytes,
            group=group_key(spec),
            models=[],
            tenants=[],
            owner=None,
            visibility="private",
        )

    def add_model(self, m: Manifest, spec_of: Callable[[Fingerprint], BlockSpec]) -> None:
        for fp in m.fingerprints():
            self.add_block(fp, spec_of(fp))
            self._use(fp, m)
        for u, v in zip(m.chain, m.chain[1:], strict=False):
            self._link(u, v, NEXT, m.key)
        for a in m.adapters:
            self._link(a.fingerprint, m.chain[a.index], ADAPTER, m.key)
        self.g.graph["models"][m.key] = {
            "tenant": m.tenant,
            "family": m.family,
            "visibility": m.visibility,
            "error_budget": float(m.error_budget),
            "chain": list(m.chain),
            "adapters": [[a.index, a.fingerprint] for a in m.adapters],
        }

    def _use(self, fp: Fingerprint, m: Manifest) -> None:
        node = self.g.nodes[fp]
        if m.key not in node["models"]:
            node["models"] = sorted([*node["models"], m.key])
        tenants = set(node["tenants"]) | {m.tenant}
        node["tenants"] = sorted(tenants)
        if m.visibility == "shared":
            node["visibility"] = "shared"
        node["owner"] = node["tenants"][0] if len(tenants) == 1 else None

    def _link(self, u: Fingerprint, v: Fingerprint, key: str, model: str) -> None:
        if self.g.has_edge(u, v, key):
            data = self.g.edges[u, v, key]
            data["models"] = sorted(set(data["models"]) | {model})
        else:
            self.g.add_edge(u, v, key=key, models=[model])

    # ------------------------------------------------------------------ reading
    @property
    def version(self) -> int:
        return int(self.g.graph.get("version", 0))

    def __contains__(self, fp: object) -> bool:
        return fp in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def node(self, fp: Fingerprint) -> dict[str, Any]:
        return self.g.nodes[fp]

    def blocks(self, *, kind: str | None = None) -> list[Fingerprint]:
        return sorted(fp for fp, d in self.g.nodes(data=True) if kind is None or d["kind"] == kind)

    def models(self) -> dict[str, dict[str, Any]]:
        """Model key -> {tenant, visibility, error_budget, chain, adapters} as the graph saw them."""
        return self.g.graph["models"]

    def position(self, fp: Fingerprint) -> Position:
        kind, start, end = self.g.nodes[fp]["position"]
        return (kind, int(start), int(end))

    def visible_to(self, fp: Fingerprint, tenant: str) -> bool:
        """May `tenant` run block `fp`? Shared blocks yes; private ones only for their tenants."""
        if fp not in self.g:
            return False
        node = self.g.nodes[fp]
        return node["visibility"] == "shared" or tenant in node["tenants"]

    def next_blocks(self, fp: Fingerprint) -> list[Fingerprint]:
        return sorted(v for _, v, k in self.g.out_edges(fp, keys=True) if k == NEXT)

    # ------------------------------------------------------------------ equivalence edges
    def add_equiv(self, edge: EquivEdge) -> None:
        for fp in (edge.substitute, edge.original):
            if fp not in self.g:
                raise KeyError(f"block {fp} is not in the graph; add its model first")
        a, b = self.g.nodes[edge.substitute], self.g.nodes[edge.original]
        if a["group"] != b["group"]:
            raise IncomparableBlocksError(
                edge.substitute, edge.original, "different position, family, shape or arch"
            )
        if self.g.has_edge(edge.substitute, edge.original, EQUIV):
            self.g.remove_edge(edge.substitute, edge.original, EQUIV)
        self.g.add_edge(edge.substitute, edge.original, key=EQUIV, **edge.attrs())

    def remove_equiv(self, substitute: Fingerprint, original: Fingerprint) -> bool:
        if self.g.has_edge(substitute, original, EQUIV):
            self.g.remove_edge(substitute, original, EQUIV)
            return True
        return False

    def get_equiv(self, substitute: Fingerprint, original: Fingerprint) -> EquivEdge | None:
        if not self.g.has_edge(substitute, original, EQUIV):
            return None
        return EquivEdge(substitute, original, **self.g.edges[substitute, original, EQUIV])

    def equiv_edges(self) -> list[EquivEdge]:
        return [
            EquivEdge(u, v, **d)
            for u, v, k, d in sorted(self.g.edges(keys=True, data=True), key=lambda e: e[:3])
            if k == EQUIV
        ]

    def substitutes_for(self, original: Fingerprint) -> list[EquivEdge]:
        """Every block with an `equiv` edge into `original`, best (lowest score) first."""
        if original not in self.g:
            return []
        edges = [
            EquivEdge(u, original, **d)
            for u, _, k, d in self.g.in_edges(original, keys=True, data=True)
            if k == EQUIV
        ]
        return sorted(edges, key=lambda e: (e.score, e.substitute))

    def copy_equiv_from(self, other: BlockGraph) -> int:
        """Take `other`'s equiv edges whose two blocks are still in this graph; returns how many."""
        n = 0
        for e in other.equiv_edges():
            if e.substitute in self.g and e.original in self.g:
                self.add_equiv(e)
                n += 1
        return n

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> dict[str, Any]:
        return nx.node_link_data(self.g, edges="edges")

    @classmethod
    def from_json(cls, data: Any) -> BlockGraph:
        if not isinstance(data, dict) or "nodes" not in data or "edges" not in data:
            raise GraphFormatError("not a node-link graph document (no 'nodes' / 'edges')")
        schema = data.get("graph", {}).get("schema")
        if schema != SCHEMA:
            raise GraphFormatError(
                f"graph schema {schema!r} is not {SCHEMA}; upgrade BlockLLM to read it"
            )
        try:
            g = nx.node_link_graph(data, directed=True, multigraph=True, edges="edges")
        except (KeyError, TypeError, nx.NetworkXError) as e:
            raise GraphFormatError(f"malformed node-link graph: {e!r}") from e
        return cls(g)

    def copy(self) -> BlockGraph:
        return BlockGraph.from_json(self.to_json())

    def summary(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for _, _, k in self.g.edges(keys=True):
            kinds[k] = kinds.get(k, 0) + 1
        return {
            "version": self.version,
            "blocks": self.g.number_of_nodes(),
            "models": len(self.models()),
            "next_edges": kinds.get(NEXT, 0),
            "adapter_edges": kinds.get(ADAPTER, 0),
            "equiv_edges": kinds.get(EQUIV, 0),
        }

    def groups(self) -> Iterator[tuple[str, list[Fingerprint]]]:
        """Chain blocks (not adapters) by comparability group, each group sorted."""
        by: dict[str, list[Fingerprint]] = {}
        for fp, d in self.g.nodes(data=True):
            if d["kind"] != "adapter":
                by.setdefault(d["group"], []).append(fp)
        for key in sorted(by):
            yield key, sorted(by[key])


__all__ = [
    "ADAPTER",
    "EQUIV",
    "NEXT",
    "BlockGraph",
    "EquivEdge",
    "Position",
    "SkipReason",
    "arch_signature",
    "check_comparable",
    "comparability",
    "group_key",
    "shape_signature",
]
