"""Continuous batching: who runs in the next step, admission by KV pages and per-block batch limits,
preemption by recompute when decode growth runs the page pool dry."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..types import Request

log = logging.getLogger(__name__)


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
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    reason: str | None = None
    text: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt :]

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: higher priority first, then first come."""
        return (-self.req.priority, self.arrival)


class Scheduler:
    """Waiting and running sequences; `schedule()` picks each step's work: (sequence, tokens)."""

    def __init__(self, prefill_chunk: int, limit_of: Callable[[str], int]) -> None:
        self.prefill_chunk = prefill_chunk
        self.limit_of = limit_of
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.block_running: Counter[str] = Counter()  # running requests per block fingerprint
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def all(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    # ------------------------------------------------------------------ leaving
    def _release(self, seq: Sequence) -> None:
        if seq.slot:
            seq.model.lane.pool.release(seq.slot)
            seq.slot = 0
            self.block_running.subtract(seq.model.block_fps)
        seq.computed = 0

    def finish(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves; its KV pages are freed at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def preempt(self, seq: Sequence) -> None:
        """Back to waiting, KV dropped: it is recomputed (prompt + tokens so far) when readmitted."""
        self.running.remove(seq)
        self._release(seq)
        self.waiting.append(seq)
        self.preemptions += 1
        log.info("preempted %s (KV pool full); it will be recomputed", seq.req.request_id)

    # ------------------------------------------------------------------ the step's work
    def schedule(self) -> list[tuple[Sequence, int]]:
        """Decodes of running requests, then prefill chunks within the token budget, then admissions."""
        budget = self.prefill_chunk
        work: dict[Sequence, int] = {}
        for seq in sorted(self.running, key=lambda s: s.order):
            if seq.slot == 0:  # preempted a moment ago
                continue
            remaining = len(seq.tokens) - seq.computed
            n = 1 if remaining == 1 else min(remaining, budget)
            if n <= 0:
                continue
            pool = seq.model.lane.pool
            while not pool.ensure(seq.slot, seq.computed + n):
                victim = max(self.running, key=lambda s: s.order)  # lowest priority, latest
                work.pop(victim, None)
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                work[seq] = n
                if remaining > 1:
                    budget -= n
        for seq in sorted(self.waiting, key=lambda s: s.order):
            if budget <= 0:
                break
            if any(self.block_running[fp] >= self.limit_of(fp) for fp in seq.model.block_fps):
                continue  # a block it needs is at its batch limit: it waits, others may go
            pool = seq.model.lane.pool
            if pool.pages_for(len(seq.tokens)) > pool.free_pages:
                break  # admission waits for pages, in priority order
            seq.slot = pool.acquire_slot()
            pool.ensure(seq.slot, len(seq.tokens))
            self.waiting.remove(seq)
            self.running.append(seq)
            self.block_running.update(seq.model.block_fps)
            n = min(len(seq.tokens), budget)
            budget -= n
            work[seq] = n
        return list(work.items())
