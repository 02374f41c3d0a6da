"""Probe sets and single-block forwards for the equivalence job.

A probe set is a fixed (rows, tokens) matrix of token ids: the probe prompts, tokenized with the
anchor model's tokenizer and packed back to back (no padding, so every position is a real
next-token prediction). `BlockRunner` runs one block of a chain on recorded inputs with the
family's own `transformers` modules (SDPA causal attention, the model's rotary embedding), so a
chain run block by block reproduces the assembled model's logits (tests check this).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from blockllm.families.llama import hf_config
from zoo_store import Block

# Generic text for models that meet no probe prompts of their own: prose, digits, letters, chat.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "count: 1 2 3 4 5 6 7 8 9 10",
    "3 + 4 = 7 and 9 - 5 = 4",
    "user: what is the sky?\nassistant: the sky is blue.",
    "letters: a b c d e f g",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b",
    "Once upon a time there was a small village by the sea.",
    "the snow is white. the grass is green. the coal is black.",
    "Water boils at 100 degrees Celsius at sea level.",
    "word: h e l l o",
    "Please summarise the following paragraph in one sentence.",
    "case: a A b B c C",
    "In 1969 the first humans walked on the Moon.",
    "next number after 41 is 42",
    "I think, therefore I am.",
)


@dataclass(frozen=True)
class ProbeSet:
    """Token ids (rows, tokens) every block of one architecture is probed with; `id` names it."""

    id: str
    ids: torch.Tensor  # (N, T) int64

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)  # type: ignore[return-value]


def make_probe_set(
    prompts: Sequence[str] | None,
    *,
    tokenizer: Any | None,
    vocab_size: int,
    rows: int,
    tokens: int,
    seed: int = 0,
) -> ProbeSet:
    """Pack the prompts' tokens into (rows, tokens); without a tokenizer, seeded random token ids."""
    if tokenizer is not None:
        stream: list[int] = []
        for p in prompts or DEFAULT_PROMPTS:
            stream += list(tokenizer(p)["input_ids"])
        if not stream:
            raise ValueError("the probe prompts tokenize to nothing")
        need = rows * tokens
        stream = (stream * (need // len(stream) + 1))[:need]
        ids = torch.tensor(stream, dtype=torch.long).view(rows, tokens)
        source: Any = [
            list(prompts or DEFAULT_PROMPTS),
            tokenizer.name_or_path if hasattr(tokenizer, "name_or_path") else "",
        ]
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (rows, tokens), generator=gen)
        source = ["random", seed]
    digest = hashlib.sha256(json.dumps([source, ids.tolist()]).encode()).hexdigest()[:16]
    return ProbeSet(f"probe-{digest}", ids.clamp_(0, vocab_size - 1))


class BlockRunner:
    """Forwards of single blocks of one architecture (a Llama-family config dict), in float32."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = hf_config(config)
        cfg._attn_implementation = "sdpa"  # causal attention without a mask
        self.cfg = cfg
        self.tied = bool(config.get("tie_word_embeddings", False))
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg)
        self._layer_cls = type(skeleton.model.layers[0])
        self._norm_cls = type(skeleton.model.norm)
        self._rotary = type(skeleton.model.rotary_emb)(config=cfg)
        self._rope: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _position_embeddings(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t = h.shape[:2]
        if (n, t) not in self._rope:
            pos = torch.arange(t).unsqueeze(0).expand(n, t)
            self._rope[(n, t)] = self._rotary(h, pos)
        return self._rope[(n, t)]

    @torch.no_grad()
    def run(
        self, block: Block, x: torch.Tensor, *, embed_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """embed: ids (N,T) -> h (N,T,H); layers: h -> h; head: h -> logits (N,T,V)."""
        kind, t = block.spec.kind, {k: v.float() for k, v in block.tensors.items()}
        if kind == "embed":
            return F.embedding(x, t["embed_tokens.weight"])
        if kind == "layers":
            position_embeddings = self._position_embeddings(x)
            h = x.float()
            for i in range(block.spec.layer_end - block.spec.layer_start):
                with torch.device("meta"):
                    layer = self._layer_cls(self.cfg, layer_idx=block.spec.layer_start + i)
                prefix = f"{i}."
                layer.load_state_dict(
                    {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}, assign=True
                )
                layer.eval()
                h = layer(h, attention_mask=None, position_embeddings=position_embeddings)
                h = h[0] if isinstance(h, tuple) else h
            return h
        if kind == "head":
            with torch.device("meta"):
                norm = self._norm_cls(self.cfg.hidden_size, eps=self.cfg.rms_norm_eps)
            norm.load_state_dict({"weight": t["norm.weight"]}, assign=True)
            w = t.get("lm_head.weight")
            if w is None:
                if embed_weight is None:
                    raise ValueError("a tied head needs the chain's embedding weight")
                w = embed_weight.float()
            return F.linear(norm(x.float()), w)
        raise ValueError(f"cannot run a block of kind {kind!r} on its own")

    def run_chain(
        self, blocks: Sequence[Block], ids: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Inputs of every block of the chain (index 0: the ids) and the final logits."""
        embed = _embed_weight(blocks)
        inputs: list[torch.Tensor] = []
        x: torch.Tensor = ids
        for b in blocks:
            inputs.append(x)
            x = self.run(b, x, embed_weight=embed)
        return inputs, x

    def run_from(self, blocks: Sequence[Block], index: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of the chain run from block `index` on `x` (that block's input)."""
        embed = _embed_weight(blocks)
        for b in blocks[index:]:
            x = self.run(b, x, embed_weight=embed)
        return x


def _embed_weight(blocks: Sequence[Block]) -> torch.Tensor | None:
    for b in blocks:
        if b.spec.kind == "embed":
            return b.tensors["embed_tokens.weight"]
    return None


@torch.no_grad()
def next_token_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference || candidate) over all positions (nats) and top-1 agreement."""
    ref = F.log_softmax(reference.float(), dim=-1)  # (N, T, V)
    cand = F.log_softmax(candidate.float(), dim=-1)
    kl_rows = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0).mean(-1)  # (N,) per probe sequence
    n = kl_rows.numel()
    sem = float(kl_rows.std() / n**0.5) if n > 1 else 0.0
    agree = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    kl = float(kl_rows.mean())
    return {"kl": kl, "kl_sem": sem, "kl_ucb": kl + 2.0 * sem, "agreement": float(agree)}


__all__ = ["DEFAULT_PROMPTS", "BlockRunner", "ProbeSet", "make_probe_set", "next_token_metrics"]
