"""Reassemble a model from its chain of blocks in the zoo: a runnable transformers model + tokenizer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from zoo_store import Manifest, Zoo

from .config import cache_dir
from .families import get_family


def load_model(
    zoo: Zoo,
    model: Manifest | str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """The model `tenant/name` (or a manifest) rebuilt from its blocks, LoRA adapters applied."""
    manifest = _manifest(zoo, model)
    family = get_family(manifest.family)
    blocks = [zoo.get_block(fp) for fp in manifest.chain]
    adapters = [(a.index, zoo.get_block(a.fingerprint)) for a in manifest.adapters]
    return family.assemble(manifest.config, blocks, adapters, dtype=dtype, device=device)


def load_tokenizer(zoo: Zoo, model: Manifest | str) -> PreTrainedTokenizerBase:
    manifest = _manifest(zoo, model)
    if manifest.tokenizer is None:
        raise ValueError(f"model {manifest.key} was ingested without a tokenizer")
    target = cache_dir() / "tokenizers" / manifest.tokenizer
    if not target.exists():
        files = zoo.get_asset(manifest.tokenizer)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        try:
            tmp.rename(target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(target))


def _manifest(zoo: Zoo, model: Manifest | str) -> Manifest:
    if isinstance(model, Manifest):
        return model
    tenant, _, name = model.partition("/")
    return zoo.get_manifest(tenant, name)
