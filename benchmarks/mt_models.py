"""Synthetic multi-tenant model sets: one Llama-shaped base and its variants (LoRA adapters, partial
and full fine-tunes), random weights made on the device only when a block is read.

Nothing is held but specs: `SyntheticSource.get_block` draws a block's tensors from a seed derived
from its name, so an 8B set (about 100 GB of distinct blocks) is never in memory twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from benchmarks.engine_decode import Shape
from blockllm.engine.source import TensorSource, make_spec
from blockllm.engine.weights import embed_block, head_block, layer_block
from blockllm.families.llama import arch_of
from zoo_store import AdapterRef, Block, BlockNotFoundError, BlockSpec, Manifest

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & ((1 << 63) - 1)


class SyntheticSource(TensorSource):
    """TensorSource's read methods over synthetic blocks: a block's tensors are drawn when read."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()  # its manifests; blocks are kept here as specs and seeds only
        self.device, self.dtype = device, dtype
        self._specs: dict[str, BlockSpec] = {}
        self._makers: dict[str, tuple[str, Any]] = {}  # fp -> (seed name, tensor shapes maker)

    def add_block(self, name: str, spec: BlockSpec, shapes: dict[str, tuple[tuple[int, ...], str]]) -> str:
        fp = hashlib.sha256(f"synthetic-block\0{name}".encode()).hexdigest()
        self._specs[fp] = spec
        self._makers[fp] = (name, shapes)
        return fp

    def block_spec(self, fp: str) -> BlockSpec:
        try:
            return self._specs[fp]
        except KeyError:
            raise BlockNotFoundError(fp) from None

    def get_block(self, fp: str, *, device: Any = None, verify: bool | None = None) -> Block:
        spec = self.block_spec(fp)
        name, shapes = self._makers[fp]
        g = torch.Generator(device=self.device).manual_seed(_seed(name))
        tensors = {}
        for tname, (shape, init) in shapes.items():
            if init == "ones":
                tensors[tname] = torch.ones(shape, device=self.device, dtype=self.dtype)
            else:  # small normal weights: hidden states stay finite through any depth
                t = torch.empty(shape, device=self.device, dtype=self.dtype)
                tensors[tname] = t.normal_(0.0, 0.02, generator=g)
        return Block(fp, spec, tensors)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "lora" | "partial" | "full"
    manifest: Manifest


