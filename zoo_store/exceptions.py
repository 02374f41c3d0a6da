"""Typed errors of the block zoo; each subclasses the closest builtin and says what to do next."""

from __future__ import annotations


class ZooError(Exception):
    """Base class of every zoo error."""


class ZooCorruptionError(ZooError, ValueError):
    """A stored block's bytes do not hash to its fingerprint (or its metadata is unreadable)."""

    def __init__(self, fingerprint: str, detail: str) -> None:
        self.fingerprint = fingerprint
        super().__init__(
            f"block {fingerprint} is corrupt: {detail}. It will not be served; re-ingest a model "
            "that contains it, or run `blockllm zoo verify` to list every damaged block."
        )


class BlockNotFoundError(ZooError, KeyError):
    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        super().__init__(f"no block {fingerprint} in the zoo (ingest a model that contains it)")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ModelNotFoundError(ZooError, KeyError):
    def __init__(self, tenant: str, name: str) -> None:
        self.tenant, self.name = tenant, name
        super().__init__(f"no model {tenant}/{name} in the zoo (see `blockllm zoo ls`)")

    def __str__(self) -> str:
        return self.args[0]


class ModelExistsError(ZooError, FileExistsError):
    def __init__(self, tenant: str, name: str) -> None:
        super().__init__(f"model {tenant}/{name} already exists; remove it first or pick another name")


class InvalidNameError(ZooError, ValueError):
    """A tenant or model name that is empty, too long, or could escape its folder."""


class ManifestError(ZooError, ValueError):
    """A model manifest that is malformed or refers to blocks that are not in the zoo."""


class MissingBackendError(ZooError, ImportError):
    """The URL's storage backend is not installed (e.g. s3fs for s3://)."""


class UnsupportedURLError(ZooError, ValueError):
    """A zoo URL whose scheme BlockLLM does not handle."""


class ZooUnavailableError(ZooError, ConnectionError):
    """The zoo's store did not answer (object store down or restarting) after bounded retries."""
