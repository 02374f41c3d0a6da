"""Small random Llama models straight into a zoo, for graph, planner and equivalence tests.

Models are real `transformers` Llama checkpoints (random init, seeded), cut by the Llama family and
stored like any ingest would; fine-tunes are copies with some decoder layers perturbed.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blockllm.families import get_family
from zoo_store import BlockSpec, Manifest, TensorSpec, Zoo, fingerprint


def tiny_config(*, hidden: int = 16, layers: int = 4, vocab: int = 64, **kw) -> dict:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **kw,
    )
    d = cfg.to_dict()
    d.pop("transformers_version", None)
    return d


def random_state(config: dict, seed: int) -> dict[str, torch.Tensor]:
    from blockllm.families.llama import hf_config

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(config))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(
    state: dict[str, torch.Tensor], layers: list[int], scale: float, seed: int
) -> dict[str, torch.Tensor]:
    """A 'fine-tune': the given decoder layers' matrices moved by `scale` of their own norm."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, t in state.items():
        if t.dim() >= 2 and any(key.startswith(f"model.layers.{i}.") for i in layers):
            noise = torch.randn(t.shape, generator=gen)
            out[key] = t + scale * noise * (t.norm() / noise.norm())
    return out


def add_model(
    zoo: Zoo,
    tenant: str,
    name: str,
    config: dict,
    state: dict[str, torch.Tensor],
    *,
    visibility: str = "private",
    base: str | None = None,
    error_budget: float = 0.0,
    family: str = "llama",
    tokenizer: str | None = None,
) -> Manifest:
    parts = get_family("llama").partition(config, dict(state), 1)
    fps = []
    for p in parts:
        spec = (
            p.spec
            if family == "llama"
            else BlockSpec(
                p.spec.kind,
                family,
                p.spec.arch,
                p.spec.layer_start,
                p.spec.layer_end,
                p.spec.tensors,
                p.spec.extra,
            )
        )
        fps.append(zoo.put_block(spec, p.tensors, fp=fingerprint(spec, p.tensors)))
    manifest = Manifest(
        tenant=tenant,
        name=name,
        family=family,
        chain=tuple(fps),
        config=config,
        visibility=visibility,
        base=base,
        error_budget=error_budget,
        tokenizer=tokenizer,
    )
    zoo.put_manifest(manifest, overwrite=True)
    return manifest


def synthetic_zoo(
    zoo: Zoo,
    *,
    bases: int,
    tunes_per_base: int = 1,
    layers: int = 8,
    tuned_layers: int = 3,
    scale: float = 0.05,
    seed: int = 0,
) -> list[Manifest]:
    """`bases` unrelated random models (shared, tenant platform) and fine-tunes of each (private, acme)."""
    cfg = tiny_config(layers=layers)
    out = []
    for b in range(bases):
        state = random_state(cfg, seed + b)
        out.append(add_model(zoo, "platform", f"base{b}", cfg, state, visibility="shared"))
        for t in range(tunes_per_base):
            tuned = perturb(
                state, list(range(layers - tuned_layers, layers)), scale, seed=10_000 + 100 * b + t
            )
            out.append(add_model(zoo, "acme", f"tune{b}-{t}", cfg, tuned, base=f"platform/base{b}"))
    return out


def fake_fp(i: int) -> str:
    return f"{i:064x}"


def fake_spec(
    kind: str, start: int, end: int, *, hidden: int = 8, family: str = "llama"
) -> BlockSpec:
    """A spec without tensors behind it (graph and planner tests need no weights)."""
    return BlockSpec(
        kind,
        family,
        {"hidden_size": hidden},
        start,
        end,
        (TensorSpec("w", (hidden, hidden), "float32"),),
    )