class ModelSet:
    """A base and `n_lora` + `n_partial` + `n_full` variants of it, registered in a SyntheticSource.

    LoRA: rank `lora_rank` on q/k/v/o of every layer, over the base. Partial: the last quarter of the
    layers replaced (embedding, other layers and head are the base's). Full: every block its own.
    """

    def __init__(self, shape: Shape, source: SyntheticSource, *, tenant: str = "mt", n_lora: int = 6, n_partial: int = 6,
                 n_full: int = 4, lora_rank: int = 16, max_positions: int = 4096) -> None:  # fmt: skip
        self.shape, self.source, self.tenant, self.lora_rank = shape, source, tenant, lora_rank
        self.config = shape.config(max_positions)
        self.arch = arch_of(self.config)
        self.partial_layers = max(1, round(shape.layers / 4))
        base = self._chain(f"{tenant}/base", own_from=0, own_ends=True)
        self.base_chain = base
        self.variants: list[Variant] = []
        for i in range(n_lora):
            adapters = tuple(
                AdapterRef(1 + layer, self._adapter(f"{tenant}/lora-{i}/adapter{layer}", layer, base[1 + layer]))
                for layer in range(shape.layers)
            )
            self._add(f"lora-{i}", "lora", base, adapters)
        for i in range(n_partial):
            own = self._chain(f"{tenant}/partial-{i}", own_from=shape.layers - self.partial_layers, own_ends=False)
            chain = base[: 1 + shape.layers - self.partial_layers] + own[1 + shape.layers - self.partial_layers : -1] + base[-1:]
            self._add(f"partial-{i}", "partial", chain)
        for i in range(n_full):
            self._add(f"full-{i}", "full", self._chain(f"{tenant}/full-{i}", own_from=0, own_ends=True))

    # ------------------------------------------------------------------ building
    def _layer_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        s = self.shape
        d = s.hidden // s.heads
        kv = s.kv_heads * d
        return {
            "0.input_layernorm.weight": ((s.hidden,), "ones"),
            "0.post_attention_layernorm.weight": ((s.hidden,), "ones"),
            "0.self_attn.q_proj.weight": ((s.heads * d, s.hidden), "normal"),
            "0.self_attn.k_proj.weight": ((kv, s.hidden), "normal"),
            "0.self_attn.v_proj.weight": ((kv, s.hidden), "normal"),
            "0.self_attn.o_proj.weight": ((s.hidden, s.heads * d), "normal"),
            "0.mlp.gate_proj.weight": ((s.intermediate, s.hidden), "normal"),
            "0.mlp.up_proj.weight": ((s.intermediate, s.hidden), "normal"),
            "0.mlp.down_proj.weight": ((s.hidden, s.intermediate), "normal"),
        }

    def _spec(self, kind: str, start: int, end: int, shapes: dict, **extra: Any) -> BlockSpec:
        meta = {n: torch.empty(shape, device="meta", dtype=self.source.dtype) for n, (shape, _) in shapes.items()}
        return make_spec(kind, self.arch, start, end, meta, **extra)

    def _chain(self, prefix: str, own_from: int, own_ends: bool) -> tuple[str, ...]:
        """embed, layers, head of a model named `prefix` (only blocks it owns are meaningful)."""
        s, src = self.shape, self.source
        embed = {"embed_tokens.weight": ((s.vocab, s.hidden), "normal")}
        head = {"norm.weight": ((s.hidden,), "ones"), "lm_head.weight": ((s.vocab, s.hidden), "normal")}
        chain = [src.add_block(f"{prefix}/embed", self._spec("embed", 0, 0, embed), embed) if own_ends else ""]
        for i in range(s.layers):
            shapes = self._layer_shapes()
            chain.append(src.add_block(f"{prefix}/layer{i}", self._spec("layers", i, i + 1, shapes), shapes) if i >= own_from else "")
        chain.append(src.add_block(f"{prefix}/head", self._spec("head", s.layers, s.layers, head, tied_embedding=False), head) if own_ends else "")
        return tuple(chain)

    def _adapter(self, name: str, layer: int, base_fp: str) -> str:
        s, r = self.shape, self.lora_rank
        d = s.hidden // s.heads
        out = {"q_proj": s.heads * d, "k_proj": s.kv_heads * d, "v_proj": s.kv_heads * d, "o_proj": s.hidden}
        inp = {"q_proj": s.hidden, "k_proj": s.hidden, "v_proj": s.hidden, "o_proj": s.heads * d}
        shapes = {}
        for m in LORA_MODULES:
            shapes[f"0.self_attn.{m}.lora_A"] = ((r, inp[m]), "normal")
            shapes[f"0.self_attn.{m}.lora_B"] = ((out[m], r), "normal")
        extra = {"base": base_fp, "r": r, "lora_alpha": 2 * r, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                 "target_modules": [f"self_attn.{m}" for m in LORA_MODULES], "hidden_size": s.hidden}  # fmt: skip
        return self.source.add_block(name, self._spec("adapter", layer, layer + 1, shapes, **extra), shapes)

    def _add(self, name: str, kind: str, chain: tuple[str, ...], adapters: tuple[AdapterRef, ...] = ()) -> None:
        m = Manifest(tenant=self.tenant, name=name, family="llama", chain=chain, config=self.config, adapters=adapters,
                     visibility="shared", base=f"{self.tenant}/base")  # fmt: skip
        self.source.put_manifest(m)
        self.variants.append(Variant(name, kind, m))

    # ------------------------------------------------------------------ sizes
    def fingerprints(self, variants: list[Variant] | None = None) -> list[str]:
        seen: dict[str, None] = {}
        for v in variants if variants is not None else self.variants:
            for fp in (*v.manifest.chain, *(a.fingerprint for a in v.manifest.adapters)):
                seen[fp] = None
        return list(seen)

    def distinct_bytes(self, variants: list[Variant] | None = None) -> int:
        return sum(self.source.block_spec(fp).nbytes for fp in self.fingerprints(variants))

    def model_bytes(self) -> int:
        """One full copy of a model (no adapters)."""
        return sum(self.source.block_spec(fp).nbytes for fp in self.base_chain)

    # ------------------------------------------------------------------ views of one variant
    def merged_blocks(self, v: Variant) -> Iterator[Block]:
        """The variant's chain as plain blocks, LoRA deltas merged into the base weights."""
        by_index = {a.index: a.fingerprint for a in v.manifest.adapters}
        for i, fp in enumerate(v.manifest.chain):
            block = self.source.get_block(fp)
            if i in by_index:
                ad = self.source.get_block(by_index[i])
                scale = ad.spec.extra["lora_alpha"] / ad.spec.extra["r"]
                tensors = dict(block.tensors)
                for m in LORA_MODULES:
                    a, b = ad.tensors[f"0.self_attn.{m}.lora_A"], ad.tensors[f"0.self_attn.{m}.lora_B"]
                    w = tensors[f"0.self_attn.{m}.weight"]
                    tensors[f"0.self_attn.{m}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
                block = Block(block.fingerprint, block.spec, tensors)
            yield block

    def hf_state_dict(self, v: Variant) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for b in self.merged_blocks(v):
            if b.spec.kind == "embed":
                sd["model.embed_tokens.weight"] = b.tensors["embed_tokens.weight"]
            elif b.spec.kind == "layers":
                for name, t in b.tensors.items():
                    sd[f"model.layers.{b.spec.layer_start}.{name.split('.', 1)[1]}"] = t
            else:
                sd["model.norm.weight"] = b.tensors["norm.weight"]
                sd["lm_head.weight"] = b.tensors["lm_head.weight"]
        return sd

    def fused_host_copy(self, v: Variant, fold_norms: bool, pin: bool) -> list[torch.Tensor]:
        """The variant's weights in the engine's fused layout, in host memory (pinned on CUDA):
        what a per-model server keeps off the GPU to reload an evicted model from."""
        out: list[torch.Tensor] = []
        embed = None
        for b in self.merged_blocks(v):
            if b.spec.kind == "embed":
                embed = inst = embed_block(b, self.source.device, self.source.dtype)
            elif b.spec.kind == "layers":
                inst = layer_block(b, self.source.device, self.source.dtype, fold_norms=fold_norms)
            else:
                inst = head_block(b, embed, self.source.device, self.source.dtype)
            for t in instance_tensors(inst):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                host.copy_(t)
                out.append(host)
        return out


def instance_tensors(inst: Any) -> list[torch.Tensor]:
    """A loaded block instance's tensors in a fixed order (embedding, each layer's fields, head)."""
    if hasattr(inst, "layers"):
        return [getattr(w, f.name) for w in inst.layers for f in fields(w) if isinstance(getattr(w, f.name), torch.Tensor)]
    if hasattr(inst, "norm"):
        return [inst.norm] + ([] if inst.tied else [inst.weight])
    return [inst.weight]


def model_tensors(engine: Any, key: str) -> list[torch.Tensor]:
    """The device tensors of a loaded model's chain (no adapters), in `instance_tensors` order."""
    cls = engine.models[key].cls
    out = instance_tensors(cls.embed)
    for lb in cls.layers:
        out.extend(instance_tensors(lb))
    out.extend(instance_tensors(cls.head))
    return out


def write_zoo(ms: ModelSet, zoo: Any, variants: list[Variant]) -> list[Manifest]:
    """Store the variants' blocks in a real zoo (content fingerprints) and publish their manifests."""
    fps: dict[str, str] = {}
    for fp in ms.fingerprints(variants):
        spec = ms.source.block_spec(fp)
        if spec.kind == "adapter":
            continue  # after their base blocks: an adapter's spec names its base's fingerprint
        block = ms.source.get_block(fp)
        fps[fp] = zoo.put_block(spec, {k: t.cpu() for k, t in block.tensors.items()})
        del block
    for fp in ms.fingerprints(variants):
        spec = ms.source.block_spec(fp)
        if spec.kind == "adapter":
            extra = dict(spec.extra, base=fps[spec.extra["base"]])
            spec = BlockSpec(spec.kind, spec.family, spec.arch, spec.layer_start, spec.layer_end, spec.tensors, extra)
            fps[fp] = zoo.put_block(spec, {k: t.cpu() for k, t in ms.source.get_block(fp).tensors.items()})
    out = []
    for v in variants:
        m = v.manifest
        real = Manifest(tenant=m.tenant, name=m.name, family=m.family, chain=tuple(fps[f] for f in m.chain), config=m.config,
                        adapters=tuple(AdapterRef(a.index, fps[a.fingerprint]) for a in m.adapters), visibility=m.visibility)  # fmt: skip
        zoo.put_manifest(real)
        out.append(real)
    return out


__all__ = ["ModelSet", "Shape", "SyntheticSource", "Variant", "instance_tensors", "model_tensors", "write_zoo"]
