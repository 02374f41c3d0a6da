"""Token sampling per request: greedy, temperature, top-k, top-p, with a seeded generator each."""

from __future__ import annotations

import torch

from ..types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else torch.seed() % (2**63))
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits (B, V) -> one token per row, and its log-probability under the unfiltered distribution."""
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    tokens = [0] * len(params)
    if greedy:
        picked = logits[greedy].argmax(dim=-1).tolist()
        for i, t in zip(greedy, picked):
            tokens[i] = t
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            cut = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
            row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(row, dim=-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    lps = logprobs_all[torch.arange(len(tokens)), torch.tensor(tokens, device=logits.device)].tolist()
    return tokens, lps
