"""Blocks held in memory (tensors already on any device): a zoo stand-in for benchmarks and tests.

The engine reads blocks through four methods: `get_manifest`, `block_spec`, `get_block` and (for
tokenizers) `get_asset`. A `Zoo` has them; so does `TensorSource`, which serves tensors as given,
with no hashing or copying, e.g. random 8B weights built directly on the GPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from zoo_store import (
    Block,
    BlockNotFoundError,
    BlockSpec,
    Manifest,
    ModelNotFoundError,
    tensor_specs,
)


class TensorSource:
    def __init__(self) -> None:
        self._blocks: dict[str, Block] = {}
        self._models: dict[tuple[str, str], Manifest] = {}

    def put_block(
        self, spec: BlockSpec, tensors: Mapping[str, torch.Tensor], fp: str | None = None
    ) -> str:
        """Register a block; without `fp` a cheap stand-in fingerprint (spec + tensor identities)."""
        if fp is None:
            h = hashlib.sha256(repr(spec.to_dict()).encode())
            for name in sorted(tensors):
                h.update(f"{name}:{id(tensors[name])}".encode())
            fp = h.hexdigest()
        self._blocks[fp] = Block(fp, spec, dict(tensors))
        return fp

    def put_manifest(self, manifest: Manifest) -> None:
        self._models[(manifest.tenant, manifest.name)] = manifest

    def has_model(self, tenant: str, name: str) -> bool:
        return (tenant, name) in self._models

    def get_manifest(self, tenant: str, name: str) -> Manifest:
        try:
            return self._models[(tenant, name)]
        except KeyError:
            raise ModelNotFoundError(tenant, name) from None

    def block_spec(self, fp: str) -> BlockSpec:
        return self._block(fp).spec

    def get_block(
        self, fp: str, *, device: str | torch.device = "cpu", verify: bool | None = None
    ) -> Block:
        return self._block(fp)  # the engine moves tensors to its own device

    def get_asset(self, fp: str) -> dict[str, bytes]:
        raise BlockNotFoundError(fp)

    def _block(self, fp: str) -> Block:
        try:
            return self._blocks[fp]
        except KeyError:
            raise BlockNotFoundError(fp) from None


def make_spec(
    kind: str, arch: dict, start: int, end: int, tensors: Mapping[str, torch.Tensor], **extra
) -> BlockSpec:
    """A BlockSpec for tensors named as the Llama family names them (see families/llama.py)."""
    return BlockSpec(kind, "llama", dict(arch), start, end, tensor_specs(tensors), dict(extra))
