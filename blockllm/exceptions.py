"""Typed errors of BlockLLM's own layer (checkpoints, requests, serving); zoo errors live in zoo_store."""

from __future__ import annotations

from zoo_store.exceptions import (  # re-exported: callers catch one family of errors
    BlockNotFoundError,
    InvalidNameError,
    ManifestError,
    ModelNotFoundError,
    ZooCorruptionError,
    ZooError,
    ZooUnavailableError,
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
    "AuthenticationError",
    "BatchInputError",
    "InvalidPromptError",
    "JobCancelledError",
    "JobNotFoundError",
    "MissingColumnError",
    "OutputNotWritableError",
    "NoCapacityError",
    "OverloadedError",
    "BaseNotInZooError",
    "BlockLLMError",
    "BlockNotFoundError",
    "CheckpointError",
    "ForbiddenError",
    "InvalidRequestError",
    "InvalidSamplingError",
    "PromptTooLongError",
    "UnknownModelError",
    "InvalidNameError",
    "ManifestError",
    "ModelNotFoundError",
    "UnsafeCheckpointError",
    "UnsupportedArchitectureError",
    "ZooCorruptionError",
    "ZooError",
    "ZooUnavailableError",
]


class ForbiddenError(BlockLLMError, PermissionError):
    """A tenant asked for a model or block it may not use (another tenant's private one)."""


class AuthenticationError(BlockLLMError, PermissionError):
    """A missing or invalid API key."""


class OverloadedError(BlockLLMError, RuntimeError):
    """Admission queues are full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoCapacityError(BlockLLMError, RuntimeError):
    """No worker of the cluster can host a model's blocks (add workers or memory)."""


class InvalidSamplingError(BlockLLMError, ValueError):
    """Sampling parameters out of range (max_new_tokens <= 0, temperature < 0, top_p outside (0, 1], ...)."""


class PromptTooLongError(BlockLLMError, ValueError):
    """A prompt (plus max_new_tokens) longer than the model's context or the engine's max-model-len."""


class InvalidRequestError(BlockLLMError, ValueError):
    """A request that is malformed: empty prompt, token ids outside the vocabulary, duplicate id."""


class UnknownModelError(BlockLLMError, KeyError):
    """A request for a model the engine has not loaded (load it, or place it on this worker)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BatchInputError(BlockLLMError, ValueError):
    """Batch inference input that cannot run: a missing or non-text prompt column, a changed job input."""


class MissingColumnError(BatchInputError, KeyError):
    """The prompt column named for batch inference is not in the DataFrame."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidPromptError(BatchInputError):
    """A prompt in a batch that is not a non-empty string (names the row)."""


class OutputNotWritableError(BlockLLMError, PermissionError):
    """A batch job's output URL that cannot be written (no such bucket, read-only, unknown protocol)."""


class JobNotFoundError(BlockLLMError, LookupError):
    """No batch job of that id is recorded (see `blockllm batch status`)."""


class JobCancelledError(BlockLLMError, RuntimeError):
    """A batch job was cancelled; submitting it again resumes it from the parts already written."""
