"""The block zoo: every distinct block stored once in a zarr v3 hierarchy, plus model manifests.

Layout (DESIGN.md): blocks/<fp> (spec in attrs, one array per tensor), assets/<fp> (tokenizers),
models/<tenant>/<name> (manifest in attrs), fingerprints/ and graphs/ (JSON documents).
Writes publish last: a block's attrs are written after its tensors, a manifest after its blocks.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
import zarr.errors

from . import config as _config
from .exceptions import (
    BlockNotFoundError,
    ManifestError,
    ModelExistsError,
    ModelNotFoundError,
    ZooCorruptionError,
)
from .fingerprint import asset_fingerprint, fingerprint
from .retry import retried
from .stores import open_store
from .tensors import from_numpy, to_numpy
from .types import BlockSpec, Fingerprint, Manifest, validate_fingerprint, validate_name

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of items (or bytes) just done


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _age_seconds(stamp: str | None) -> float:
    if not stamp:
        return math.inf
    try:
        then = _dt.datetime.fromisoformat(stamp)
    except ValueError:
        return math.inf
    return (_dt.datetime.now(_dt.timezone.utc) - then).total_seconds()


@dataclass(frozen=True)
class Block:
    """A block read back from the zoo: its spec and tensors (on the requested device)."""

    fingerprint: Fingerprint
    spec: BlockSpec
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ZooStats:
    models: int
    blocks: int
    logical_bytes: int  # sum over models of the bytes of their blocks
    stored_bytes: int  # bytes of the distinct blocks in the zoo
    per_model: dict[str, int] = field(default_factory=dict)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass(frozen=True)
class GCReport:
    deleted_blocks: tuple[Fingerprint, ...]
    deleted_assets: tuple[Fingerprint, ...]
    freed_bytes: int
    kept_young: int  # unreferenced but younger than the grace period (an ingest may be under way)


class Zoo:
    """A block zoo at a URL (file://, memory://, s3://).

    >>> zoo = Zoo("memory://doc-zoo")
    >>> zoo.stats().blocks
    0
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        verify: bool | None = None,
        read_only: bool = False,
    ) -> None:
        self.url = _config.default_zoo_url() if url is None else url
        self.verify_reads = _config.get("zoo.verify", True) if verify is None else verify
        self.read_only = read_only
        self._store = open_store(self.url, storage_options=storage_options, read_only=read_only)
        self._specs: dict[Fingerprint, BlockSpec] = {}
        if not read_only:
            for path in ("", "blocks", "assets", "models", "fingerprints", "graphs"):
                self._ensure_group(path, {})

    def __repr__(self) -> str:
        return f"Zoo({self.url!r})"

    # ------------------------------------------------------------------ low-level helpers
    def _group(self, path: str, mode: str = "r") -> zarr.Group | None:
        try:
            return zarr.open_group(self._store, path=path, mode=mode)
        except (zarr.errors.NodeNotFoundError, FileNotFoundError, KeyError):
            return None

    def _ensure_group(self, path: str, attributes: dict[str, Any]) -> zarr.Group:
        """Open a group, or create it with `attributes`; safe when writers race to create it."""
        for _ in range(5):
            g = self._group(path, mode="r+")
            if g is not None:
                return g
            try:
                return zarr.create_group(self._store, path=path, attributes=attributes)
            except zarr.errors.ContainsGroupError:
                continue
        raise RuntimeError(f"could not open or create zarr group {path}")

    def _write_array(self, path: str, arr: np.ndarray, chunks: tuple[int, ...], attrs: dict[str, Any], fp: Fingerprint) -> None:
        """Write one content-addressed array; safe when writers of the same content race."""
        try:
            z = zarr.create_array(
                self._store, name=path, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                compressors=None, fill_value=0, attributes=attrs,
            )
        except zarr.errors.ContainsArrayError:
            # Another writer of the same content got there first (or crashed midway): never
            # delete what it wrote (zarr's overwrite=True would), just write the same bytes again.
            z = zarr.open_array(self._store, path=path, mode="r+")
            if z.shape != arr.shape or z.dtype != arr.dtype:
                raise ZooCorruptionError(fp, f"leftover array {path} has the wrong shape or dtype; run `blockllm zoo gc`") from None
        z[...] = arr

    def _children(self, path: str) -> list[str]:
        g = self._group(path)
        return sorted(g.group_keys()) if g is not None else []

    def _delete(self, parent: str, child: str) -> None:
        g = self._group(parent, mode="r+")
        if g is not None and child in g:
            del g[child]

    # ------------------------------------------------------------------ blocks
    @retried("has_block")
    def has_block(self, fp: Fingerprint) -> bool:
        if fp in self._specs:
            return True
        g = self._group(f"blocks/{fp}")
        return g is not None and "spec" in g.attrs

    @retried("reading a block spec")
    def block_spec(self, fp: Fingerprint) -> BlockSpec:
        spec = self._specs.get(fp)
        if spec is not None:
            return spec
        validate_fingerprint(fp)
        g = self._group(f"blocks/{fp}")
        if g is None or "spec" not in g.attrs:
            raise BlockNotFoundError(fp)
        try:
            spec = BlockSpec.from_dict(g.attrs["spec"])
        except ManifestError as e:
            raise ZooCorruptionError(fp, f"unreadable spec ({e})") from e
        self._specs[fp] = spec
        return spec

    def put_block(
        self, spec: BlockSpec, tensors: Mapping[str, torch.Tensor], *, fp: Fingerprint | None = None
    ) -> Fingerprint:
        """Store a block once (idempotent, safe to run concurrently); returns its fingerprint."""
        fp = fp or fingerprint(spec, tensors)
        if self.has_block(fp):
            return fp
        path = f"blocks/{fp}"
        g = self._ensure_group(path, {"started": _now()})
        chunk_bytes = int(_config.get("zoo.chunk-bytes", 16 << 20))
        for ts in spec.tensors:
            arr = to_numpy(tensors[ts.name])
            rows = arr.shape[0] if arr.ndim else 1
            row_bytes = max(1, arr.nbytes // max(rows, 1))
            chunk0 = max(1, min(rows, chunk_bytes // row_bytes))
            self._write_array(f"{path}/{ts.name}", arr, (chunk0, *arr.shape[1:]) if arr.ndim else (), {"torch_dtype": ts.dtype}, fp)
        # Publish last: the spec makes the block visible.
        g.attrs.update({"spec": spec.to_dict(), "fingerprint": fp, "nbytes": spec.nbytes, "created": _now()})
        self._specs[fp] = spec
        return fp

    @retried("reading a block")
    def get_block(
        self, fp: Fingerprint, *, device: str | torch.device = "cpu", verify: bool | None = None
    ) -> Block:
        """Read a block; with verification on, its bytes must hash to `fp` or ZooCorruptionError."""
        spec = self.block_spec(fp)
        tensors: dict[str, torch.Tensor] = {}
        for ts in spec.tensors:
            try:
                z = zarr.open_array(self._store, path=f"blocks/{fp}/{ts.name}", mode="r")
                arr = np.asarray(z[...])
                if tuple(arr.shape) != ts.shape:
                    raise ValueError(f"shape {arr.shape} != {ts.shape}")
                tensors[ts.name] = from_numpy(arr, ts.dtype)
            except (zarr.errors.BaseZarrError, FileNotFoundError, KeyError, ValueError, TypeError) as e:
                raise ZooCorruptionError(fp, f"tensor {ts.name} unreadable: {e}") from e
        if self.verify_reads if verify is None else verify:
            actual = fingerprint(spec, tensors)
            if actual != fp:
                raise ZooCorruptionError(fp, f"its bytes hash to {actual[:16]}…")
        if str(device) != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return Block(fp, spec, tensors)

    @retried("listing blocks")
    def list_blocks(self, *, include_incomplete: bool = False) -> list[Fingerprint]:
        fps = self._children("blocks")
        if include_incomplete:
            return fps
        return [fp for fp in fps if self.has_block(fp)]

    def _block_attrs(self, fp: Fingerprint) -> dict[str, Any]:
        g = self._group(f"blocks/{fp}")
        return dict(g.attrs) if g is not None else {}

    def delete_block(self, fp: Fingerprint) -> None:
        g = self._group(f"blocks/{fp}", mode="r+")
        if g is not None:
            g.attrs.put({"deleting": _now()})  # unpublish first, then remove the tensors
        self._specs.pop(fp, None)
        self._delete("blocks", fp)

    # ------------------------------------------------------------------ assets (tokenizers)
    def put_asset(self, files: Mapping[str, bytes]) -> Fingerprint:
        fp = asset_fingerprint(files)
        path = f"assets/{fp}"
        g = self._group(path)
        if g is not None and "files" in g.attrs:
            return fp
        g = self._ensure_group(path, {"started": _now()})
        names = sorted(files)
        for i, name in enumerate(names):
            data = np.frombuffer(files[name], dtype=np.uint8)
            self._write_array(f"{path}/f{i}", data, (max(1, data.size),), {}, fp)
        g.attrs.update({"files": names, "created": _now()})
        return fp

    @retried("reading an asset")
    def get_asset(self, fp: Fingerprint) -> dict[str, bytes]:
        validate_fingerprint(fp)
        g = self._group(f"assets/{fp}")
        if g is None or "files" not in g.attrs:
            raise BlockNotFoundError(fp)
        out = {}
        for i, name in enumerate(g.attrs["files"]):
            z = zarr.open_array(self._store, path=f"assets/{fp}/f{i}", mode="r")
            out[name] = np.asarray(z[...]).tobytes()
        if asset_fingerprint(out) != fp:
            raise ZooCorruptionError(fp, "asset bytes do not match its fingerprint")
        return out

    # ------------------------------------------------------------------ models
    def put_manifest(self, manifest: Manifest, *, overwrite: bool = False) -> None:
        """Publish a model. Every block it names must already be complete in the zoo."""
        missing = [fp for fp in manifest.fingerprints() if not self.has_block(fp)]
        if missing:
            raise ManifestError(
                f"model {manifest.key} names {len(missing)} block(s) missing from the zoo, "
                f"e.g. {missing[0]}; ingest them first"
            )
        if manifest.tokenizer is not None:
            g = self._group(f"assets/{manifest.tokenizer}")
            if g is None or "files" not in g.attrs:
                raise ManifestError(f"model {manifest.key}: tokenizer asset {manifest.tokenizer} is missing")
        path = f"models/{manifest.tenant}/{manifest.name}"
        if not overwrite and self._group(path) is not None:
            raise ModelExistsError(manifest.tenant, manifest.name)
        self._ensure_group(f"models/{manifest.tenant}", {})
        data = manifest.to_dict()
        data["created"] = data["created"] or _now()
        zarr.create_group(self._store, path=path, attributes={"manifest": data}, overwrite=True)

    @retried("has_model")
    def has_model(self, tenant: str, name: str) -> bool:
        validate_name(tenant, "tenant")
        validate_name(name, "model name")
        g = self._group(f"models/{tenant}/{name}")
        return g is not None and "manifest" in g.attrs

    @retried("reading a manifest")
    def get_manifest(self, tenant: str, name: str) -> Manifest:
        validate_name(tenant, "tenant")
        validate_name(name, "model name")
        g = self._group(f"models/{tenant}/{name}")
        if g is None or "manifest" not in g.attrs:
            raise ModelNotFoundError(tenant, name)
        return Manifest.from_dict(g.attrs["manifest"])

    @retried("listing models")
    def list_models(self, tenant: str | None = None) -> list[Manifest]:
        tenants = [validate_name(tenant, "tenant")] if tenant else self._children("models")
        out = []
        for t in tenants:
            for name in self._children(f"models/{t}"):
                try:
                    out.append(self.get_manifest(t, name))
                except (ModelNotFoundError, ManifestError) as e:
                    log.warning("skipping unreadable model %s/%s: %s", t, name, e)
        return out

    def delete_model(self, tenant: str, name: str) -> Manifest:
        """Remove a model's manifest; its blocks stay until `gc()` finds them unreferenced."""
        manifest = self.get_manifest(tenant, name)
        self._delete(f"models/{tenant}", name)
        return manifest

    # ------------------------------------------------------------------ documents (graphs, fingerprints)
    def put_json(self, path: str, obj: Any) -> None:
        """Write a JSON document as the attrs of one group: a single atomic write."""
        g = self._group(path, mode="r+")
        if g is not None:  # rewrite zarr.json in one atomic put; never delete first
            g.attrs.put({"doc": obj})
        else:
            self._ensure_group(path, {"doc": obj}).attrs.put({"doc": obj})

    @retried("reading a document")
    def get_json(self, path: str, default: Any = None) -> Any:
        g = self._group(path)
        if g is None or "doc" not in g.attrs:
            return default
        return g.attrs["doc"]

    @retried("listing documents")
    def list_json(self, path: str) -> list[str]:
        return self._children(path)

    def delete_json(self, path: str) -> None:
        parent, _, child = path.rpartition("/")
        self._delete(parent, child)

    # ------------------------------------------------------------------ accounting and upkeep
    def stats(self) -> ZooStats:
        models = self.list_models()
        fps = self.list_blocks()
        sizes = {fp: self.block_spec(fp).nbytes for fp in fps}
        per_model = {m.key: sum(sizes.get(fp, 0) for fp in [*m.chain, *(a.fingerprint for a in m.adapters)]) for m in models}
        return ZooStats(
            models=len(models),
            blocks=len(fps),
            logical_bytes=sum(per_model.values()),
            stored_bytes=sum(sizes.values()),
            per_model=per_model,
        )

    def verify(self, progress: Progress | None = None) -> dict[Fingerprint, str]:
        """Re-hash every block and check every manifest; returns {fingerprint or model: problem}."""
        problems: dict[str, str] = {}
        for fp in self.list_blocks():
            try:
                self.get_block(fp, verify=True)
            except ZooCorruptionError as e:
                problems[fp] = str(e)
            if progress:
                progress(1)
        for m in self.list_models():
            for fp in m.fingerprints():
                if not self.has_block(fp):
                    problems[m.key] = f"names missing block {fp}"
        return problems

    def gc(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GCReport:
        """Delete blocks and assets no manifest references, once older than `grace_seconds`.

        The grace period protects an ingest under way: its blocks land before its manifest.
        """
        referenced: set[str] = set()
        tokenizers: set[str] = set()
        for m in self.list_models():
            referenced |= m.fingerprints()
            if m.tokenizer:
                tokenizers.add(m.tokenizer)
        deleted, freed, young = [], 0, 0
        for fp in self.list_blocks(include_incomplete=True):
            if fp in referenced:
                continue
            attrs = self._block_attrs(fp)
            stamp = attrs.get("created") or attrs.get("started")
            if _age_seconds(stamp) < grace_seconds:
                young += 1
                continue
            freed += int(attrs.get("nbytes", 0))
            deleted.append(fp)
            if not dry_run:
                self.delete_block(fp)
        deleted_assets = []
        for fp in self._children("assets"):
            g = self._group(f"assets/{fp}")
            stamp = (dict(g.attrs).get("created") or dict(g.attrs).get("started")) if g is not None else None
            if fp not in tokenizers and _age_seconds(stamp) >= grace_seconds:
                deleted_assets.append(fp)
                if not dry_run:
                    self._delete("assets", fp)
        return GCReport(tuple(deleted), tuple(deleted_assets), freed, young)

    def iter_blocks(self, fps: list[Fingerprint], **kw: Any) -> Iterator[Block]:
        for fp in fps:
            yield self.get_block(fp, **kw)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll until predicate() is true or the timeout passes (for tests and jobs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
