"""BlockLLM: serve many fine-tuned LLM variants from one zoo of shared blocks, on Dask."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Client": "blockllm.client",
    "GenerationRequest": "blockllm.client",
    "Completion": "blockllm.client",
    "Engine": "blockllm.engine",
    "SamplingParams": "blockllm.types",
    "Request": "blockllm.types",
    "Zoo": "zoo_store",
    "auth": "blockllm.auth",
    "generate_dataframe": "blockllm.batch",
    "generate_bag": "blockllm.batch",
    "generate_list": "blockllm.batch",
    "submit_job": "blockllm.batch",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import on first use, so `import blockllm` stays light (no torch, no distributed)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockllm' has no attribute {name!r}")
    mod = importlib.import_module(module)
    return mod if name == "auth" else getattr(mod, name)
