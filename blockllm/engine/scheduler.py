"""Continuous batching: who runs in the next step, admission by KV pages and per-block batch limits,
preemption by recompute when decode growth runs the page pool dry or online work needs room that
batch work holds. Batch sequences are capped per block, and while online work runs they prefill
only in steps that prefill anyway (or after an interval), so online decode steps stay graph-fast."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from typing import Any

import torch

from .. import config as _config
from ..types import BATCH_PRIORITY, Request
from .plan import Item

log = logging.getLogger(__name__)
_order = attrgetter("order")


@dataclass(eq=False)
class Sequence:
    """A request inside the engine: its tokens so far and where its KV lives."""

    req: Request
    model: Any  # engine.LoadedModel
    tokens: list[int]
    n_prompt: int
    generator: torch.Generator | None
    arrival: int
    computed: int = 0  # tokens whose KV is in the cache
    slot: int = 0  # its block-table row (0: none, not admitted)
    epoch: int = 0  # bumped when it leaves (finish, preemption): in-flight rows of an older epoch are void
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    reason: str | None = None
    text: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt :]

    @cached_property
    def order(self) -> tuple[int, int]:
        """Sort key: higher priority first, then first come (the request and its arrival never change)."""
        return (-self.req.priority, self.arrival)

    @cached_property
    def is_batch(self) -> bool:
        return self.req.priority <= BATCH_PRIORITY

    def item(self, n: int) -> Item:
        """Its share of a step: its next n tokens (a decode, or a prompt chunk), from the host."""
        end = self.computed + n
        return Item(self.tokens[self.computed : end], self.computed, self.slot, end == len(self.tokens))


def decodes(seq: Sequence, n: int) -> bool:
    """One token that samples the next: a decode (a 1-token chunk inside a prompt is a prefill)."""
    return n == 1 and seq.computed + 1 == len(seq.tokens)


def by_lane(work: list[tuple[Sequence, int]]) -> dict[tuple, list[tuple[Any, list[tuple[Sequence, int]]]]]:
    """A step's work per lane, as classes in key order, each with its members in arrival order."""
    lanes: dict[tuple, dict[tuple, tuple[Any, list]]] = {}
    for seq, n in sorted(work, key=lambda w: w[0].arrival):
        cls = seq.model.cls
        lanes.setdefault(cls.lane, {}).setdefault(cls.key, (cls, []))[1].append((seq, n))
    return {lane: [classes[k] for k in sorted(classes)] for lane, classes in lanes.items()}


