"""Steps as CUDA graphs per chain segment, so captured graphs do not multiply with the variant mix.

A whole-step graph (`engine.decode-graphs: step`) is keyed by the step's class composition, which
changes whenever a request of another variant arrives or ends. Here (`segments`) each run of
blocks that one set of classes passes through together (the shared trunk, one variant's own
layers, a shared head) is captured once per row bucket. A step gathers each segment's rows through
a static index buffer, replays the segment's graph and scatters the rows back into one hidden-state
buffer; LoRA deltas use every loaded adapter of a block at once, masked per row (dense multi-LoRA),
so adapters do not key the graphs either. A row is one token: a prefill chunk of n tokens is n rows,
each attending to its paged context up to its own position (`engine.prefill-graphs`), so an
arrival replays graphs too instead of launching every layer's kernels from Python.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .forward import Lane, head_logits, run_layers
from .graphs import GraphCache
from .plan import BUCKETS, Item, ModelClass, Stage, bucket
from .prefetch import gemm_weights
from .weights import EmbedBlock, HeadBlock, LayerBlock, LoraAdapter

log = logging.getLogger(__name__)

_GEMMS = ("qkv", "o", "gate_up", "down")


@dataclass(eq=False)
class Segment:
    """Consecutive stages (embedding, layer blocks, head) that the same classes pass through."""

    key: tuple[str, ...]  # stage keys in chain order
    classes: tuple[int, ...]  # indices into the step's class list
    embed: EmbedBlock | None
    layers: list[LayerBlock]
    head: HeadBlock | None
    order: tuple[int, int]  # (rank, first layer): a valid execution order


def _chain(cls: ModelClass) -> list[tuple[str, object, tuple[int, int]]]:
    out: list[tuple[str, object, tuple[int, int]]] = []
    if cls.embed is not None:
        out.append((cls.embed.fingerprint, cls.embed, (0, -1)))
    out += [(b.fingerprint, b, (1, b.layer_start)) for b in cls.layers]
    if cls.head is not None:
        out.append((cls.head_key, cls.head, (2, 0)))
    return out


def segments_of(classes: list[ModelClass]) -> list[Segment]:
    """Fuse each run of stages with one set of users and one successor into a segment, in an
    order where every segment runs after the segments that feed its rows."""
    users: dict[str, list[int]] = {}
    nxt: dict[str, set[str]] = {}
    first: dict[str, bool] = {}
    info: dict[str, tuple[object, tuple[int, int]]] = {}
    for c, cls in enumerate(classes):
        chain = _chain(cls)
        for j, (k, block, order) in enumerate(chain):
            users.setdefault(k, []).append(c)
            info[k] = (block, order)
            nxt.setdefault(k, set())
            if j + 1 < len(chain):
                nxt[k].add(chain[j + 1][0])
            first[k] = first.get(k, False) or j == 0
    # a stage continues its predecessor's segment when that one leads only here with the same users
    prev_of: dict[str, str] = {}
    for k, ns in nxt.items():
        if len(ns) == 1:
            (n,) = ns
            if users[n] == users[k] and not first.get(n, False):
                prev_of[n] = k
    succ = {p: n for n, p in prev_of.items()}
    segments = []
    for k in sorted(users, key=lambda k: info[k][1]):
        if k in prev_of:
            continue
        keys = [k]
        while keys[-1] in succ:
            keys.append(succ[keys[-1]])
        blocks = [info[s][0] for s in keys]
        segments.append(
            Segment(
                tuple(keys),
                tuple(users[k]),
                next((b for b in blocks if isinstance(b, EmbedBlock)), None),
                [b for b in blocks if isinstance(b, LayerBlock)],
                next((b for b in blocks if isinstance(b, HeadBlock)), None),
                info[k][1],
            )
        )
    segments.sort(key=lambda s: s.order)
    return segments


def dense_lora(
    block: LayerBlock, users: list[tuple[int, LoraAdapter]]
) -> list[dict[str, tuple[torch.Tensor, ...]]] | None:
    """Every adapter of a layer block stacked per (layer, GEMM): A (R, in), B (out, R) placed at
    each module's output columns, and per column its owner's LoRA slot and scale. A row's delta is
    ((x @ A.T) * [slot == row's slot] * scale) @ B.T: one pair of GEMMs for any mix of adapters."""
    if not users:
        return None
    tables: list[dict[str, tuple[torch.Tensor, ...]]] = []
    for i, w in enumerate(block.layers):
        per: dict[str, tuple[torch.Tensor, ...]] = {}
        for gemm in _GEMMS:
            mods = [(slot, m) for slot, ad in users for m in ad.layers[i].get(gemm, [])]
            if not mods:
                continue
            out_w = {"qkv": w.w_qkv, "o": w.w_o, "gate_up": w.w_gate_up, "down": w.w_down}[gemm].shape[0]
            a = torch.cat([m.a for _, m in mods])
            b = torch.zeros(out_w, a.shape[0], dtype=a.dtype, device=a.device)
            cols, scales, at = [], [], 0
            for slot, m in mods:
                r = m.a.shape[0]
                b[m.c0 : m.c1, at : at + r] = m.b
                cols += [slot] * r
                scales += [m.scale] * r
                at += r
            per[gemm] = (
                a,
                b,
                torch.tensor(cols, dtype=torch.int64, device=a.device),
                torch.tensor(scales, dtype=a.dtype, device=a.device),
            )
        tables.append(per)
    return tables


@dataclass(eq=False)
class _Buffers:
    """A lane's static step tensors; graphs capture their addresses, so they only ever grow by
    being replaced (and every graph of the old ones is dropped with them)."""

    rows: int  # R real rows at most; row R is the scratch row that padding reads and writes
    inputs: torch.Tensor  # (4, R + 1) int64: token ids, positions, KV slots, LoRA slots
    hidden: torch.Tensor  # (R + 1, C)
    logits: torch.Tensor  # (R + 1, V)
    tokens: torch.Tensor  # (R + 1,) greedy picks
    arena: torch.Tensor  # every segment graph's row indices, at its own offset
    staging: torch.Tensor  # pinned (4 * (R + 1) + arena size,) int64: both, as the host writes them
    host_inputs: np.ndarray  # views of `staging`
    host_arena: np.ndarray
    version: int
    regions: dict[tuple, int] = field(default_factory=dict)  # (segment, bucket) -> arena offset
    used: int = 0  # arena entries handed out
    max_ctx: int = 1  # host bound on any row's context (the torch reference attention only)
    uploaded: torch.cuda.Event | None = None  # recorded after the last upload from `staging`


@dataclass(eq=False)
class SegmentStep:
    """One decode step on segment graphs; it quacks like both a Plan and a graphs.Captured, so the
    pipelined decode chains it exactly like a whole-step graph."""

    engine: StepGraphs
    lane: Lane
    bufs: _Buffers
    runs: list[tuple[tuple, Segment, int, int]]  # (graph key, segment, arena offset, bucket)
    item_rows: list[int]
    replays: int = 0
    entries: list = field(default_factory=list)

    @property
    def graph(self) -> SegmentStep:
        return self

    @property
    def inputs(self) -> torch.Tensor:
        return self.bufs.inputs

    @property
    def n_rows(self) -> int:
        return self.bufs.rows + 1

    @property
    def item_sample(self) -> list[int]:
        return self.item_rows

    @property
    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bufs.logits, self.bufs.tokens

    @property
    def max_ctx(self) -> int:
        return self.bufs.max_ctx

    @max_ctx.setter
    def max_ctx(self, value: int) -> None:
        self.bufs.max_ctx = value

    def run(self) -> None:
        """Replay each segment's graph in order, capturing (and thereby computing) new ones."""
        eng = self.engine
        self.entries = []
        for key, seg, off, b in self.runs:
            entry = eng.seg_graphs.get(key)
            if entry is None:
                fn = eng._segment_fn(self.lane, self.bufs, seg, off, b)
                if key in eng._seg_seen:  # a layout seen before: capture (the warm-up computes this step)
                    entry = eng.seg_graphs.capture(key, None, fn)
                else:  # first sighting: run it eagerly; a capture costs far more than one eager run
                    eng._seg_seen.add(key)
                    entry = _Eager(fn)
                    fn()
            else:
                entry.graph.replay()
                entry.replays += 1
            self.entries.append(entry)

    def replay(self) -> None:
        """Run the step again (a pipelined decode's next token); a segment run eagerly at its first
        sighting is captured now, its second."""
        cache = self.engine.seg_graphs
        for i, entry in enumerate(self.entries):
            if isinstance(entry, _Eager):
                key = self.runs[i][0]
                captured = cache.get(key)
                if captured is None:
                    self.entries[i] = cache.capture(key, None, entry.fn)  # the warm-up computes this step
                    continue
                self.entries[i] = entry = captured
            entry.graph.replay()
            entry.replays += 1


class _Eager:
    """A segment run eagerly (its first sighting), replayable like a captured graph."""

    def __init__(self, fn) -> None:
        self.fn, self.replays = fn, 0

    @property
    def graph(self) -> _Eager:
        return self

    def replay(self) -> None:
        self.fn()


class StepGraphs:
    """Engine methods for segment-graph decode steps (`engine.decode-graphs: segments`)."""

    def _init_step_graphs(self, capacity: int, emulate: bool = False) -> None:
        self.seg_graphs = GraphCache(capacity, emulate=emulate)
        self._seg_bufs: dict[tuple, _Buffers] = {}
        self._seg_layouts: dict[tuple, list[Segment]] = {}
        self._seg_seen: set[tuple] = set()  # graph keys met once (run eagerly), captured when met again
        self._lora_slots: dict[tuple, int] = {}
        self._lora_tables: dict[str, list | None] = {}
        self._lora_epoch = 0
        self._last_seg_step: SegmentStep | None = None

    def _reset_step_graphs(self) -> None:
        """Weights or adapters changed (a model loaded or unloaded): recapture everything."""
        self.seg_graphs.clear()
        self._seg_seen.clear()
        self._last_seg_step = None
        self._seg_layouts.clear()
        self._lora_tables.clear()
        self._lora_epoch += 1

    def _lora_slot(self, cls: ModelClass) -> int:
        if not cls.adapters:
            return 0
        slot = self._lora_slots.get(cls.key)
        if slot is None:
            slot = self._lora_slots[cls.key] = len(self._lora_slots) + 1
        return slot

    def _dense_lora(self, block: LayerBlock) -> list | None:
        key = block.fingerprint
        if key not in self._lora_tables:
            users = [
                (self._lora_slot(cls), cls.adapters[p])
                for cls in self._classes.values()
                for p, b in enumerate(cls.layers)
                if b is block and p in cls.adapters
            ]
            self._lora_tables[key] = dense_lora(block, users)
        return self._lora_tables[key]

    def warmup(self, max_rows: int | None = None) -> float:
        """Run every decode row bucket up to `max_rows` once through a chain of each lane, on the
        scratch row only, so that no request later waits on a Triton JIT compile (each row bucket
        picks its own kernel variants; vLLM warms up at start-up likewise). Returns the seconds."""
        t0 = time.perf_counter()
        top = bucket(max_rows or max(2 * self.max_batch_size, self.graph_rows()))
        with torch.inference_mode():
            for lane in self.lanes.values():
                cls = next((c for c in self._classes.values() if c.lane == lane.key), None)
                if cls is None:
                    continue
                (seg,) = segments_of([cls])
                bufs = self._buffers(lane, top)
                for b in (x for x in BUCKETS if x <= top):
                    bufs = self._regions(lane, bufs, [(("warmup", *seg.key), b)])
                    off = bufs.regions[(("warmup", *seg.key), b)]
                    bufs.arena[off : off + b].fill_(bufs.rows)  # every row is the scratch row (KV slot 0)
                    bufs.inputs[:, bufs.rows].zero_()
                    self._segment_fn(lane, bufs, seg, off, b)()
                lane.pool.sync()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("engine warm-up: row buckets up to %d in %.2f s", top, time.perf_counter() - t0)
        return time.perf_counter() - t0

    def _prefills_on_graphs(self) -> bool:
        """`engine.prefill-graphs` in effect: only segment graphs hold prefill chunks (as rows)."""
        return self.prefill_graphs and self.decode_graphs == "segments"

    def graph_rows(self) -> int:
        """Rows one segment-graph step holds at most: a full decode batch, plus a prefill chunk's
        tokens when prefills run on the graphs too."""
        return self.max_batch_size + (self.scheduler.prefill_chunk if self._prefills_on_graphs() else 0)

    def _buffers(self, lane: Lane, n: int) -> _Buffers:
        bufs = self._seg_bufs.get(lane.key)
        if bufs is not None and bufs.rows >= n:
            return bufs
        rows = max(bucket(n), bucket(self.graph_rows()), bufs.rows * 2 if bufs else 0)
        return self._make_buffers(lane, rows, 4096 if bufs is None else len(bufs.host_arena), bufs)

    def _make_buffers(self, lane: Lane, rows: int, arena: int, old: _Buffers | None) -> _Buffers:
        dev = self.device
        pin = torch.cuda.is_available()
        staging = torch.zeros(4 * (rows + 1) + arena, dtype=torch.int64)
        staging = staging.pin_memory() if pin else staging
        host = staging.numpy()
        bufs = _Buffers(
            rows,
            torch.zeros(4, rows + 1, dtype=torch.int64, device=dev),
            torch.zeros(rows + 1, lane.hidden, dtype=lane.dtype, device=dev),
            torch.zeros(rows + 1, lane.vocab, dtype=lane.dtype, device=dev),
            torch.zeros(rows + 1, dtype=torch.int64, device=dev),
            torch.zeros(arena, dtype=torch.int64, device=dev),
            staging,
            host[: 4 * (rows + 1)].reshape(4, rows + 1),
            host[4 * (rows + 1) :],
            (old.version + 1) if old else 0,
        )
        if old is not None:  # offsets stay valid: a step rewrites every region it uses
            bufs.regions, bufs.used = old.regions, old.used
        self._seg_bufs[lane.key] = bufs
        log.debug("segment-graph buffers of lane %s: %d rows, arena %d", lane.key, rows, arena)
        return bufs

    def _regions(self, lane: Lane, bufs: _Buffers, wanted: list[tuple[tuple, int]]) -> _Buffers:
        """Arena offsets for every (segment, bucket) of a step; a full arena is replaced by a
        larger one (every graph of the old one is dropped with it)."""
        new = [w for w in dict.fromkeys(wanted) if w not in bufs.regions]
        need = bufs.used + sum(b for _, b in new)
        if need > len(bufs.host_arena):
            bufs = self._make_buffers(lane, bufs.rows, max(2 * len(bufs.host_arena), need), bufs)
        for w in new:
            bufs.regions[w] = bufs.used
            bufs.used += w[1]
        return bufs

    def _segment_step(self, lane: Lane, item_groups: list[tuple[ModelClass, list[Item]]]) -> SegmentStep:
        """Lay out a step (decodes, and prefill chunks with `engine.prefill-graphs`) over the lane's
        buffers and upload its inputs (nothing runs yet)."""
        classes = [cls for cls, _ in item_groups]
        lay_key = (lane.key, tuple(c.key for c in classes))
        segs = self._seg_layouts.get(lay_key)
        if segs is None:
            segs = self._seg_layouts[lay_key] = segments_of(classes)
        # one row per token: a decode is one row, a prefill chunk of n tokens n rows, each attending
        # to its own paged context up to its position (causal by construction)
        class_rows: list[list[int]] = []
        item_rows: list[int] = []  # each item's sampling row (its last), -1 for a chunk that does not sample
        r = 0
        for _cls, items in item_groups:
            start = r
            for it in items:
                r += len(it.tokens)
                item_rows.append(r - 1 if it.samples else -1)
            class_rows.append(list(range(start, r)))
        n = r
        seg_rows = [[x for c in seg.classes for x in class_rows[c]] for seg in segs]
        buckets = [bucket(len(rows)) for rows in seg_rows]
        bufs = self._regions(lane, self._buffers(lane, n), [(s.key, b) for s, b in zip(segs, buckets, strict=True)])
        R = bufs.rows
        if bufs.uploaded is not None:  # the last step's upload may still be queued behind the step in flight
            bufs.uploaded.synchronize()
        h = bufs.host_inputs
        h.fill(0)
        r = 0
        for cls, items in item_groups:
            slot = self._lora_slot(cls)
            for it in items:
                k = len(it.tokens)
                if k == 1:
                    h[0, r], h[1, r], h[2, r], h[3, r] = it.tokens[0], it.start, it.slot, slot
                else:
                    h[0, r : r + k] = it.tokens
                    h[1, r : r + k] = np.arange(it.start, it.start + k)
                    h[2, r : r + k], h[3, r : r + k] = it.slot, slot
                r += k
        runs = []
        for seg, rows, b in zip(segs, seg_rows, buckets, strict=True):
            off = bufs.regions[(seg.key, b)]
            bufs.host_arena[off : off + b] = rows + [R] * (b - len(rows))
            key = ("seg", lane.key, lane.pool.generation, self._lora_epoch, bufs.version, seg.key, b)
            runs.append((key, seg, off, b))
        bufs.max_ctx = max(it.start + len(it.tokens) for _, items in item_groups for it in items)
        k = 4 * (R + 1)  # host_inputs and host_arena are the two parts of the pinned staging buffer
        bufs.inputs.view(-1).copy_(bufs.staging[:k], non_blocking=True)
        bufs.arena[: bufs.used].copy_(bufs.staging[k : k + bufs.used], non_blocking=True)
        if bufs.inputs.is_cuda:
            bufs.uploaded = torch.cuda.Event()
            bufs.uploaded.record()
        step = self._last_seg_step = SegmentStep(self, lane, bufs, runs, item_rows)
        return step

    def _segment_fn(self, lane: Lane, bufs: _Buffers, seg: Segment, off: int, b: int):
        """The captured body of one segment: gather its rows, run its blocks, scatter them back."""
        stages = [
            Stage(block, block.fingerprint, slice(0, b), b, decode=slice(0, b), dense=self._dense_lora(block))
            for block in seg.layers
        ]
        idx = bufs.arena[off : off + b]
        weights = gemm_weights([*seg.layers, *([seg.head] if seg.head is not None else [])])

        def fn() -> tuple[torch.Tensor, ...]:
            with lane.prefetch.sequence(lambda: weights):
                take = bufs.inputs.index_select(1, idx)  # (4, b)
                if seg.embed is not None:
                    x = F.embedding(take[0], seg.embed.weight)
                else:
                    x = bufs.hidden.index_select(0, idx)
                for st in stages:
                    st.positions, st.slot_ids, st.lora_slots = take[1], take[2], take[3]
                    run_layers(st.block, x, st, lane, bufs.max_ctx)
                if seg.head is None:
                    bufs.hidden.index_copy_(0, idx, x)
                    return ()
                head = seg.head
                lane.prefetch.step(head.weight)
                logits = head_logits(head, x, lane)
                bufs.logits.index_copy_(0, idx, logits)
                bufs.tokens.index_copy_(0, idx, logits.argmax(-1))
                return ()

        return fn
