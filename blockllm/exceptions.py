"""Typed errors of BlockLLM's own layer (checkpoints, requests, serving); zoo errors live in zoo_store."""

from __future__ import annotations

from zoo_store.exceptions import (  # re-exported: callers catch one family of errors
    BlockNotFoundError,
    InvalidNameError,
    ManifestError,
    ModelNotFoundError,
    ZooCorruptionError,
    ZooError,
)


class BlockLLMError(Exception):
    """Base class of BlockLLM's own errors."""


class CheckpointError(BlockLLMError, ValueError):
    """A checkpoint that is missing files, truncated, or whose tensors do not fit its config."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint (.bin/.pt/.ckpt): never unpickled, convert it to safetensors."""


class UnsupportedArchitectureError(CheckpointError):
    """A model whose architecture no BlockLLM family handles."""


class AdapterError(CheckpointError):
    """A LoRA adapter that is malformed or uses a PEFT feature BlockLLM does not serve."""


class BaseNotInZooError(BlockLLMError, LookupError):
    """A LoRA adapter (or fine-tune) whose base model's blocks are not in the zoo."""


__all__ = [
    "AdapterError",
    "BaseNotInZooError",
    "BlockLLMError",
    "BlockNotFoundError",
    "CheckpointError",
    "ForbiddenError",
    "InvalidNameError",
    "ManifestError",
    "ModelNotFoundError",
    "UnsafeCheckpointError",
    "UnsupportedArchitectureError",
    "ZooCorruptionError",
    "ZooError",
]


class ForbiddenError(BlockLLMError, PermissionError):
    """A tenant asked for a model or block it may not use (another tenant's private one)."""
