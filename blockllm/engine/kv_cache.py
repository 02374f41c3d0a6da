"""The paged KV cache: one pool of fixed-size pages per device and KV shape; page lists per request.

A request owns one page list per decoder layer it passes through (its KV for block b lives
with block b's instance on this device). Pages are freed when it finishes or is preempted.
"""

from __future__ import annotations

import math

import torch


class PagePool:
    """K and V pages of `page_size` tokens: (num_pages, page_size, n_kv, head_dim) each."""

    def __init__(self, num_pages: int, page_size: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        self.k = torch.zeros(num_pages * page_size, n_kv, head_dim, dtype=dtype, device=device)  # flat rows
        self.v = torch.zeros_like(self.k)
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def page_bytes(self) -> int:
        return 2 * self.page_size * self.k.shape[1] * self.k.shape[2] * self.k.element_size()

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV pool has {len(self._free)} free pages, {n} asked")
        out = [self._free.pop() for _ in range(n)]
        return out

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def slots(self, pages: list[int], start: int, end: int, device: torch.device) -> torch.Tensor:
        """Flat row indices of token positions [start, end) for a page list."""
        pos = torch.arange(start, end)
        table = torch.tensor(pages, dtype=torch.long)
        return (table[pos // self.page_size] * self.page_size + pos % self.page_size).to(device)


def pool_pages(device: torch.device, page_bytes: int, configured: int | str | None, reserve_fraction: float = 0.5) -> int:
    """How many pages to make: the configured number, or half the free device memory on CUDA."""
    if isinstance(configured, int) and configured > 0:
        return configured
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(16, int(free * reserve_fraction) // page_bytes)
    return 4096
