"""Rotary position embedding tables, computed once per architecture (rope scaling included)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..exceptions import UnsupportedArchitectureError

log = logging.getLogger(__name__)


def rope_parameters(arch: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of a config in transformers 5 form ({"rope_type", "rope_theta", ...})."""
    params = dict(arch.get("rope_parameters") or {})
    if not params:
        params = dict(arch.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_theta", arch.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def inv_freq_of(arch: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq (D/2,) float32, attention scaling), as transformers' rotary embedding makes them."""
    params = rope_parameters(arch)
    rope_type = params["rope_type"]
    if rope_type == "default":
        base = float(params["rope_theta"])
        # Same expression as transformers' compute_default_rope_parameters (bit-identical tables).
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedArchitectureError(
            f"rope type {rope_type!r} changes its frequencies with the sequence length; the block "
            "engine serves static rope types only (default, linear, llama3, yarn)"
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ..families.llama import hf_config

    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        raise UnsupportedArchitectureError(f"unknown rope type {rope_type!r}")
    cfg = hf_config({**arch, "num_hidden_layers": 1})
    try:
        inv_freq, scaling = fn(cfg)
    except TypeError:  # older transformers: fn(config, device)
        inv_freq, scaling = fn(cfg, None)
    return inv_freq.float().cpu(), float(scaling)


def cos_sin_table(
    arch: dict[str, Any], head_dim: int, max_positions: int, device: torch.device
) -> torch.Tensor:
    """cos and sin of every position, float32 (P, 2, D/2): row p is [cos(p f) * s, sin(p f) * s]."""
    inv_freq, scaling = inv_freq_of(arch, head_dim)
    pos = torch.arange(max_positions, dtype=torch.float)
    freqs = pos[:, None] * inv_freq[None, :]  # (P, D/2), as transformers: position * inv_freq
    table = torch.stack((freqs.cos() * scaling, freqs.sin() * scaling), dim=1)  # (P, 2, D/2)
    return table.to(device)
