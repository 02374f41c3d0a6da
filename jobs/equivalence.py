"""The equivalence job: find which blocks can stand in for which, and publish them as `equiv` edges.

`run_equivalence(zoo, client)` runs as a Dask task graph (inline without a client):

1. probe: run the probe set (packed probe prompts) through one adapter-free chain per comparability
   group (the probe model; a shared foundation model when there is one) and record the input of
   every block position;
2. sketch: for every block added or changed since the last run, its functional fingerprint on those
   inputs, hashed to a SimHash sketch (placed on the worker that holds the block);
3. candidates (driver): per group, LSH bands over all sketches; each new block keeps its k nearest.
   Equal fingerprints are one block (no work); blocks of another family, shape or arch at the same
   position are never paired (typed skip, counted);
4. compare: weight-space prefilter -> relative output error and cosine on the probe inputs ->
   end-to-end: swap the block into a chain holding the other one and measure next-token KL and
   agreement on the probe set (placed where the pair's blocks are);
5. publish: rebuild nodes from the manifests, re-apply this run's edge changes on top of the newest
   published graph (compare-and-swap; a concurrent publish makes us merge and retry), then save the
   job state (sketches, evaluated pairs) under `fingerprints/`.

Incremental: only pairs touching blocks that are new, or whose probe or context chain changed, are
compared, so adding 10 blocks costs at most 10 x k comparisons. A zoo lock (and a distributed.Lock
with a client) makes overlapping runs wait or skip.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphs import (
    BlockGraph,
    EquivEdge,
    GraphLockTimeoutError,
    GraphVersionConflictError,
    SkipReason,
    ZooLock,
    current_version,
    load_graph,
    publish,
)
from graphs.exceptions import GraphNotFoundError
from zoo_store import Fingerprint, Manifest, Zoo

from . import compare as C
from .candidates import find_targets, select_pairs
from .probes import ProbeSet, make_probe_set

log = logging.getLogger(__name__)

STATE = "fingerprints/equivalence-state"
LOCK_NAME = "equivalence"
Progress = Callable[[str, int, int], None]  # (stage, done, total)
STAGES = ("probe", "sketch", "context", "compare", "publish")


@dataclass(frozen=True)
class EquivalenceReport:
    """What one run did. `skipped` counts pairs (family / shape / arch) and blocks (other reasons)."""

    run_id: str
    status: str  # "done", or "skipped" when another run held the lock
    full: bool = False
    blocks: int = 0  # chain blocks in the zoo
    new_blocks: int = 0  # added, or whose probe or context chain changed, since the last run
    removed_blocks: int = 0
    shared_blocks: int = 0  # used by several models: identical by fingerprint, nothing to compare
    considered: int = 0  # same-position pairs touching a new block
    skipped: dict[str, int] = field(default_factory=dict)
    lsh_pruned: int = 0  # comparable pairs the sketches did not propose
    compared: int = 0  # pairs compared (weights loaded)
    prefiltered: int = 0  # of those, rejected by weight-space distance
    rejected: int = 0  # of those, no direction accepted
    edges_added: int = 0
    edges_removed: int = 0
    failed: int = 0  # tasks that raised (their blocks are retried next run)
    graph_version: int | None = None
    duration_s: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    pairs: tuple[C.PairResult, ...] = ()

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "pairs"}
        d["pairs"] = len(self.pairs)
        return d


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- execution (Dask or inline)
class _Inline:
    """A future-like thunk for running the task graph without a cluster, in order."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self._done, self._value, self._error = False, None, None

    def result(self) -> Any:
        if not self._done:
            try:
                self._value = self.fn(
                    *[a.result() if isinstance(a, _Inline) else a for a in self.args]
                )
            except Exception as e:  # surfaced by result(); the run counts it as failed
                self._error = e
            self._done = True
        if self._error is not None:
            raise self._error
        return self._value


