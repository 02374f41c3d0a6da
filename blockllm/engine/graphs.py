"""CUDA graphs of whole decode steps: one per (lane, class/bucket signature), the whole chain in it.

A decode step's layout depends only on which request classes it holds and their bucketed sizes,
so that signature keys a captured graph of the entire forward (every block, every layer, the
heads and the greedy argmax). Replaying it costs one launch instead of hundreds. All graphs share
one memory pool: they never run concurrently and keep no state between replays.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .plan import Plan

log = logging.getLogger(__name__)


class EmulatedGraph:
    """A stand-in for a captured graph that re-runs the step into the captured outputs (CPU tests
    of everything around graphs: signatures, static inputs, pipelining)."""

    def __init__(
        self, fn: Callable[[], tuple[torch.Tensor, ...]], outputs: tuple[torch.Tensor, ...]
    ) -> None:
        self.fn, self.outputs = fn, outputs

    def replay(self) -> None:
        for out, new in zip(self.outputs, self.fn(), strict=True):
            out.copy_(new)


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph | EmulatedGraph
    plan: Plan | None  # None: a segment graph (stepgraphs.py)
    outputs: tuple[torch.Tensor, ...]
    replays: int = 0


class GraphCache:
    """Captured decode steps by signature, least recently used evicted past `capacity`."""

    def __init__(self, capacity: int = 48, emulate: bool = False) -> None:
        self.capacity = capacity
        self.emulate = emulate
        self._graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self._pool = None
        self.captures = 0
        self.capture_seconds = 0.0

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        # The private memory pool dies with its last graph; capturing into its handle again trips
        # PyTorch's allocator ("use_count > 0" assert), so the next capture starts a fresh pool.
        self._pool = None

    def last_used(self) -> Captured | None:
        """The most recently captured or replayed graph (benchmarks time its replays alone)."""
        return next(reversed(self._graphs.values()), None)

    def get(self, signature: tuple) -> Captured | None:
        entry = self._graphs.get(signature)
        if entry is not None:
            self._graphs.move_to_end(signature)
        return entry

    def capture(
        self, signature: tuple, plan: Plan | None, fn: Callable[[], tuple[torch.Tensor, ...]]
    ) -> Captured:
        """Warm `fn` up (Triton compiles, cuBLAS picks kernels), then capture it.

        The plan's inputs must already hold this step's values: the warm-up run computes the
        step (its KV writes are the very ones the first replay repeats).
        """
        t0 = time.perf_counter()
        if self.emulate:
            outputs = fn()
            return self._keep(signature, Captured(EmulatedGraph(fn, outputs), plan, outputs), t0)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn()
        return self._keep(signature, Captured(graph, plan, outputs), t0)

    def _keep(self, signature: tuple, entry: Captured, t0: float) -> Captured:
        self._graphs[signature] = entry
        while len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        log.debug("captured decode graph %d (%s) in %.3f s", self.captures, signature[-1], time.perf_counter() - t0)
        return entry
