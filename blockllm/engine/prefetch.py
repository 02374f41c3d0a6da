"""Weights streamed into L2 one GEMM ahead, from a side stream of a captured decode graph.

At decode batch sizes each GEMM reads its weight once, and between the GEMMs sit kernels that read
little (rope, attention, SwiGLU) and launch gaps, while device memory idles. Forked at each GEMM,
a side-stream kernel asks L2 for the next GEMM's weight, so memory streams on through those gaps
and the next GEMM finds its weight in L2. It changes no value: outputs are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from .weights import HeadBlock, LayerBlock

MODES = ("off", "prefetch", "evict_last")


def check_mode(mode: object) -> str:
    """engine.l2-prefetch as given -> one of MODES (YAML reads a bare `off` as false), else ValueError."""
    mode = "off" if mode is False else mode
    if mode not in MODES:
        raise ValueError(f"engine.l2-prefetch must be one of {MODES}, not {mode!r}")
    return mode


def gemm_weights(blocks: Iterable[object]) -> list[torch.Tensor]:
    """The weights of a run of blocks in the order the forward's GEMMs read them."""
    seq: list[torch.Tensor] = []
    for b in blocks:
        if isinstance(b, LayerBlock):
            for w in b.layers:
                seq += [w.w_qkv, w.w_o, w.w_gate_up, w.w_down]
        elif isinstance(b, HeadBlock):
            seq.append(b.weight)
    return seq


class L2Prefetcher:
    """One lane's side stream. A forward runs inside `sequence(its GEMM weights)` and calls `step`
    before each GEMM; the side stream is joined back at the end (a capture must end on its own stream).

    Off (the default), on a CPU lane, or outside a capture (eager steps, warm-ups) it does nothing:
    eager steps are host-bound, and the side stream's event traffic would only add host time there.
    """

    def __init__(
        self,
        device: torch.device = torch.device("cpu"),
        mode: str = "off",
        cap_bytes: int = 32 << 20,
        dtype: torch.dtype = torch.bfloat16,
        programs: int = 0,
    ) -> None:
        self.mode, self.cap_bytes, self.programs = check_mode(mode), int(cap_bytes), int(programs)
        self._stream: torch.cuda.Stream | None = None
        if device.type == "cuda" and self.mode != "off":  # made here: not inside a capture
            from . import triton_ops

            self._stream = torch.cuda.Stream(device)
            # compile and load the kernel now: a first launch inside a capture would load a module there
            triton_ops.l2_prefetch(torch.zeros(4096, dtype=dtype, device=device), 8192, self.mode, self.programs)
        self._seq: list[torch.Tensor] = []
        self._k = 0
        self.active = self._forked = False
        self.issued = 0  # prefetches forked (captured into graphs)
        self.resyncs = 0  # steps whose weight was not the one expected next (a sequence mismatch)

    def _capturing(self) -> bool:
        return self._stream is not None and torch.cuda.is_current_stream_capturing()

    @contextmanager
    def sequence(self, weights: Callable[[], list[torch.Tensor]]) -> Iterator[None]:
        """A forward whose GEMMs read `weights()` in order (called only when the prefetch is on)."""
        self.begin(weights)
        try:
            yield
        finally:
            self.end()

    def begin(self, weights: Callable[[], list[torch.Tensor]]) -> None:
        self._seq, self._k, self._forked = [], 0, False
        self.active = self.mode != "off" and self._capturing()
        if self.active:
            self._seq = weights()
            self.active = bool(self._seq)

    def step(self, w: torch.Tensor) -> None:
        """Called right before the GEMM that reads `w`: fork the prefetch of the weight after it."""
        if not self.active:
            return
        k = self._k
        if k >= len(self._seq) or self._seq[k] is not w:
            k = next((i for i, s in enumerate(self._seq) if s is w), -1)
            self.resyncs += 1
            if k < 0:
                return
        self._k = k + 1
        if k + 1 < len(self._seq):
            self._fork(self._seq[k + 1])
            self.issued += 1
            self._forked = True

    def end(self) -> None:
        if self.active and self._forked:  # joining a stream that captured nothing breaks the capture
            self._join()
        self.active, self._seq = False, []

    def _join(self) -> None:
        torch.cuda.current_stream().wait_stream(self._stream)

    def _fork(self, nxt: torch.Tensor) -> None:
        from . import triton_ops

        self._stream.wait_stream(torch.cuda.current_stream())  # starts once everything before this GEMM has run
        with torch.cuda.stream(self._stream):
            triton_ops.l2_prefetch(nxt, self.cap_bytes, self.mode, self.programs)
