"""Sketches of functional fingerprints (random-projection LSH) and the candidate index built on them.

A block's functional fingerprint is what it contributes on the probe inputs of its position (a
decoder run: output minus input; the embedding: its vectors; the head: centred log-probabilities),
each token's vector normalised. Its sketch is SimHash: the signs of `bits` seeded random projections,
so the Hamming distance of two sketches estimates the angle between their fingerprints. The index
splits sketches into bands; blocks sharing a band are candidates (sub-quadratic lookup), topped up
with the Hamming-nearest when the bands find fewer than `k`; each block keeps its `k` nearest.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

MAX_DIM = 16384  # fingerprint coordinates kept (seeded subsample) before projection


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def functional_fingerprint(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(tokens, dim) per-token unit vectors of what the block contributes (input `x`, output `y`)."""
    if kind == "layers":
        v = (y - x).float()
    elif kind == "head":
        v = torch.log_softmax(y.float(), dim=-1)
        v = v - v.mean(dim=-1, keepdim=True)
    else:
        v = y.float()
    v = v.flatten(0, -2)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def simhash(fingerprint: torch.Tensor, *, bits: int, seed_text: str) -> int:
    """Sign bits of `bits` seeded Gaussian projections of the flattened fingerprint, as an int."""
    v = fingerprint.flatten().float()
    keep, planes = _projection(_seed(seed_text), v.numel(), bits)
    proj = planes @ (v if keep is None else v[keep])
    out = 0
    for i, positive in enumerate((proj > 0).tolist()):
        out |= int(positive) << i
    return out


@functools.lru_cache(maxsize=16)
def _projection(seed: int, dim: int, bits: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Seeded coordinate subsample and hyperplanes; cached, as every block of a group shares them."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(dim, generator=gen)[:MAX_DIM] if dim > MAX_DIM else None
    return keep, torch.randn(bits, min(dim, MAX_DIM), generator=gen)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass
class SketchIndex:
    """Band buckets over the sketches of one comparability group."""

    bits: int
    bands: int

    def __post_init__(self) -> None:
        if self.bits % self.bands:
            raise ValueError(f"sketch bits {self.bits} must split evenly into {self.bands} bands")
        self.rows = self.bits // self.bands
        self._buckets: dict[tuple[int, int], set[str]] = {}
        self._sketch: dict[str, int] = {}

    def _keys(self, sketch: int) -> Iterable[tuple[int, int]]:
        mask = (1 << self.rows) - 1
        for band in range(self.bands):
            yield band, (sketch >> (band * self.rows)) & mask

    def add(self, fp: str, sketch: int) -> None:
        self._sketch[fp] = sketch
        for key in self._keys(sketch):
            self._buckets.setdefault(key, set()).add(fp)

    def __len__(self) -> int:
        return len(self._sketch)

    def candidates(self, fp: str, k: int) -> list[str]:
        """The (at most) `k` blocks nearest to `fp` among those sharing a band, topped up by Hamming."""
        s = self._sketch[fp]
        found: set[str] = set()
        for key in self._keys(s):
            found |= self._buckets.get(key, set())
        found.discard(fp)
        if len(found) < k:  # few band hits: the nearest of the rest (bit operations only)
            rest = sorted(
                (hamming(s, t), o) for o, t in self._sketch.items() if o != fp and o not in found
            )
            found |= {o for _, o in rest[: k - len(found)]}
        return [o for _, o in sorted((hamming(s, self._sketch[o]), o) for o in found)[:k]]


__all__ = ["SketchIndex", "functional_fingerprint", "hamming", "simhash"]
