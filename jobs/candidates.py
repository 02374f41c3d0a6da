"""Which blocks the equivalence job works on, where it probes them, and which pairs it compares.

Driver-side bookkeeping, no tensors: every chain block gets a probe model (an adapter-free chain
holding a block of its comparability group, whose hidden states at that position are the probe
inputs) and a context (an adapter-free chain holding the block itself, where substitutes for it are
checked end to end). Shared foundation models are preferred for both, and a group keeps its probe
model across runs while that model exists, so stored sketches stay comparable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from graphs import BlockGraph, SkipReason
from zoo_store import Fingerprint, Manifest

from .lsh import SketchIndex

Pair = tuple[Fingerprint, Fingerprint]  # (a, b) with a < b


def preference(m: Manifest) -> tuple[bool, bool, str]:
    """Probe and context chains: shared foundation models first, then by name (stable)."""
    return (m.base is not None, m.visibility != "shared", m.key)


def _runnable(family: str) -> bool:
    try:
        from blockllm.families import get_family

        return get_family(family).name == "llama"  # the probe runner speaks the Llama family
    except Exception:  # an unknown family: nothing can run its blocks
        return False


@dataclass
class Targets:
    groups: dict[str, list[Fingerprint]]  # comparability group -> chain blocks
    group_of: dict[Fingerprint, str]
    context: dict[Fingerprint, tuple[Manifest, int]]  # block -> (chain holding it, its index)
    probe: dict[str, tuple[Manifest, int]]  # group -> (probe chain, index of the group's position)
    runnable: dict[str, bool] = field(default_factory=dict)  # family -> can the runner run it

    def skip_reason(self, fp: Fingerprint) -> SkipReason | None:
        pm = self.probe.get(self.group_of[fp])
        if pm is None:
            return SkipReason.NO_CONTEXT
        if not self.runnable.get(pm[0].family, False):
            return SkipReason.UNSUPPORTED
        return None


def find_targets(
    manifests: Iterable[Manifest], graph: BlockGraph, previous_probes: Mapping[str, str]
) -> Targets:
    clean = sorted((m for m in manifests if not m.adapters), key=preference)
    context: dict[Fingerprint, tuple[Manifest, int]] = {}
    for m in clean:
        for i, fp in enumerate(m.chain):
            context.setdefault(fp, (m, i))
    groups = dict(graph.groups())
    group_of = {fp: g for g, fps in groups.items() for fp in fps}
    probe: dict[str, tuple[Manifest, int]] = {}
    for g, fps in groups.items():
        options = [context[fp] for fp in fps if fp in context]
        kept = [mi for mi in options if mi[0].key == previous_probes.get(g)]
        if kept:
            probe[g] = kept[0]
        elif options:
            probe[g] = min(options, key=lambda mi: preference(mi[0]))
    runnable = {m.family: _runnable(m.family) for m, _ in probe.values()}
    return Targets(groups, group_of, context, probe, runnable)


@dataclass
class Selection:
    pairs: list[Pair]
    considered: int  # same-position pairs touching a new block
    skipped: Counter[str]  # those never compared, by reason (family, shape, arch)
    lsh_pruned: int  # comparable ones the sketches did not propose


def select_pairs(
    graph: BlockGraph,
    targets: Targets,
    records: Mapping[Fingerprint, Mapping[str, Any]],
    fresh: list[Fingerprint],
    sketched: Iterable[Fingerprint],
    *,
    bits: int,
    bands: int,
    k: int,
) -> Selection:
    """Count every same-position pair touching a `fresh` block; propose each sketched one's k nearest."""
    fresh_set = set(fresh)
    by_position: dict[tuple[str, int, int], list[Fingerprint]] = {}
    for fp in targets.group_of:
        by_position.setdefault(graph.position(fp), []).append(fp)
    considered, skipped = 0, Counter[str]()
    for fp in fresh:
        for other in by_position[graph.position(fp)]:
            if other == fp or (other in fresh_set and other < fp):
                continue  # each pair once
            considered += 1
            if targets.group_of[other] != targets.group_of[fp]:
                skipped[mismatch(targets.group_of[fp], targets.group_of[other]).value] += 1
    indexes: dict[str, SketchIndex] = {}
    for g, fps in targets.groups.items():
        indexes[g] = idx = SketchIndex(bits, bands)
        for fp in fps:
            sk = records.get(fp, {}).get("sketch")
            if sk:
                idx.add(fp, int(sk, 16))
    pairs: set[Pair] = set()
    sketched = list(sketched)
    for fp in sketched:
        for other in indexes[targets.group_of[fp]].candidates(fp, k):
            pairs.add((min(fp, other), max(fp, other)))
    comparable = {
        (min(fp, o), max(fp, o))
        for fp in sketched
        for o in targets.groups[targets.group_of[fp]]
        if o != fp
    }
    return Selection(sorted(pairs), considered, skipped, len(comparable - pairs))


def mismatch(g1: str, g2: str) -> SkipReason:
    """Why blocks of two groups at one position are never compared (group keys: family/kind/range/shape/arch)."""
    f1, _, _, s1, _ = g1.split("/")
    f2, _, _, s2, _ = g2.split("/")
    if f1 != f2:
        return SkipReason.FAMILY
    if s1 != s2:
        return SkipReason.SHAPE
    return SkipReason.ARCH


__all__ = ["Pair", "Selection", "Targets", "find_targets", "mismatch", "preference", "select_pairs"]
