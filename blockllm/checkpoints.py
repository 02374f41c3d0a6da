"""Reading checkpoints safely: HF directories (safetensors), PEFT adapters and GGUF files; never pickle."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .exceptions import AdapterError, CheckpointError, UnsafeCheckpointError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class Checkpoint:
    """A full model checkpoint read into memory."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer_files: dict[str, bytes]
    source: str


@dataclass
class AdapterCheckpoint:
    adapter_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    source: str


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"cannot open {url!r}: {e}") from e
    return fs, path.rstrip("/")


def _read_json(fs: fsspec.AbstractFileSystem, path: str, what: str) -> dict[str, Any]:
    try:
        with fs.open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} at {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} at {path} must be a JSON object")
    return data


def _load_safetensors(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, torch.Tensor]:
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def kind_of(url: str) -> str:
    """'gguf', 'adapter' or 'model' for a checkpoint location."""
    if url.lower().endswith(".gguf"):
        return "gguf"
    fs, path = _fs(url)
    if fs.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            raise UnsafeCheckpointError(
                f"{url} is a pickle checkpoint; BlockLLM never unpickles (it can run code). "
                "Convert it to safetensors (model.save_pretrained(dir, safe_serialization=True))."
            )
        raise CheckpointError(f"{url} is a file; give a model directory, an adapter directory or a .gguf file")
    if not fs.isdir(path):
        raise CheckpointError(f"{url} does not exist")
    if fs.exists(f"{path}/adapter_config.json"):
        return "adapter"
    return "model"


def read_model_dir(url: str) -> Checkpoint:
    """config.json + model.safetensors (or sharded with an index) + tokenizer files."""
    fs, path = _fs(url)
    try:
        config = _read_json(fs, f"{path}/config.json", "config.json")
    except FileNotFoundError:
        raise CheckpointError(f"{url} has no config.json; is it a Hugging Face model directory?") from None
    if "model_type" not in config:
        raise CheckpointError(f"config.json in {url} has no model_type")
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    shards: list[str]
    if "model.safetensors.index.json" in names:
        index = _read_json(fs, f"{path}/model.safetensors.index.json", "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{url}: model.safetensors.index.json has no weight_map")
        shards = sorted(set(weight_map.values()))
    elif "model.safetensors" in names:
        shards = ["model.safetensors"]
    else:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise UnsafeCheckpointError(
                f"{url} holds only pickle weights ({pickles[0]}); BlockLLM never unpickles them. "
                "Convert to safetensors with save_pretrained(..., safe_serialization=True)."
            )
        raise CheckpointError(f"{url} has no model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if "/" in shard or shard.startswith("."):
            raise CheckpointError(f"{url}: shard name {shard!r} is not a plain file name")
        try:
            state.update(_load_safetensors(fs, f"{path}/{shard}"))
        except FileNotFoundError:
            raise CheckpointError(f"{url}: shard {shard} listed in the index is missing") from None
    tokenizer = {n: fs.cat_file(f"{path}/{n}") for n in TOKENIZER_FILES if n in names}
    return Checkpoint(config, state, tokenizer, url)


def read_adapter_dir(url: str) -> AdapterCheckpoint:
    fs, path = _fs(url)
    config = _read_json(fs, f"{path}/adapter_config.json", "adapter_config.json")
    if fs.exists(f"{path}/adapter_model.safetensors"):
        state = _load_safetensors(fs, f"{path}/adapter_model.safetensors")
    elif fs.exists(f"{path}/adapter_model.bin"):
        raise UnsafeCheckpointError(
            f"{url} holds a pickle adapter (adapter_model.bin); BlockLLM never unpickles. "
            "Save it again with save_pretrained(..., safe_serialization=True)."
        )
    else:
        raise AdapterError(f"{url} has adapter_config.json but no adapter_model.safetensors")
    return AdapterCheckpoint(config, state, url)


def read_gguf(url: str) -> Checkpoint:
    """A GGUF file through transformers (`gguf_file=`), dequantized to float32."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    fs, path = _fs(url)
    if fs.protocol not in ("file", ("file", "local")) and "file" not in fs.protocol:
        raise CheckpointError("GGUF files are read from local paths only; copy it locally first")
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{url} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{url} is not a GGUF file transformers can read: {e}") from e
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tokenizer = {n: (Path(tmp) / n).read_bytes() for n in TOKENIZER_FILES if (Path(tmp) / n).exists()}
    return Checkpoint(config, state, tokenizer, url)
