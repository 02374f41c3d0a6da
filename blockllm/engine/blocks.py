"""Blocks as the engine runs them: plain tensors (q/k/v and gate/up fused at load), Llama math.

The hot path works on a flattened batch: every scheduled token of every request is one row of
`x` (N, H); attention is the only per-request part (engine/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from zoo_store import Block

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class LoRA:
    """One adapter's low-rank factors for one linear: delta = (x @ A^T) @ B^T * scale."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float


@dataclass
class AdapterWeights:
    """An adapter block on the engine: per layer, per target ('q','k','v','o','gate','up','down')."""

    fingerprint: str
    layers: dict[int, dict[str, LoRA]] = field(default_factory=dict)  # relative layer -> target -> LoRA
    nbytes: int = 0


_TARGETS = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
}


def load_adapter(block: Block, device: torch.device, dtype: torch.dtype) -> AdapterWeights:
    extra = block.spec.extra
    out = AdapterWeights(block.fingerprint, nbytes=block.spec.nbytes)
    for name, t in block.tensors.items():
        if not name.endswith(".lora_A"):
            continue
        rel, rest = name.split(".", 1)
        stem = rest.rsplit(".lora_", 1)[0]
        a = t.to(device=device, dtype=dtype)
        b = block.tensors[f"{rel}.{stem}.lora_B"].to(device=device, dtype=dtype)
        key = stem.rsplit(".", 1)[1]
        r = extra.get("rank_pattern", {}).get(key, extra["r"])
        alpha = extra.get("alpha_pattern", {}).get(key, extra["lora_alpha"])
        scale = alpha / (r**0.5) if extra.get("use_rslora") else alpha / r
        out.layers.setdefault(int(rel), {})[_TARGETS[stem]] = LoRA(a, b, float(scale))
    return out


class Rotary:
    """cos/sin tables from the model's rope config (through transformers' own init functions)."""

    def __init__(self, config: dict[str, Any], device: torch.device) -> None:
        from blockllm.families.llama import hf_config
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cfg = hf_config(config)
        params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
        if rope_type == "default":
            base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)) if isinstance(params, dict) else cfg.rope_theta
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            dim = int(head_dim * getattr(cfg, "partial_rotary_factor", 1.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, device)
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        self.scaling = float(scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].to(torch.float32) * self.inv_freq[None, :]  # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # (q + 2kv, H) fused
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor  # (2I, H) fused
    down: torch.Tensor
    q_norm: torch.Tensor | None = None  # Qwen3
    k_norm: torch.Tensor | None = None


class EngineBlock:
    """A loaded chain block: embed, a run of decoder layers, or the head."""

    def __init__(self, block: Block, device: torch.device, dtype: torch.dtype) -> None:
        spec = block.spec
        self.fingerprint = block.fingerprint
        self.kind = spec.kind
        self.nbytes = spec.nbytes
        arch = spec.arch
        self.eps = float(arch.get("rms_norm_eps", 1e-6))
        self.hidden = int(arch["hidden_size"])
        self.n_heads = int(arch["num_attention_heads"])
        self.n_kv = int(arch.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(arch.get("head_dim") or self.hidden // self.n_heads)
        self.act = ACTS[arch.get("hidden_act", "silu")]
        self.layer_start, self.layer_end = spec.layer_start, spec.layer_end
        t = {k: v.to(device=device, dtype=dtype) for k, v in block.tensors.items()}
        self.embed = t.get("embed_tokens.weight")
        self.norm = t.get("norm.weight")
        self.lm_head = t.get("lm_head.weight")
        self.tied = bool(spec.extra.get("tied_embedding", False))
        self.layers: list[LayerWeights] = []
        for i in range(spec.layer_end - spec.layer_start) if spec.kind == "layers" else ():
            p = f"{i}."
            bias = [t.get(f"{p}self_attn.{n}_proj.bias") for n in "qkv"]
            self.layers.append(LayerWeights(
                input_norm=t[f"{p}input_layernorm.weight"],
                post_norm=t[f"{p}post_attention_layernorm.weight"],
                qkv=torch.cat([t[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]).contiguous(),
                qkv_bias=torch.cat(bias).contiguous() if all(b is not None for b in bias) else None,
                o=t[f"{p}self_attn.o_proj.weight"],
                gate_up=torch.cat([t[f"{p}mlp.gate_proj.weight"], t[f"{p}mlp.up_proj.weight"]]).contiguous(),
                down=t[f"{p}mlp.down_proj.weight"],
                q_norm=t.get(f"{p}self_attn.q_norm.weight"),
                k_norm=t.get(f"{p}self_attn.k_norm.weight"),
            ))

    @property
    def n_layers(self) -> int:
        return len(self.layers)
