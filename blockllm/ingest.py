"""Ingest checkpoints into the zoo: cut into blocks, store each distinct block once, publish last."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graphs import validate_error_budget
from zoo_store import (
    AdapterRef,
    Manifest,
    ModelExistsError,
    ModelNotFoundError,
    Zoo,
    fingerprint,
    validate_name,
)

from . import config as _config
from .checkpoints import kind_of, read_adapter_dir, read_gguf, read_model_dir
from .exceptions import BaseNotInZooError, ForbiddenError
from .families import BlockParts, family_for_config, get_family

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes just written, total bytes to write)


@dataclass(frozen=True)
class IngestReport:
    manifest: Manifest
    new_blocks: int
    reused_blocks: int
    new_bytes: int  # bytes this ingest added to the zoo
    model_bytes: int  # bytes of the model's blocks (logical)


def _store_parts(zoo: Zoo, parts: list[BlockParts], progress: Progress | None) -> tuple[list[str], int, int]:
    """Write the blocks the zoo lacks; returns (fingerprints, blocks written, bytes written)."""
    fps = [fingerprint(p.spec, p.tensors) for p in parts]
    todo = {fp: p for fp, p in zip(fps, parts, strict=True) if not zoo.has_block(fp)}  # dedups repeats too
    total = sum(p.spec.nbytes for p in todo.values())
    for fp, part in todo.items():
        zoo.put_block(part.spec, part.tensors, fp=fp)
        if progress:
            progress(part.spec.nbytes, total)
    return fps, len(todo), total


def _resolve_base(zoo: Zoo, tenant: str, base: str | None, adapter_config: dict, layers_per_block: int) -> Manifest:
    if base:
        try:
            base_tenant, base_name = base.split("/", 1)
            manifest = zoo.get_manifest(base_tenant, base_name)
        except (ValueError, ModelNotFoundError):
            raise BaseNotInZooError(
                f"base model {base!r} is not in the zoo; ingest the base first (as TENANT/NAME)"
            ) from None
        if manifest.tenant != tenant and manifest.visibility != "shared":
            raise ForbiddenError(f"base model {base} is private to tenant {manifest.tenant}")
        return manifest
    # No explicit base: match the adapter's base checkpoint against the zoo by fingerprints.
    base_path = adapter_config.get("base_model_name_or_path")
    fs_path = Path(str(base_path)) if base_path else None
    if fs_path is None or not (fs_path / "config.json").exists():
        raise BaseNotInZooError(
            f"the adapter's base {base_path!r} is not a local model directory; pass --base TENANT/NAME "
            "naming its base model in the zoo"
        )
    ckpt = read_model_dir(str(fs_path))
    family = family_for_config(ckpt.config)
    chain = tuple(fingerprint(p.spec, p.tensors) for p in family.partition(ckpt.config, ckpt.state_dict, layers_per_block))
    for m in zoo.list_models():
        if m.chain == chain and not m.adapters and (m.tenant == tenant or m.visibility == "shared"):
            return m
    raise BaseNotInZooError(f"no model in the zoo has the blocks of the adapter's base {base_path}; ingest it first")


def ingest(
    zoo: Zoo,
    source: str | Path,
    *,
    tenant: str,
    name: str,
    base: str | None = None,
    visibility: str = "private",
    error_budget: float = 0.0,
    layers_per_block: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> IngestReport:
    """Ingest a model directory, a PEFT LoRA adapter directory or a GGUF file as tenant/name."""
    validate_name(tenant, "tenant")
    validate_name(name, "model name")
    validate_error_budget(error_budget, model=f"{tenant}/{name}")  # typed error before any block is written
    if not overwrite and zoo.has_model(tenant, name):
        raise ModelExistsError(tenant, name)
    lpb = int(layers_per_block or _config.get("partition.layers-per-block", 1))
    url = str(source)
    if "://" not in url:
        url = str(Path(url).expanduser().resolve())
    kind = kind_of(url)
    if kind == "adapter":
        adapter = read_adapter_dir(url)
        base_manifest = _resolve_base(zoo, tenant, base, adapter.adapter_config, lpb)
        family = get_family(base_manifest.family)
        chain = [(fp, zoo.block_spec(fp)) for fp in base_manifest.chain]
        pieces = family.partition_adapter(base_manifest.config, adapter.adapter_config, adapter.state_dict, chain)
        fps, new, new_bytes = _store_parts(zoo, [p for _, p in pieces], progress)
        manifest = Manifest(
            tenant=tenant, name=name, family=family.name, chain=base_manifest.chain,
            config=base_manifest.config,
            adapters=tuple(AdapterRef(i, fp) for (i, _), fp in zip(pieces, fps, strict=True)),
            tokenizer=base_manifest.tokenizer, visibility=visibility, base=base_manifest.key,
            error_budget=error_budget, source=url,
        )
        model_bytes = sum(p.spec.nbytes for _, p in pieces)
    else:
        ckpt = read_gguf(url) if kind == "gguf" else read_model_dir(url)
        family = family_for_config(ckpt.config)
        parts = family.partition(ckpt.config, ckpt.state_dict, lpb)
        fps, new, new_bytes = _store_parts(zoo, parts, progress)
        tokenizer = zoo.put_asset(ckpt.tokenizer_files) if ckpt.tokenizer_files else None
        manifest = Manifest(
            tenant=tenant, name=name, family=family.name, chain=tuple(fps), config=ckpt.config,
            tokenizer=tokenizer, visibility=visibility, base=base, error_budget=error_budget, source=url,
        )
        model_bytes = sum(p.spec.nbytes for p in parts)
    zoo.put_manifest(manifest, overwrite=overwrite)  # publish last
    reused = len(set(fps)) - new
    log.info("ingested %s: %d new blocks (%d bytes), %d reused", manifest.key, new, new_bytes, reused)
    return IngestReport(manifest, new, reused, new_bytes, model_bytes)


__all__ = ["IngestReport", "ingest"]
