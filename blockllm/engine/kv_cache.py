"""The paged KV cache: one page pool per device and KV geometry, and a block table per request.

A page holds `page_size` tokens of K and V for one (request, layer). Every request that runs owns a
slot: row `slot` of the block table (slots, layers, pages) lists its pages for each layer of its
chain, so the KV of layer l lives with the block instance that runs layer l for it. Page 0 and
slot 0 are scratch: padded rows of a captured batch read and write there and nowhere else.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .staging import Staging

log = logging.getLogger(__name__)


class KVPool:
    """Pages of K and V, (pages, page_size, Hkv, D) each, with a free list and the block table."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        n_layers: int,
        n_kv: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        slots: int = 64,
    ) -> None:
        if num_pages < 2:
            raise ValueError(f"a KV pool needs at least 2 pages (one is scratch), not {num_pages}")
        self.page_size, self.n_layers, self.n_kv, self.head_dim = (
            page_size,
            n_layers,
            n_kv,
            head_dim,
        )
        self.max_pages = -(-max_len // page_size)  # pages per (request, layer) at most
        self.device, self.dtype = device, dtype
        self.num_pages = num_pages
        self.k = torch.zeros(num_pages, page_size, n_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._free_pages = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self._host_table = np.zeros((slots + 1, n_layers, self.max_pages), dtype=np.int32)
        self.block_table = torch.zeros(self._host_table.shape, dtype=torch.int32, device=device)
        self._free_slots = list(range(slots, 0, -1))
        self._pages_of: dict[int, int] = {}  # slot -> pages per layer it holds
        self._dirty: set[int] = set()
        self._staging = Staging(device)
        self.generation = (
            0  # bumped when block_table is reallocated (captured graphs then go stale)
        )

    # ------------------------------------------------------------------ accounting
    @property
    def page_bytes(self) -> int:
        return 2 * self.page_size * self.n_kv * self.head_dim * self.k.element_size()

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def used_pages(self) -> int:
        return self.num_pages - 1 - len(self._free_pages)

    def pages_for(self, tokens: int) -> int:
        """Pages (over all layers) a request with `tokens` cached tokens holds."""
        return self.n_layers * -(-tokens // self.page_size)

    # ------------------------------------------------------------------ slots and pages
    def acquire_slot(self) -> int:
        if not self._free_slots:
            self._grow_slots()
        slot = self._free_slots.pop()
        self._pages_of[slot] = 0
        return slot

    def _grow_slots(self) -> None:
        old = self._host_table.shape[0] - 1
        new = old * 2
        table = np.zeros((new + 1, self.n_layers, self.max_pages), dtype=np.int32)
        table[: old + 1] = self._host_table
        self._host_table = table
        self.block_table = torch.from_numpy(table).to(self.device)
        self._free_slots = list(range(new, old, -1))
        self.generation += 1
        log.info("KV block table grown to %d slots", new)

    def need(self, slot: int, tokens: int) -> int:
        """Pages to allocate so that `slot` can hold `tokens` tokens."""
        have = self._pages_of[slot]
        want = -(-tokens // self.page_size)
        return max(0, want - have) * self.n_layers

    def ensure(self, slot: int, tokens: int) -> bool:
        """Allocate pages so `slot` holds `tokens` tokens; False (and nothing taken) if too few free."""
        have = self._pages_of[slot]
        want = -(-tokens // self.page_size)
        if want <= have:
            return True
        if want > self.max_pages:
            raise ValueError(
                f"{tokens} tokens exceed the pool's max length of {self.max_pages * self.page_size}"
            )
        n = (want - have) * self.n_layers
        if n > len(self._free_pages):
            return False
        pages = [self._free_pages.pop() for _ in range(n)]
        self._host_table[slot, :, have:want] = (
            np.asarray(pages, dtype=np.int32).reshape(want - have, self.n_layers).T
        )
        self._pages_of[slot] = want
        self._dirty.add(slot)
        return True

    def release(self, slot: int) -> None:
        """Free a slot and all its pages (finished, aborted or preempted request)."""
        have = self._pages_of.pop(slot, None)
        if have is None:
            return
        self._free_pages.extend(self._host_table[slot, :, :have].reshape(-1).tolist())
        self._host_table[slot] = 0
        self._dirty.add(slot)
        self._free_slots.append(slot)

    def ensure_layers(self, n_layers: int) -> None:
        """Widen the block table for a deeper model (a lane's pool serves its deepest chain)."""
        if n_layers <= self.n_layers:
            return
        table = np.zeros((self._host_table.shape[0], n_layers, self.max_pages), dtype=np.int32)
        if self._pages_of:
            raise RuntimeError(
                "cannot deepen a KV pool while requests hold pages; load models before serving"
            )
        self._host_table, self.n_layers = table, n_layers
        self.block_table = torch.from_numpy(table).to(self.device)
        self.generation += 1

    def sync(self) -> None:
        """Copy changed block-table rows to the device (before a step reads them)."""
        if not self._dirty:
            return
        slots = sorted(self._dirty)
        self._dirty.clear()
        rows = self._staging.upload(self._host_table[slots], torch.int32)  # pinned: asynchronous
        self.block_table.index_copy_(0, self._staging.upload(slots), rows)


def auto_pages(device: torch.device, page_bytes: int, wanted: int, fraction: float = 0.5) -> int:
    """Pages for `kv-pages: auto`: CPU 4096; CUDA up to `fraction` of free memory, at most `wanted`."""
    if device.type != "cuda":
        return 4096
    free, _total = torch.cuda.mem_get_info(device)
    return max(2, min(wanted, int(free * fraction) // page_bytes))