class Scheduler:
    """Waiting and running sequences; `schedule()` picks each step's work: (sequence, tokens)."""

    def __init__(
        self,
        prefill_chunk: int,
        limit_of: Callable[[str], int],
        batch_share: float | None = None,
        batch_prefill: int | None = None,
        batch_interval: float | None = None,
    ) -> None:
        self.prefill_chunk = prefill_chunk
        self.limit_of = limit_of
        # Batch sequences may hold at most this share of a block's batch limit: the rest stays
        # free for online arrivals, and a smaller batch keeps decode steps short.
        share = _config.get("batch.max-running-share", 0.25) if batch_share is None else batch_share
        if not 0 < float(share) <= 1:
            raise ValueError(f"batch.max-running-share must be in (0, 1], not {share!r}")
        self.batch_share = float(share)
        # A step that prefills runs eagerly (no CUDA graph) and takes several decode steps' time;
        # while online work runs, batch prefill joins steps that prefill online work anyway, or
        # runs once `batch_interval` seconds passed without one, at most `batch_prefill` tokens.
        self.batch_prefill = int(_config.get("batch.prefill-tokens", 512) if batch_prefill is None else batch_prefill)
        self.batch_interval = float(_config.get("batch.prefill-interval", 0.5) if batch_interval is None else batch_interval)
        self._batch_prefilled = time.monotonic()  # when batch work last prefilled
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.block_running: Counter[str] = Counter()  # running requests per block fingerprint
        self.batch_running: Counter[str] = Counter()  # of which batch sequences
        self.preemptions = 0
        self.batch_preemptions = 0  # batch sequences preempted to make room for online ones

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def all(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    # ------------------------------------------------------------------ leaving
    def _release(self, seq: Sequence) -> None:
        seq.epoch += 1  # a step still in flight for it no longer counts
        if seq.slot:
            seq.model.lane.pool.release(seq.slot)
            seq.slot = 0
            self.block_running.subtract(seq.model.block_fps)
            if seq.is_batch:
                self.batch_running.subtract(seq.model.block_fps)
        seq.computed = 0

    def finish(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves; its KV pages are freed at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def preempt(self, seq: Sequence, why: str = "KV pool full") -> None:
        """Back to waiting, KV dropped: it is recomputed (prompt + tokens so far) when readmitted."""
        self.running.remove(seq)
        self._release(seq)
        self.waiting.append(seq)
        self.preemptions += 1
        log.info("preempted %s (%s); it will be recomputed", seq.req.request_id, why)

    def _batch_cap(self, fp: str) -> int:
        return max(1, int(self.batch_share * self.limit_of(fp)))

    def _blocked(self, seq: Sequence) -> tuple[list[str], bool]:
        """Why `seq` cannot be admitted now: the blocks at their limit, and whether pages are short."""
        full = [fp for fp in seq.model.block_fps if self.block_running[fp] >= self.limit_of(fp)]
        if seq.is_batch:
            full += [fp for fp in seq.model.block_fps if self.batch_running[fp] >= self._batch_cap(fp)]
        pool = seq.model.lane.pool
        return full, pool.pages_for(len(seq.tokens)) > pool.free_pages

    def held_back(self, seqs: Collection[Sequence]) -> bool:
        """Whether any of these waiting sequences is held back by a block at its (batch) limit."""
        return any(self._blocked(seq)[0] for seq in seqs)

    def _victims(self, seq: Sequence, full: list[str], short: bool) -> list[Sequence]:
        """Running batch sequences whose preemption frees what `seq` lacks: a slot in its full
        blocks, pages in its pool."""
        pool = seq.model.lane.pool
        return [
            s
            for s in self.running
            if s.is_batch
            and s.slot
            and (not full or set(full) & set(s.model.block_fps))
            and (not short or s.model.lane.pool is pool)
        ]

    def _make_room(self) -> None:
        """Waiting online sequences preempt running batch ones (latest first) that hold what they lack.

        Runs every step, with hundreds waiting at saturation: nothing is judged while no batch
        sequence runs, and a model whose request found no victim is not asked again (for the same
        page shortage) until a preemption changes the counts."""
        if not any(s.is_batch and s.slot for s in self.running):
            return
        hopeless: set[tuple[int, bool]] = set()
        for seq in sorted(self.waiting, key=_order):
            if seq.is_batch:
                break  # sorted: only batch sequences follow
            while True:
                full, short = self._blocked(seq)
                if not full and not short:
                    break
                if (id(seq.model), short) in hopeless:
                    break
                victims = self._victims(seq, full, short)
                if not victims:
                    hopeless.add((id(seq.model), short))
                    break
                self.preempt(max(victims, key=_order), "an online request needs its room")
                self.batch_preemptions += 1
                hopeless.clear()

    def _batch_gate(self, online: bool, online_prefill: bool) -> bool:
        """May batch sequences prefill in this step?"""
        return not online or online_prefill or time.monotonic() - self._batch_prefilled >= self.batch_interval

    def has_admissible(self) -> bool:
        """Whether the next schedule() would start new prefill work (pipelined decode breaks then).

        A waiting online request counts only if it fits now or could preempt running batch work:
        one held back by a full batch or short pages leaves the running pipeline alone, so a
        saturated engine keeps decoding one step ahead of the host until a finish makes room."""
        if self._online_admissible():
            return True
        if not self._batch_gate(any(not s.is_batch for s in self.running), False):
            return False
        if any(s.slot and len(s.tokens) - s.computed > 1 for s in self.running):
            return True  # a batch prefill held back by the gate
        for seq in self.waiting:
            if not seq.is_batch:
                continue  # judged above
            full, short = self._blocked(seq)
            if not full and not short:
                return True
        return False

    def _online_admissible(self) -> bool:
        """Whether a waiting online request could be admitted now, batch work preempted if need be
        (what `_make_room` and `schedule` would do), judged once per model."""
        seen: set[int] = set()
        for seq in sorted(self.waiting, key=_order):
            if seq.is_batch or id(seq.model) in seen:
                continue
            seen.add(id(seq.model))
            full, short = self._blocked(seq)
            if (not full and not short) or self._victims(seq, full, short):
                return True
            if short:
                return False  # admission waits for pages in priority order: nobody behind it goes first
        return False

    # ------------------------------------------------------------------ the step's work
    def schedule(self, frozen: Collection[Sequence] = ()) -> list[tuple[Sequence, int]]:
        """Decodes of running requests, then prefill chunks within the token budget, then admissions.

        `frozen`: running sequences whose last step is still in flight (pipelined steps; the engine
        has ensured their pages): each that is not preempted decodes one token, which the engine
        takes from the device."""
        self._make_room()
        budget = self.prefill_chunk
        online = [s for s in (*self.running, *self.waiting) if not s.is_batch]
        online_prefill = any(s.slot == 0 or (len(s.tokens) - s.computed > 1 and s not in frozen) for s in online)
        gate = self._batch_gate(bool(online), online_prefill)
        batch_budget = (min(self.batch_prefill, budget) if online else budget) if gate else 0
        work: dict[Sequence, int] = {}
        for seq in sorted(self.running, key=_order):
            if seq.slot == 0:  # preempted a moment ago
                continue
            if seq in frozen:
                work[seq] = 1
                continue
            remaining = len(seq.tokens) - seq.computed
            n = 1 if remaining == 1 else min(remaining, budget, batch_budget if seq.is_batch else budget)
            if n <= 0:
                continue
            pool = seq.model.lane.pool
            while not pool.ensure(seq.slot, seq.computed + n):
                victim = max(self.running, key=_order)  # lowest priority, latest
                work.pop(victim, None)
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                work[seq] = n
                if remaining > 1:
                    budget -= n
                    if seq.is_batch:
                        batch_budget -= n
        at_limit: set[tuple[int, bool]] = set()  # (model, batch?) found at a block limit: admissions only fill blocks further
        for seq in sorted(self.waiting, key=_order):
            if budget <= 0 or (seq.is_batch and batch_budget <= 0):
                break
            if (id(seq.model), seq.is_batch) in at_limit:
                continue
            full, short = self._blocked(seq)
            if full:
                at_limit.add((id(seq.model), seq.is_batch))
                continue  # a block it needs is at its (batch) limit: it waits, others may go
            if short:
                break  # admission waits for pages, in priority order
            pool = seq.model.lane.pool
            seq.slot = pool.acquire_slot()
            pool.ensure(seq.slot, len(seq.tokens))
            self.waiting.remove(seq)
            self.running.append(seq)
            self.block_running.update(seq.model.block_fps)
            if seq.is_batch:
                self.batch_running.update(seq.model.block_fps)
            n = min(len(seq.tokens), budget, batch_budget if seq.is_batch else budget)
            budget -= n
            if seq.is_batch:
                batch_budget -= n
            work[seq] = n
        if any(seq.is_batch and n > 1 for seq, n in work.items()):
            self._batch_prefilled = time.monotonic()
        return list(work.items())
