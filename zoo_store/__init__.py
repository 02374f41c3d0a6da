"""zoo_store: the block zoo, each distinct model block stored once in zarr over fsspec."""

from .exceptions import (
    BlockNotFoundError,
    InvalidNameError,
    ManifestError,
    MissingBackendError,
    ModelExistsError,
    ModelNotFoundError,
    UnsupportedURLError,
    ZooCorruptionError,
    ZooError,
    ZooUnavailableError,
)
from .fingerprint import asset_fingerprint, fingerprint, tensor_specs
from .types import (
    AdapterRef,
    BlockSpec,
    Fingerprint,
    Manifest,
    TensorSpec,
    validate_name,
)
from .zoo import Block, GCReport, Zoo, ZooStats

__all__ = [
    "AdapterRef",
    "Block",
    "BlockNotFoundError",
    "BlockSpec",
    "Fingerprint",
    "GCReport",
    "InvalidNameError",
    "Manifest",
    "ManifestError",
    "MissingBackendError",
    "ModelExistsError",
    "ModelNotFoundError",
    "TensorSpec",
    "UnsupportedURLError",
    "Zoo",
    "ZooCorruptionError",
    "ZooError",
    "ZooStats",
    "ZooUnavailableError",
    "asset_fingerprint",
    "fingerprint",
    "tensor_specs",
    "validate_name",
]
