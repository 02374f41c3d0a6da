"""Content fingerprints: sha256 over a block's canonical spec and its exact tensor bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from .tensors import dtype_name, raw_bytes
from .types import BlockSpec, Fingerprint, TensorSpec, canonical_json


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name, tuple(t.shape), dtype_name(t.dtype)) for name, t in sorted(tensors.items())
    )


def fingerprint(spec: BlockSpec, tensors: Mapping[str, torch.Tensor]) -> Fingerprint:
    """Equal fingerprints mean identical blocks: same spec, same bytes, same tensor names."""
    if sorted(tensors) != [t.name for t in spec.tensors]:
        raise ValueError(
            f"tensors {sorted(tensors)} do not match the spec's {[t.name for t in spec.tensors]}"
        )
    h = hashlib.sha256()
    h.update(b"blockllm-block-v1\0")
    h.update(canonical_json(spec.to_dict()))
    for ts in spec.tensors:
        t = tensors[ts.name]
        if tuple(t.shape) != ts.shape or dtype_name(t.dtype) != ts.dtype:
            raise ValueError(f"tensor {ts.name}: {tuple(t.shape)} {t.dtype} differs from its spec {ts}")
        h.update(b"\0" + ts.name.encode() + b"\0")
        h.update(raw_bytes(t))
    return h.hexdigest()


def asset_fingerprint(files: Mapping[str, bytes]) -> Fingerprint:
    """Fingerprint of a bundle of small files (e.g. a tokenizer)."""
    h = hashlib.sha256(b"blockllm-asset-v1\0")
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        h.update(len(files[name]).to_bytes(8, "little"))
        h.update(files[name])
    return h.hexdigest()
