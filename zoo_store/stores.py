"""Open the zarr store behind a zoo URL: file:// (default), memory://, s3:// (needs s3fs)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from . import config as _config
from .exceptions import MissingBackendError, UnsupportedURLError

# scheme -> (python module needed, pip requirement that provides it)
_BACKENDS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3fs (pip install 'blockllm[s3]')"),
    "s3a": ("s3fs", "s3fs (pip install 'blockllm[s3]')"),
    "gs": ("gcsfs", "gcsfs"),
    "gcs": ("gcsfs", "gcsfs"),
    "az": ("adlfs", "adlfs"),
    "abfs": ("adlfs", "adlfs"),
}


def open_store(
    url: str, *, storage_options: Mapping[str, Any] | None = None, read_only: bool = False
) -> Store:
    if not isinstance(url, str) or not url:
        raise UnsupportedURLError(f"zoo URL must be a non-empty string, not {url!r}")
    parsed = urlparse(url)
    scheme = parsed.scheme.lower() if "://" in url else ""
    if scheme in ("", "file"):
        path = Path(parsed.path if scheme == "file" else url).expanduser()
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise UnsupportedURLError(f"file URL {url!r} names a host; use file:///absolute/path")
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path, read_only=read_only)
    if scheme == "memory":
        return FsspecStore.from_url(url, read_only=read_only)
    if scheme in _BACKENDS:
        module, requirement = _BACKENDS[scheme]
        if importlib.util.find_spec(module) is None:
            raise MissingBackendError(
                f"a {scheme}:// zoo needs {requirement}, which is not installed"
            )
        options = dict(_config.get("zoo.storage-options") or {})
        options.update(storage_options or {})
        if not parsed.netloc:
            raise UnsupportedURLError(f"{url!r} names no bucket; use {scheme}://bucket/prefix")
        return FsspecStore.from_url(url, storage_options=options, read_only=read_only)
    raise UnsupportedURLError(
        f"unsupported zoo URL scheme {scheme!r} in {url!r}; use file://, memory:// or s3://"
    )
