"""Pipelined steps: greedy steps on CUDA graphs launched one step ahead of the host.

Step N+1 is launched while step N's tokens are still on the device; the host then reads step N's
tokens and does its bookkeeping while the GPU computes N+1. With the same batch one token on, N+1
replays N's graphs from N's greedy picks (a chain). When the batch changes (an arrival is
admitted, a prompt's last chunk has sampled its first token), N+1 is laid out anew and the
requests that go on take their tokens from N's picks on the device (`engine.overlap-scheduling`).
The pipeline breaks (and the engine schedules after reading N) only when a request is not
greedy, reaches its context's end, or pages run short; a token computed for a request that ended
meanwhile is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..types import RequestOutput
from . import ops
from .forward import Lane, run_plan
from .plan import Item, Plan, bucket, build_plan, fill_inputs
from .scheduler import Sequence, by_lane, decodes


class _HostEvent:
    """torch.cuda.Event's two methods for CPU runs (nothing is asynchronous there)."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


def _greedy(seq: Sequence) -> bool:
    """Its next token is the argmax, read on the device (no host sampling, no logprobs)."""
    return seq.req.sampling.greedy and not seq.req.sampling.logprobs


@dataclass(eq=False)
class _Inflight:
    """A launched step whose tokens are still on their way to the host (pipelining)."""

    lane: Lane
    plan: Plan
    entry: Any  # graphs.Captured
    rows: list[tuple[Sequence, int, int, int]]  # each sampling request: its sampling row, its tokens in the step, its epoch
    advance: torch.Tensor | None  # (n_rows,) 1 on real rows, 0 on padding; None: a layout with prompt chunks
    host: torch.Tensor  # pinned (n_rows,) the greedy tokens land in
    event: torch.cuda.Event | _HostEvent
    generation: int