class _Executor:
    def __init__(
        self, client: Any, locations: Mapping[Fingerprint, Sequence[str]] | None, run_id: str
    ) -> None:
        self.client, self.run_id = client, run_id
        self.locations: dict[Fingerprint, list[str]] = {
            fp: list(ws) for fp, ws in (locations or {}).items()
        }

    def submit(
        self, fn: Callable[..., Any], *args: Any, name: str, blocks: Sequence[Fingerprint] = ()
    ) -> Any:
        if self.client is None:
            return _Inline(fn, args)
        workers = sorted({w for fp in blocks for w in self.locations.get(fp, ())})
        hints: dict[str, Any] = {"workers": workers, "allow_other_workers": True} if workers else {}
        return self.client.submit(
            fn, *args, key=f"equivalence-{name}-{self.run_id}", pure=False, **hints
        )

    def wait(
        self, futures: dict[Any, Any], stage: str, progress: Progress | None
    ) -> tuple[dict[Any, Any], int]:
        """Results by key, and the number of tasks that failed (logged)."""
        results: dict[Any, Any] = {}
        failed = 0
        total = len(futures)
        if progress:
            progress(stage, 0, total)
        if self.client is None:
            done_iter = futures.items()
        else:
            from distributed import as_completed

            by_future = {f: k for k, f in futures.items()}
            done_iter = ((by_future[f], f) for f in as_completed(list(futures.values())))
        for n, (key, fut) in enumerate(done_iter, 1):
            try:
                results[key] = fut.result()
            except Exception as e:
                failed += 1
                log.warning("equivalence %s task %s failed: %s", stage, key, e)
            if progress:
                progress(stage, n, total)
        return results, failed

    def learn_locations(self, futures: dict[Fingerprint, Any]) -> None:
        """Blocks stay cached on the worker that sketched them: later tasks go there."""
        if self.client is None or not futures:
            return
        who = self.client.who_has(list(futures.values()))
        for fp, fut in futures.items():
            ws = who.get(fut.key)
            if ws and fp not in self.locations:
                self.locations[fp] = list(ws)


