"""Block instances on the engine's device: zoo blocks turned into fused plain tensors, loaded once each.

q/k/v and gate/up weights are concatenated at load so a layer runs four GEMMs; LoRA adapters keep
their A/B factors and peft's scaling per (layer, module).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from zoo_store import Block

from ..exceptions import UnsupportedArchitectureError


@dataclass(frozen=True)
class Arch:
    """What the decoder math needs from a block's `arch` (the config values in its spec)."""

    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int
    eps: float
    vocab: int
    max_positions: int
    rope_key: str  # canonical rope settings: blocks with equal keys share one cos/sin table
    raw: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, arch: dict[str, Any]) -> Arch:
        act = arch.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedArchitectureError(
                f"hidden_act {act!r}: the block engine runs SwiGLU (silu) MLPs only"
            )
        hidden, heads = int(arch["hidden_size"]), int(arch["num_attention_heads"])
        from .rope import rope_parameters

        return cls(
            hidden=hidden,
            n_heads=heads,
            n_kv=int(arch.get("num_key_value_heads") or heads),
            head_dim=int(arch.get("head_dim") or hidden // heads),
            intermediate=int(arch.get("intermediate_size", 0)),
            eps=float(arch.get("rms_norm_eps", 1e-6)),
            vocab=int(arch.get("vocab_size", 0)),
            max_positions=int(arch.get("max_position_embeddings", 4096)),
            rope_key=repr(sorted(rope_parameters(arch).items())),
            raw=dict(arch),
        )


@dataclass
class LayerWeights:
    """One decoder layer, fused: w_qkv (H D + 2 Hkv D, C), w_gate_up (2 I, C)."""

    ln1: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    ln2: torch.Tensor
    w_gate_up: torch.Tensor
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    q_norm: torch.Tensor | None = None  # Qwen3: RMSNorm over each head of q and k before rope
    k_norm: torch.Tensor | None = None
    # RMSNorm weights folded into w_qkv / w_gate_up columns: the kernels after those GEMMs scale
    # each row by 1/rms(x) themselves (row scaling commutes with the GEMM), two kernels fewer a layer
    folded: bool = False


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class EmbedBlock:
    fingerprint: str
    arch: Arch
    weight: torch.Tensor  # (V, C)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight)


@dataclass
class LayerBlock:
    fingerprint: str
    arch: Arch
    layer_start: int
    layers: list[LayerWeights]

    @property
    def nbytes(self) -> int:
        return sum(
            _nbytes(*(v for v in vars(w).values() if isinstance(v, torch.Tensor)))
            for w in self.layers
        )


@dataclass
class HeadBlock:
    """Final norm + LM head; a tied head borrows its chain's embedding (so its key names both)."""

    fingerprint: str
    arch: Arch
    norm: torch.Tensor  # (C,)
    weight: torch.Tensor  # (V, C): its own, or the embedding's when tied
    tied: bool

    @property
    def nbytes(self) -> int:
        return _nbytes(self.norm) + (0 if self.tied else _nbytes(self.weight))


@dataclass
class LoraModule:
    """One adapted projection: delta = (x @ A.T) @ B.T * scale, added to output columns [c0, c1)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    c0: int
    c1: int


@dataclass
class LoraAdapter:
    """A LoRA adapter block: per layer of its base block, the adapted modules by fused GEMM."""

    fingerprint: str
    base: str  # fingerprint of the layer block it attaches to
    # layers[i][gemm] -> modules; gemm in ("qkv", "o", "gate_up", "down")
    layers: list[dict[str, list[LoraModule]]]
    nbytes: int


def _get(t: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    return t.get(name)


def _cast(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype).contiguous()


def _cat(
    parts: list[torch.Tensor | None], device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise UnsupportedArchitectureError(
            "a block has biases on some of q/k/v (or gate/up) but not all"
        )
    return torch.cat([p.to(device=device, dtype=dtype) for p in parts], dim=0).contiguous()


def embed_block(block: Block, device: torch.device, dtype: torch.dtype) -> EmbedBlock:
    return EmbedBlock(
        block.fingerprint,
        Arch.of(block.spec.arch),
        _cast(block.tensors["embed_tokens.weight"], device, dtype),
    )


def head_block(
    block: Block, embed: EmbedBlock | None, device: torch.device, dtype: torch.dtype
) -> HeadBlock:
    tied = (
        bool(block.spec.extra.get("tied_embedding", False)) or "lm_head.weight" not in block.tensors
    )
    if tied:
        if embed is None:
            raise UnsupportedArchitectureError(
                f"head block {block.fingerprint} is tied but its chain has no embedding"
            )
        weight = embed.weight
    else:
        weight = _cast(block.tensors["lm_head.weight"], device, dtype)
    return HeadBlock(
        block.fingerprint,
        Arch.of(block.spec.arch),
        _cast(block.tensors["norm.weight"], device, dtype),
        weight,
        tied,
    )


def _fold(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """W diag(norm): columns scaled by the norm weight, rounded once to the weight dtype."""
    return (w.float() * norm.float()[None, :]).to(w.dtype).contiguous()


def layer_block(
    block: Block, device: torch.device, dtype: torch.dtype, fold_norms: bool = False
) -> LayerBlock:
    t = block.tensors
    n = block.spec.layer_end - block.spec.layer_start
    layers = []
    for i in range(n):
        p = f"{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(
            LayerWeights(
                ln1=_cast(t[p + "input_layernorm.weight"], device, dtype),
                w_qkv=_cat(
                    [t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]],
                    device,
                    dtype,
                ),
                b_qkv=_cat(
                    [
                        _get(t, a + "q_proj.bias"),
                        _get(t, a + "k_proj.bias"),
                        _get(t, a + "v_proj.bias"),
                    ],
                    device,
                    dtype,
                ),
                w_o=_cast(t[a + "o_proj.weight"], device, dtype),
                b_o=_cast(_get(t, a + "o_proj.bias"), device, dtype),
                ln2=_cast(t[p + "post_attention_layernorm.weight"], device, dtype),
                w_gate_up=_cat([t[m + "gate_proj.weight"], t[m + "up_proj.weight"]], device, dtype),
                b_gate_up=_cat(
                    [_get(t, m + "gate_proj.bias"), _get(t, m + "up_proj.bias")], device, dtype
                ),
                w_down=_cast(t[m + "down_proj.weight"], device, dtype),
                b_down=_cast(_get(t, m + "down_proj.bias"), device, dtype),
                q_norm=_cast(_get(t, a + "q_norm.weight"), device, dtype),
                k_norm=_cast(_get(t, a + "k_norm.weight"), device, dtype),
            )
        )
    for w in layers:
        if fold_norms and w.b_qkv is None and w.b_gate_up is None and w.q_norm is None:
            w.w_qkv, w.w_gate_up, w.folded = _fold(w.w_qkv, w.ln1), _fold(w.w_gate_up, w.ln2), True
    return LayerBlock(block.fingerprint, Arch.of(block.spec.arch), block.spec.layer_start, layers)


def _pattern_key(patterns: dict[str, Any], key: str) -> str:
    """peft's get_pattern_key: the first pattern that matches the end of the module name."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


# module -> (fused GEMM, column range in that GEMM's output as a function of the arch)
def _columns(module: str, arch: Arch) -> tuple[str, int, int]:
    q, kv, inter = arch.n_heads * arch.head_dim, arch.n_kv * arch.head_dim, arch.intermediate
    return {
        "self_attn.q_proj": ("qkv", 0, q),
        "self_attn.k_proj": ("qkv", q, q + kv),
        "self_attn.v_proj": ("qkv", q + kv, q + 2 * kv),
        "self_attn.o_proj": ("o", 0, arch.hidden),
        "mlp.gate_proj": ("gate_up", 0, inter),
        "mlp.up_proj": ("gate_up", inter, 2 * inter),
        "mlp.down_proj": ("down", 0, arch.hidden),
    }[module]


def lora_adapter(
    block: Block, base: LayerBlock, device: torch.device, dtype: torch.dtype
) -> LoraAdapter:
    """Scaling as peft: alpha / r (alpha / sqrt(r) with rslora), r and alpha from the patterns."""
    extra = block.spec.extra
    r0, alpha0 = extra["r"], extra["lora_alpha"]
    rank_pattern, alpha_pattern = extra.get("rank_pattern") or {}, extra.get("alpha_pattern") or {}
    rslora = bool(extra.get("use_rslora", False))
    n = block.spec.layer_end - block.spec.layer_start
    layers: list[dict[str, list[LoraModule]]] = [{} for _ in range(n)]
    for name, a in block.tensors.items():
        if not name.endswith(".lora_A"):
            continue
        stem = name[: -len(".lora_A")]
        rel, module = stem.split(".", 1)
        b = block.tensors[stem + ".lora_B"]
        key = f"model.layers.{block.spec.layer_start + int(rel)}.{module}"
        r = rank_pattern.get(_pattern_key(rank_pattern, key), r0)
        alpha = alpha_pattern.get(_pattern_key(alpha_pattern, key), alpha0)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        gemm, c0, c1 = _columns(module, base.arch)
        a = _cast(a, device, dtype)
        w = base.layers[int(rel)]
        if w.folded and gemm in (
            "qkv",
            "gate_up",
        ):  # A sees the un-normalised rows, like the base GEMM
            a = _fold(a, w.ln1 if gemm == "qkv" else w.ln2)
        layers[int(rel)].setdefault(gemm, []).append(
            LoraModule(a, _cast(b, device, dtype), float(scale), c0, c1)
        )
    nbytes = sum(_nbytes(m.a, m.b) for layer in layers for mods in layer.values() for m in mods)
    return LoraAdapter(block.fingerprint, base.fingerprint, layers, nbytes)
