"""The reference every correctness test compares with: transformers (and peft) themselves."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM


@functools.lru_cache(maxsize=16)
def _load(path: str, base: str | None, dtype: torch.dtype):
    if base is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), path).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def reference_model(member, family, dtype: torch.dtype = torch.float32):
    """What transformers (with peft for adapters) loads from a family member's directory."""
    return _load(str(member.path), str(family.base) if member.is_adapter else None, dtype)


def greedy(model, prompt_ids: list[int], n: int, pad_token_id: int | None = None) -> list[int]:
    """transformers' greedy generate for one prompt; the new token ids."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=n, do_sample=False, pad_token_id=pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def greedy_refs(family, tok, prompts: list[str], n: int) -> dict[tuple[str, int], list[int]]:
    """transformers' greedy continuation of every prompt, per family member: {(model key, i): ids}."""
    from blockllm.demo import members

    out = {}
    for m in members(family):
        model = reference_model(m, family)
        for i, p in enumerate(prompts):
            out[(m.key, i)] = greedy(model, tok(p)["input_ids"], n, tok.pad_token_id)
    return out


def agrees(out, ref) -> bool:
    """An output of a request that ran with ignore_eos equals transformers' greedy tokens up to
    transformers' EOS (or to the output's own length, where that is shorter)."""
    n = min(len(out.token_ids), len(ref))
    return list(out.token_ids)[:n] == list(ref)[:n]