# ---------------------------------------------------------------------- the run
def run_equivalence(
    zoo: Zoo,
    client: Any = None,
    *,
    full: bool = False,
    progress: Progress | None = None,
    probe_prompts: Sequence[str] | None = None,
    settings: C.Settings | None = None,
    block_locations: Mapping[Fingerprint, Sequence[str]] | None = None,
    if_locked: str = "wait",
    lock_timeout: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> EquivalenceReport:
    """Compare the blocks added or changed since the last run and publish the new graph.

    `client`: a distributed.Client (tasks get `workers=` hints from `block_locations`, a who_has-like
    map, and from where earlier tasks loaded each block); None runs inline. `probe_prompts` replace
    the stored ones (a change recomputes everything, as does `full=True` or changed `settings`).
    `if_locked`: "wait" for a running job (up to `lock_timeout` s) or "skip" this run.
    """
    if if_locked not in ("wait", "skip"):
        raise ValueError(f"if_locked must be 'wait' or 'skip', not {if_locked!r}")
    settings = settings or C.Settings.from_config()
    run_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    zlock = ZooLock(zoo, LOCK_NAME, ttl=settings.lock_ttl)
    dlock = None
    if client is not None:
        from distributed import Lock

        dlock = Lock(
            f"blockllm-{LOCK_NAME}-{_hash(zoo.url)}",
            scheduler_rpc=client.scheduler,
            loop=client.loop,
        )
        if not dlock.acquire(blocking=if_locked == "wait", timeout=lock_timeout):
            if if_locked == "wait":
                raise GraphLockTimeoutError(LOCK_NAME, "another run on this cluster", lock_timeout or 0.0)
            return _skipped(run_id, t0)
    try:
        if not zlock.acquire(wait=if_locked == "wait", timeout=lock_timeout):
            return _skipped(run_id, t0)
        try:
            job = _Run(
                zoo,
                client,
                settings,
                run_id,
                full,
                progress,
                probe_prompts,
                block_locations,
                storage_options,
            )
            report = job.run()
        finally:
            zlock.release()
    finally:
        if dlock is not None:
            dlock.release()
    log.info(
        "equivalence run %s: %d new blocks, %d compared (%d prefiltered, %d rejected), +%d/-%d edges, "
        "graph v%s, %.2f s",
        run_id,
        report.new_blocks,
        report.compared,
        report.prefiltered,
        report.rejected,
        report.edges_added,
        report.edges_removed,
        report.graph_version,
        report.duration_s,
    )
    return report


def _skipped(run_id: str, t0: float) -> EquivalenceReport:
    log.info("equivalence run %s skipped: another run holds the lock", run_id)
    return EquivalenceReport(run_id, "skipped", duration_s=time.perf_counter() - t0)


class _Run:
    def __init__(
        self,
        zoo: Zoo,
        client: Any,
        settings: C.Settings,
        run_id: str,
        full: bool,
        progress: Progress | None,
        prompts: Sequence[str] | None,
        locations: Mapping[Fingerprint, Sequence[str]] | None,
        storage_options: Mapping[str, Any] | None,
    ) -> None:
        self.zoo, self.settings, self.run_id, self.full, self.progress = (
            zoo,
            settings,
            run_id,
            full,
            progress,
        )
        self.ex = _Executor(client, locations, run_id)
        self.ref = C.ZooRef(zoo.url, dict(storage_options) if storage_options else None)
        self.state: dict[str, Any] = zoo.get_json(STATE) or {}
        self.prompts = list(prompts) if prompts is not None else self.state.get("prompts")
        self.stage_seconds: dict[str, float] = {}
        self._probe_sets: dict[str, ProbeSet] = {}

    def _probe_set(self, m: Manifest) -> ProbeSet:
        key = f"{m.tokenizer}/{m.config.get('vocab_size')}"
        if key not in self._probe_sets:
            tokenizer = None
            if m.tokenizer is not None:
                from blockllm.chain import load_tokenizer

                tokenizer = load_tokenizer(self.zoo, m)
            self._probe_sets[key] = make_probe_set(
                self.prompts,
                tokenizer=tokenizer,
                vocab_size=int(m.config["vocab_size"]),
                rows=self.settings.probe_rows,
                tokens=self.settings.probe_tokens,
            )
        return self._probe_sets[key]

    def _timed(self, stage: str, t: float) -> None:
        self.stage_seconds[stage] = round(
            self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t, 4
        )

    def run(self) -> EquivalenceReport:
        t_start = time.perf_counter()
        zoo, s = self.zoo, self.settings
        manifests = zoo.list_models()
        graph = BlockGraph.from_manifests(manifests, zoo.block_spec)
        settings_key = _hash([s.comparison_key(), self.prompts])
        full = self.full or self.state.get("settings") != settings_key
        old_blocks: dict[str, dict[str, Any]] = {} if full else dict(self.state.get("blocks", {}))
        old_pairs: dict[str, Any] = {} if full else dict(self.state.get("pairs", {}))
        try:
            start_graph: BlockGraph | None = load_graph(zoo)
        except GraphNotFoundError:
            start_graph = None
        tg = find_targets(manifests, graph, {} if full else self.state.get("probe_models", {}))

        # -- which blocks need work: new ones, and those whose probe or context chain changed
        skipped: Counter[str] = Counter()
        records: dict[Fingerprint, dict[str, Any]] = {}
        dirty: list[Fingerprint] = []  # to sketch and compare
        fresh: list[Fingerprint] = []  # new or changed, those that cannot be probed included
        for fp in graph.blocks(kind="adapter"):
            records[fp] = {"adapter": True}
            if fp not in old_blocks:
                skipped[SkipReason.ADAPTER.value] += 1
        for fp in sorted(tg.group_of):
            g = tg.group_of[fp]
            reason = tg.skip_reason(fp)
            if reason is not None:
                records[fp] = {"group": g, "skip": reason.value}
                if old_blocks.get(fp) != records[fp]:
                    skipped[reason.value] += 1
                    fresh.append(fp)
                continue
            pm, ctx = tg.probe[g][0], tg.context.get(fp)
            rec = {
                "group": g,
                "probe": f"{pm.key}@{self._probe_set(pm).id}",
                "context": f"{ctx[0].key}@{self._probe_set(ctx[0]).id}" if ctx else None,
            }
            old = old_blocks.get(fp)
            if (
                old is not None
                and old.get("sketch")
                and all(old.get(k) == v for k, v in rec.items())
            ):
                records[fp] = old
            else:
                records[fp] = rec
                dirty.append(fp)
                fresh.append(fp)
        removed = [fp for fp in old_blocks if fp not in graph]

        # -- stage 1: probe states of the chains the sketches need (futures: run where needed)
        t = time.perf_counter()
        state_futs: dict[str, Any] = {}

        def states_of(m: Manifest, reuse: Manifest | None = None) -> Any:
            if m.key not in state_futs:
                ps = self._probe_set(m)
                # a context chain shares its prefix with the probe chain: only the rest is run
                prefix = states_of(reuse) if reuse is not None and reuse.key != m.key else None
                state_futs[m.key] = self.ex.submit(
                    C.chain_states, self.ref, m.key, m.config, list(m.chain), ps.id, ps.ids, prefix,
                    name=f"states-{m.key.replace('/', '-')}", blocks=list(m.chain),
                )  # fmt: skip
            return state_futs[m.key]

        for fp in dirty:
            states_of(tg.probe[tg.group_of[fp]][0])
        self._timed("probe", t)

        # -- stage 2: sketches of the dirty blocks, each placed where its block is
        t = time.perf_counter()
        sketch_futs = {}
        for fp in dirty:
            pm, index = tg.probe[tg.group_of[fp]]
            sketch_futs[fp] = self.ex.submit(
                C.sketch_block, self.ref, fp, states_of(pm), index, s.sketch_bits,
                name=f"sketch-{fp[:16]}", blocks=[fp],
            )  # fmt: skip
        sketches, failed = self.ex.wait(sketch_futs, "sketch", self.progress)
        self.ex.learn_locations({fp: f for fp, f in sketch_futs.items() if fp in sketches})
        for fp in dirty:
            if fp in sketches:
                records[fp]["sketch"] = format(sketches[fp], "x")
            else:
                records.pop(fp, None)  # retried next run
        self._timed("sketch", t)

        # -- stage 3 (driver): LSH candidates, the k nearest per new block; mismatches counted
        sel = select_pairs(
            graph, tg, records, fresh, [fp for fp in dirty if fp in sketches],
            bits=s.sketch_bits, bands=s.sketch_bands, k=s.max_candidates,
        )  # fmt: skip
        skipped.update(sel.skipped)

        # -- stage 4: context chains for the end-to-end checks
        t = time.perf_counter()
        for pair in sel.pairs:
            for fp in pair:
                if fp in tg.context:
                    states_of(tg.context[fp][0], reuse=tg.probe[tg.group_of[fp]][0])
        self._timed("context", t)

        # -- stage 5: compare, each pair placed where its blocks are
        t = time.perf_counter()
        compare_futs = {}
        for a, b in sel.pairs:
            pm, pi = tg.probe[tg.group_of[a]]
            ca, cb = tg.context.get(a), tg.context.get(b)
            compare_futs[(a, b)] = self.ex.submit(
                C.compare_pair, self.ref, a, b, states_of(pm), pi,
                states_of(ca[0]) if ca else None, ca[1] if ca else 0,
                states_of(cb[0]) if cb else None, cb[1] if cb else 0,
                s, name=f"compare-{a[:12]}-{b[:12]}", blocks=[a, b],
            )  # fmt: skip
        results, compare_failed = self.ex.wait(compare_futs, "compare", self.progress)
        failed += compare_failed
        for a, b in compare_futs:
            if (a, b) not in results:  # retry both blocks' pairs next run
                records.pop(a, None)
                records.pop(b, None)
        self._timed("compare", t)

        # -- edges: drop every old edge touching a dirty or removed block, add what was accepted
        touched = set(dirty) | set(removed)
        removed_edges = set()
        if start_graph is not None:
            removed_edges = {
                (e.substitute, e.original)
                for e in start_graph.equiv_edges()
                if e.substitute in touched or e.original in touched
            }
        added = [
            EquivEdge(
                d.substitute,
                d.original,
                score=d.score(s.metric),
                metric=s.metric,
                metrics=dict(d.metrics),
                probe_set=self._probe_set(tg.context[d.original][0]).id,
                date=_now(),
                context=d.context,
                run=self.run_id,
            )  # fmt: skip
            for res in results.values()
            for d in res.directions
            if d.accepted
        ]
        added_keys = {(e.substitute, e.original) for e in added}

        # -- publish (compare-and-swap: on a conflict, rebuild on the newer graph and retry)
        t = time.perf_counter()
        if self.progress:
            self.progress("publish", 0, 1)
        unchanged = start_graph is not None and start_graph.models() == graph.models()
        if not removed_edges and not added and unchanged:
            version = start_graph.version  # nothing changed: readers keep the graph they have
        else:
            version = self._publish(removed_edges, added)
        if self.progress:
            self.progress("publish", 1, 1)
        self._timed("publish", t)

        for key in [k for k in old_pairs if set(k.split("|")) & touched]:
            del old_pairs[key]
        for (a, b), res in results.items():
            old_pairs[f"{a}|{b}"] = res.to_dict()
        report = EquivalenceReport(
            run_id=self.run_id,
            status="done",
            full=full,
            blocks=len(tg.group_of),
            new_blocks=len(fresh),
            removed_blocks=len(removed),
            shared_blocks=sum(1 for fp in graph.blocks() if len(graph.node(fp)["models"]) > 1),
            considered=sel.considered,
            skipped=dict(skipped),
            lsh_pruned=sel.lsh_pruned,
            compared=len(results),
            prefiltered=sum(1 for r in results.values() if r.stage == "prefilter"),
            rejected=sum(1 for r in results.values() if not any(d.accepted for d in r.directions)),
            edges_added=len(added),
            edges_removed=len(removed_edges - added_keys),
            failed=failed,
            graph_version=version,
            duration_s=round(time.perf_counter() - t_start, 4),
            stage_seconds=self.stage_seconds,
            pairs=tuple(results[k] for k in sorted(results)),
        )
        summary = {k: v for k, v in report.summary().items() if k != "stage_seconds"}
        runs = [*list(self.state.get("runs", []))[-49:], {"date": _now(), **summary}]
        self.zoo.put_json(
            STATE,
            {
                "schema": 1,
                "settings": settings_key,
                "prompts": self.prompts,
                "probe_models": {g: m.key for g, (m, _) in tg.probe.items()},
                "blocks": records,
                "pairs": old_pairs,
                "runs": runs,
            },
        )
        return report

    def _publish(self, removed_edges: set[tuple[str, str]], added: list[EquivEdge]) -> int:
        for _attempt in range(20):
            parent = current_version(self.zoo)
            graph = BlockGraph.from_zoo(self.zoo)  # models may have changed while we computed
            if parent:
                try:
                    graph.copy_equiv_from(load_graph(self.zoo))
                except GraphNotFoundError:
                    continue
            for sub, orig in removed_edges:
                graph.remove_equiv(sub, orig)
            for e in added:
                if e.substitute in graph and e.original in graph:
                    graph.add_equiv(e)
            try:
                return publish(self.zoo, graph, parent=parent, run=self.run_id)
            except GraphVersionConflictError as e:
                log.info("graph publish conflict (%s); merging into the newer graph", e)
                time.sleep(0.05 * (_attempt + 1))
        raise GraphVersionConflictError(None, current_version(self.zoo))


def job_state(zoo: Zoo) -> dict[str, Any]:
    """The stored job state: settings, prompts, per-block sketches, evaluated pairs, run log."""
    return zoo.get_json(STATE) or {}


__all__ = ["STATE", "EquivalenceReport", "job_state", "run_equivalence"]