class PipelinedDecode:
    """Engine methods for the pipelined path (the Engine owns the state they use)."""

    def _pipelined(self, groups: list) -> bool:
        """Greedy steps on CUDA graphs run one step ahead of the host's bookkeeping: decode steps,
        and steps with prompt chunks where those ride the segment graphs too."""
        work = [w for _, members in groups for w in members]
        if not self.cuda_graphs or not ops._pow2(work[0][0].model.lane.pool.head_dim):
            return False
        if not all(_greedy(s) for s, _ in work):
            return False
        if all(decodes(seq, n) for seq, n in work):
            return True
        return self.overlap and self._prefill_on_graphs(groups)

    def _launch(self, lane: Lane, groups: list) -> _Inflight:
        """Replay (or capture) the graphs of this step; its tokens copy back asynchronously."""
        lane.pool.sync()
        item_groups = [(cls, [seq.item(n) for seq, n in members]) for cls, members in groups]
        plan, entry = self._graph_step(lane, groups, item_groups)
        return self._launched(lane, plan, entry, groups)

    def _launched(self, lane: Lane, plan: Any, entry: Any, groups: list) -> _Inflight:
        """The in-flight record of a step just launched. A prompt chunk that samples nothing counts
        as computed at once (its KV is on its way; the next chunk may follow in the next step)."""
        rows, k, chainable = [], 0, True
        for _cls, members in groups:
            for seq, n in members:
                r = plan.item_sample[k]
                k += 1
                if r >= 0:
                    rows.append((seq, r, n, seq.epoch))
                else:
                    seq.computed += n
                chainable = chainable and n == 1 and r >= 0
        advance = None
        if chainable:
            a = np.zeros(plan.n_rows, dtype=np.int64)
            a[[r for _, r, _, _ in rows]] = 1
            advance = self.staging.upload(a)
        return self._replay(lane, plan, entry, rows, advance, run=False)

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
        self, lane: Lane, plan: Plan, entry: Any, rows: list, advance: torch.Tensor | None, run: bool = True
    ) -> _Inflight:
        if run:
            entry.graph.replay()
            entry.replays += 1
        host = self.staging.borrow(plan.n_rows)
        host.copy_(entry.outputs[1], non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else _HostEvent()
        event.record()
        return _Inflight(lane, plan, entry, rows, advance, host, event, lane.pool.generation)

    @staticmethod
    def _live_rows(prev: _Inflight) -> list[tuple[Sequence, int, int, int]]:
        """The rows of `prev` whose requests are still going (the rest ended or were preempted while it ran)."""
        return [r for r in prev.rows if r[0].epoch == r[3] and not r[0].finished]

    def _goes_on(self, prev: _Inflight) -> list[tuple[Sequence, int, int, int]] | None:
        """`prev`'s live rows if each can take one more token after it (context left, pages
        ensured, the block table not reallocated), else None."""
        live = self._live_rows(prev)
        if any(len(seq.tokens) + 1 >= seq.model.context for seq, _, _, _ in live):
            return None
        pool = prev.lane.pool
        if any(not pool.ensure(seq.slot, seq.computed + n + 1) for seq, _, n, _ in live):
            return None
        return live if pool.generation == prev.generation else None

    def _chainable(self, prev: _Inflight) -> bool:
        """The next step is the same batch one token on: nobody waits or lacks a page, and someone
        is left. Rows of requests that ended meanwhile stay in the batch as padding: they are
        pointed at the scratch KV slot (their own pages may already belong to someone else)."""
        if prev.advance is None or self.scheduler.has_admissible():  # batch work held back by its caps does not count
            return False
        return bool(self._goes_on(prev))

    def _chain(self, prev: _Inflight) -> _Inflight:
        """Launch step N+1 from step N's tokens on the device, before the host has seen them."""
        plan = prev.plan
        plan.inputs[0].copy_(prev.entry.outputs[1])  # each row's next token is its own greedy pick
        live = self._live_rows(prev)
        advance = prev.advance
        if len(live) < len(prev.rows):  # ended rows: position 0 in the scratch slot from now on, no advancing
            alive = {row for _, row, _, _ in live}
            dead = [row for _, row, _, _ in prev.rows if row not in alive]
            rows = self.staging.upload(dead)
            plan.inputs[1:3].index_fill_(1, rows, 0)
            advance = advance.index_fill(0, rows, 0)
        plan.inputs[1].add_(advance)
        plan.max_ctx += 1  # (only the torch reference attention reads it)
        prev.lane.pool.sync()
        self._count([(seq, 1) for seq, _, _, _ in live])
        self.steps += 1
        return self._replay(prev.lane, plan, prev.entry, live, advance)

    def _relaunch(self, prev: _Inflight) -> _Inflight | None:
        """Step N+1 on a new layout, launched while step N's tokens are still on the device.

        The scheduler plans N+1 as usual (admissions, prompt chunks, preemptions), except that the
        requests sampling in N are frozen: those it runs decode one token, their step-N greedy
        pick, gathered into N+1's inputs on the device (one it preempts loses that token through
        its epoch). None when this cannot be done (a request samples on the host or runs in another
        lane, or one going on lacks context or pages): the engine then reads N first and schedules
        as before."""
        if not (self.overlap and self._prefills_on_graphs() and self.cuda_graphs):
            return None
        lane, sched = prev.lane, self.scheduler
        if any(s.model.lane is not lane or not _greedy(s) for s in (*sched.running, *sched.waiting)):
            return None
        live = self._goes_on(prev)
        if live is None:
            return None
        frozen = {seq: (row, n, epoch) for seq, row, n, epoch in live}
        work = sched.schedule(frozen)
        if not work:
            return None
        (groups,) = by_lane(work).values()  # every request is in prev's lane (checked above)
        self._count(work)
        lane.pool.sync()
        item_groups, moves = [], []  # moves: (item index, row of its token in step N)
        k = 0
        for cls, members in groups:
            items = []
            for seq, n in members:
                if seq in frozen and frozen[seq][2] == seq.epoch:  # its token is step N's pick, after N's tokens
                    row, m, _ = frozen[seq]
                    moves.append((k, row))
                    items.append(Item([0], seq.computed + m, seq.slot, True))
                else:
                    items.append(seq.item(n))
                k += 1
            item_groups.append((cls, items))
        step = self._segment_step(lane, item_groups)
        if moves:
            idx = self.staging.upload([[step.item_rows[k] for k, _ in moves], [r for _, r in moves]])
            step.inputs[0].index_copy_(0, idx[0], prev.entry.outputs[1].index_select(0, idx[1]))
        step.run()
        self.steps += 1
        return self._launched(lane, step, step, groups)

    def _collect(self, prev: _Inflight) -> list[RequestOutput]:
        t0 = time.perf_counter()
        prev.event.synchronize()
        self.wait_s += time.perf_counter() - t0
        toks = prev.host.tolist()
        self.staging.give_back(prev.host)
        outputs = []
        for seq, row, n, epoch in prev.rows:
            if seq.finished or seq.epoch != epoch:  # ended, aborted or preempted while this step was in flight: discard
                continue
            seq.computed += n
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
