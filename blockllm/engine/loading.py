"""Loading models into the engine: each distinct block instance once, shared by every chain using it.

A model's chain becomes a request class (its blocks and adapters); models of one width, vocabulary
and KV geometry share a lane (one hidden-state tensor per step) and a KV page pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from zoo_store import Manifest

from .. import config as _config
from ..exceptions import UnsupportedArchitectureError
from . import ops
from .forward import Lane
from .kv_cache import KVPool, auto_pages
from .plan import ModelClass
from .prefetch import L2Prefetcher
from .rope import cos_sin_table
from .weights import (
    Arch,
    LayerBlock,
    LoraAdapter,
    embed_block,
    head_block,
    layer_block,
    lora_adapter,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    manifest: Manifest
    cls: ModelClass
    lane: Lane
    block_fps: tuple[str, ...]  # distinct fingerprints it runs through (limits, stats)
    path: tuple[str, ...]  # chain with each adapter after its base block (RequestOutput.blocks)
    tokenizer: Any
    eos: frozenset[int]
    vocab: int  # valid prompt ids: [0, vocab)
    context: int


def _context(arch: dict[str, Any], max_model_len: int) -> int:
    n = min(max_model_len, int(arch.get("max_position_embeddings") or max_model_len))
    window = arch.get("sliding_window")
    if window and (arch.get("use_sliding_window") or arch.get("model_type") == "mistral"):
        n = min(n, int(window))  # beyond the window the math differs; never serve past it
    return n


class ModelLoading:
    """Engine methods that load and unload models (the Engine owns the state they use)."""

    def load(self, model: str | Manifest) -> Manifest:
        """Load a model's blocks and adapters, each distinct fingerprint once per engine; idempotent."""
        manifest = model if isinstance(model, Manifest) else self._manifest(model)
        if manifest.key in self.models:
            return manifest
        if manifest.family != "llama":
            raise UnsupportedArchitectureError(
                f"the block engine runs the llama family, not {manifest.family!r}"
            )
        specs = [self.zoo.block_spec(fp) for fp in manifest.chain]
        kinds = [s.kind for s in specs]
        if (
            len(kinds) < 3
            or kinds[0] != "embed"
            or kinds[-1] != "head"
            or set(kinds[1:-1]) != {"layers"}
        ):
            raise UnsupportedArchitectureError(
                f"model {manifest.key}: chain {kinds} is not embed, layers..., head"
            )
        expect = 0
        for s in specs[1:-1]:
            if s.layer_start != expect:
                raise UnsupportedArchitectureError(
                    f"model {manifest.key}: layer blocks do not cover layers in order"
                )
            expect = s.layer_end
        with torch.inference_mode():
            keys = [
                self._instance(fp, spec, manifest.chain[0])
                for fp, spec in zip(manifest.chain, specs, strict=True)
            ]
            adapters: dict[int, LoraAdapter] = {}
            for ref in manifest.adapters:
                base = self.instances[keys[ref.index]]
                if not isinstance(base, LayerBlock):
                    raise UnsupportedArchitectureError(
                        f"adapter {ref.fingerprint} attaches to a {specs[ref.index].kind} block"
                    )
                if ref.fingerprint not in self.adapters:
                    self.adapters[ref.fingerprint] = lora_adapter(
                        self.zoo.get_block(ref.fingerprint), base, self.device, self.dtype
                    )
                self._refs[ref.fingerprint] += 1
                adapters[ref.index - 1] = self.adapters[ref.fingerprint]
        embed, head = self.instances[keys[0]], self.instances[keys[-1]]
        layers = [self.instances[k] for k in keys[1:-1]]
        n_layers = expect
        lanes_before = len(self.lanes)
        lane = self._lane(embed.arch, head.weight.shape[0], n_layers)
        new_lane = len(self.lanes) > lanes_before
        cls_key = (tuple(keys), tuple(sorted((i, a.fingerprint) for i, a in adapters.items())))
        cls = self._classes.get(cls_key)
        if cls is None:
            cls = self._classes[cls_key] = ModelClass(
                cls_key, lane.key, embed, layers, head, keys[-1], adapters, n_layers
            )
            if adapters:  # the stacked adapters of its blocks change (segment graphs)
                self._reset_step_graphs()
        path: list[str] = []
        for i, fp in enumerate(manifest.chain):
            path.append(fp)
            path.extend(a.fingerprint for a in manifest.adapters if a.index == i)
        tokenizer = self._tokenizer(manifest)
        eos = manifest.config.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if not eos_ids and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids = {tokenizer.eos_token_id}
        self.models[manifest.key] = LoadedModel(
            manifest,
            cls,
            lane,
            tuple(dict.fromkeys(manifest.chain)),
            tuple(path),
            tokenizer,
            frozenset(eos_ids),
            int(embed.weight.shape[0]),
            _context({**manifest.config, **specs[1].arch}, self.max_model_len),
        )
        log.info("loaded %s: %d blocks, %d adapters", manifest.key, len(keys), len(adapters))
        if new_lane and self.device.type == "cuda" and _config.get("engine.warmup", True):
            self.warmup()  # Triton compiles now, at load, instead of in front of the first requests
        return manifest

    def _manifest(self, key: str) -> Manifest:
        tenant, _, name = str(key).partition("/")
        return self.zoo.get_manifest(tenant, name)

    def _instance(self, fp: str, spec: Any, embed_fp: str) -> str:
        """Load one block instance unless loaded; its key (a tied head's names its embedding too)."""
        key = fp
        if spec.kind == "head" and (
            spec.extra.get("tied_embedding")
            or not any(t.name == "lm_head.weight" for t in spec.tensors)
        ):
            key = f"{fp}@{embed_fp}"
        if key not in self.instances:
            block = self.zoo.get_block(fp)
            if spec.kind == "embed":
                self.instances[key] = embed_block(block, self.device, self.dtype)
            elif spec.kind == "layers":
                self.instances[key] = layer_block(
                    block, self.device, self.dtype, fold_norms=self.fold_norms
                )
            else:
                self.instances[key] = head_block(
                    block, self.instances.get(embed_fp), self.device, self.dtype
                )
        self._refs[key] += 1
        return key

    def _tokenizer(self, manifest: Manifest) -> Any:
        if manifest.tokenizer is None or not hasattr(self.zoo, "get_asset"):
            return None
        from ..chain import load_tokenizer

        try:
            return load_tokenizer(self.zoo, manifest)
        except Exception as e:  # a model still serves token ids without its tokenizer
            log.warning(
                "model %s: tokenizer unavailable (%s); no text or stop strings", manifest.key, e
            )
            return None

    def _lane(self, arch: Arch, vocab: int, n_layers: int) -> Lane:
        pool_key = (arch.n_kv, arch.head_dim)
        pool = self.pools.get(pool_key)
        if pool is None:
            page_bytes = (
                2
                * self.page_size
                * arch.n_kv
                * arch.head_dim
                * torch.empty((), dtype=self.dtype).element_size()
            )
            wanted = (
                8 * self.max_batch_size * n_layers * -(-self.max_model_len // self.page_size) + 1
            )
            pages = (
                self.kv_pages
                if self.kv_pages != "auto"
                else auto_pages(self.device, page_bytes, wanted)
            )
            pool = self.pools[pool_key] = KVPool(
                int(pages),
                self.page_size,
                n_layers,
                arch.n_kv,
                arch.head_dim,
                self.max_model_len,
                self.dtype,
                self.device,
                slots=max(8, 4 * self.max_batch_size),  # growing it later recaptures every graph
            )
            log.info(
                "KV pool %s: %d pages of %d tokens (%.1f MiB)",
                pool_key,
                pool.num_pages,
                self.page_size,
                pool.num_pages * pool.page_bytes / 2**20,
            )
        pool.ensure_layers(n_layers)
        key = (*pool_key, arch.hidden, vocab, arch.rope_key)
        lane = self.lanes.get(key)
        if lane is None:
            table = cos_sin_table(arch.raw, arch.head_dim, max(self.max_model_len, 1), self.device)
            lane = self.lanes[key] = Lane(
                key, pool, table, arch.hidden, vocab, self.dtype, self.device, self.tune_kernels,
                self._prefetcher(), self.gemv, self.gemv_fuse,
            )  # fmt: skip
        return lane

    def _prefetcher(self) -> L2Prefetcher:
        """A lane's L2 prefetcher (engine.l2-prefetch): inert when off, or without the Triton kernels."""
        if self.l2_prefetch == "off" or not ops.fused_on(self.device):
            return L2Prefetcher()
        return L2Prefetcher(
            self.device, self.l2_prefetch, self.l2_prefetch_bytes, self.dtype, self.l2_prefetch_programs
        )

    def unload(self, model: str | Manifest) -> None:
        """Forget a model (its requests are aborted); blocks no other loaded model uses are freed."""
        key = model.key if isinstance(model, Manifest) else str(model)
        m = self.models.pop(key, None)
        if m is None:
            return
        for seq in [s for s in self.scheduler.all() if s.model is m]:
            self.abort(seq.req.request_id)
        for k in [*m.cls.block_keys(), *(a.fingerprint for a in m.cls.adapters.values())]:
            self._refs[k] -= 1
            if self._refs[k] <= 0:
                self.instances.pop(k, None)
                self.adapters.pop(k, None)
                del self._refs[k]
        if not any(other.cls is m.cls for other in self.models.values()):
            self._classes.pop(m.cls.key, None)
        self._drop_captures()
