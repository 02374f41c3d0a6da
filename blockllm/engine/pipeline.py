"""Pipelined decode: greedy decode steps on CUDA graphs launched one step ahead of the host.

Step N+1 is launched from step N's tokens while they are still on the device (ids <- greedy
picks, positions += 1); the host then reads step N's tokens and does its bookkeeping while the
GPU computes N+1. The chain breaks (and the engine schedules normally) as soon as a request would
end, a new one waits, or pages run short; a token computed for a request that ended meanwhile is
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..types import RequestOutput
from . import ops
from .forward import Lane, run_plan
from .plan import Item, Plan, bucket, build_plan, fill_inputs
from .scheduler import Sequence, decodes


class _HostEvent:
    """torch.cuda.Event's two methods for CPU runs (nothing is asynchronous there)."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


@dataclass(eq=False)
class _Inflight:
    """A launched decode graph whose tokens are still on their way to the host (pipelining)."""

    lane: Lane
    plan: Plan
    entry: Any  # graphs.Captured
    rows: list[tuple[Sequence, int]]  # each request and its row
    advance: torch.Tensor  # (n_rows,) 1 on real rows, 0 on padding: positions of the next step
    host: torch.Tensor  # pinned (n_rows,) the greedy tokens land in
    event: torch.cuda.Event | _HostEvent
    generation: int


class PipelinedDecode:
    """Engine methods for the pipelined decode path (the Engine owns the state they use)."""

    def _pipelined(self, work: list[tuple[Sequence, int]]) -> bool:
        """Greedy decode steps on CUDA graphs run one step ahead of the host's bookkeeping."""
        if not self.cuda_graphs or not all(decodes(seq, n) for seq, n in work):
            return False
        seq = work[0][0]
        if not ops._pow2(seq.model.lane.pool.head_dim):
            return False
        return all(s.req.sampling.greedy and not s.req.sampling.logprobs for s, _ in work)

    def _launch(self, lane: Lane, groups: list) -> _Inflight:
        """Replay (or capture) the decode graph of this composition; tokens copy back asynchronously."""
        lane.pool.sync()
        item_groups = [
            (cls, [Item(seq.tokens[-1:], seq.computed, seq.slot, True) for seq, _ in members])
            for cls, members in groups
        ]
        plan, entry = self._graph_step(lane, groups, item_groups)
        advance = np.zeros(plan.n_rows, dtype=np.int64)
        advance[plan.item_rows] = 1
        seqs = [seq for _, members in groups for seq, _ in members]
        return self._replay(lane, plan, entry, list(zip(seqs, plan.item_rows, strict=True)),
                            _pinned(torch.from_numpy(advance)).to(self.device, non_blocking=True), run=False)  # fmt: skip

    def _graph_step(self, lane: Lane, groups: list, item_groups: list) -> tuple[Any, Any]:
        """Run one decode step on CUDA graphs -> (its plan, its graph entry, whose `outputs` hold the
        logits and greedy tokens): segment graphs (`engine.decode-graphs: segments`), or one graph
        of the whole step, replayed (and captured first when this composition is new)."""
        if self.decode_graphs == "segments":
            step = self._segment_step(lane, item_groups)
            step.run()  # replays, or captures and thereby computes, each segment
            return step, step
        sig, plan = self._decode_plan(lane, groups, item_groups)
        entry = self.graphs.get(sig) or self.graphs.capture(sig, plan, lambda: run_plan(plan, lane))
        entry.graph.replay()
        entry.replays += 1
        return plan, entry

    def _replay(
        self, lane: Lane, plan: Plan, entry: Any, rows: list, advance: torch.Tensor, run: bool = True
    ) -> _Inflight:
        if run:
            entry.graph.replay()
            entry.replays += 1
        host = _pinned(torch.empty(plan.n_rows, dtype=torch.int64))
        host.copy_(entry.outputs[1], non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else _HostEvent()
        event.record()
        return _Inflight(lane, plan, entry, rows, advance, host, event, lane.pool.generation)

    @staticmethod
    def _live_rows(prev: _Inflight) -> list[tuple[Sequence, int]]:
        """The rows of `prev` whose requests are still going (the rest ended while it ran)."""
        return [(seq, row) for seq, row in prev.rows if not seq.finished and seq.slot]

    def _chainable(self, prev: _Inflight) -> bool:
        """The next step is the same batch one token on: nobody waits or lacks a page, and someone
        is left. Rows of requests that ended meanwhile stay in the batch as padding: they are
        pointed at the scratch KV slot (their own pages may already belong to someone else)."""
        if self.scheduler.has_admissible():  # batch work held back by its caps does not count
            return False
        live = self._live_rows(prev)
        if not live or any(len(seq.tokens) + 1 >= seq.model.context for seq, _ in live):
            return False
        pool = prev.lane.pool
        if any(not pool.ensure(seq.slot, seq.computed + 2) for seq, _ in live):
            return False
        return pool.generation == prev.generation

    def _chain(self, prev: _Inflight) -> _Inflight:
        """Launch step N+1 from step N's tokens on the device, before the host has seen them."""
        plan = prev.plan
        plan.inputs[0].copy_(prev.entry.outputs[1])  # each row's next token is its own greedy pick
        live = self._live_rows(prev)
        advance = prev.advance
        if len(live) < len(prev.rows):  # ended rows: position 0 in the scratch slot from now on, no advancing
            alive = {row for _, row in live}
            dead = [row for _, row in prev.rows if row not in alive]
            rows = _pinned(torch.tensor(dead, dtype=torch.int64)).to(self.device, non_blocking=True)
            plan.inputs[1:3].index_fill_(1, rows, 0)
            advance = advance.index_fill(0, rows, 0)
        plan.inputs[1].add_(advance)
        plan.max_ctx += 1  # (only the torch reference attention reads it)
        prev.lane.pool.sync()
        self._count([(seq, 1) for seq, _ in live])
        self.steps += 1
        return self._replay(prev.lane, plan, prev.entry, live, advance)

    def _collect(self, prev: _Inflight) -> list[RequestOutput]:
        prev.event.synchronize()
        toks = prev.host.tolist()
        outputs = []
        for seq, row in prev.rows:
            if seq.finished:  # ended (or was aborted) while this step was in flight: discard
                continue
            seq.computed += 1
            self._append(seq, toks[row], None)
            outputs.append(self._output(seq))
        return outputs

    def _decode_plan(self, lane: Lane, groups: list, item_groups: list) -> tuple[tuple, Plan]:
        """The cached padded plan of this decode composition, its inputs filled and on the device."""
        sig = (
            lane.key,
            lane.pool.generation,
            tuple((cls.key, bucket(len(m))) for cls, m in groups),
        )
        cached = self._plans.get(sig)
        if cached is None:
            plan = build_plan(item_groups, padded=True, device=self.device)
            host = np.zeros((3, plan.n_rows), dtype=np.int64)
            staging = _pinned(torch.from_numpy(host.copy()))
            cached = self._plans[sig] = (plan, host, staging)
        plan, host, staging = cached
        fill_inputs(plan, item_groups, host)
        staging.copy_(torch.from_numpy(host))
        plan.inputs.copy_(staging, non_blocking=True)
        return sig, plan
