"""Token choice for a step's sampled rows: greedy, temperature, top-k, top-p, seeds, logprobs.

Every row that samples draws one uniform number from its own request's CPU `torch.Generator`, so a
seeded request picks the same tokens whatever else shares its batch; the choice itself (inverse
CDF over the filtered distribution) runs batched on the device, with one device-to-host copy.
"""

from __future__ import annotations

import random

import torch

from ..types import SamplingParams

_seeds = random.SystemRandom()


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator for a sampling request (seeded if asked); None for greedy ones."""
    if params.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else _seeds.getrandbits(63))
    return g


def _filtered_choice(
    logits: torch.Tensor, params: list[SamplingParams], u: list[float]
) -> torch.Tensor:
    """Rows of logits (n, V) -> sampled token ids (n,) by inverse CDF of u over top-k/top-p."""
    n, V = logits.shape
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    x = logits.float() / temp[:, None]
    x, order = x.sort(dim=-1, descending=True)  # (n, V)
    ks = [p.top_k if p.top_k > 0 else V for p in params]
    if min(ks) < V:
        k = torch.tensor(ks, device=dev)
        x = x.masked_fill(torch.arange(V, device=dev)[None, :] >= k[:, None], float("-inf"))
    probs = x.softmax(dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)  # the first token always stays
    cdf = probs.cumsum(dim=-1)
    target = torch.tensor(u, dtype=torch.float32, device=dev) * cdf[:, -1]
    choice = (cdf < target[:, None]).sum(dim=-1).clamp_(max=V - 1)
    return order.gather(1, choice[:, None])[:, 0]


def sample(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    rows: list[int],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[float | None]]:
    """Tokens (and logprobs where asked) for the requests whose logits are rows `rows` of (S, V)."""
    if not rows:
        return [], []
    dev = logits.device
    idx = torch.tensor(rows, dtype=torch.int64).to(dev)
    tokens = greedy.index_select(0, idx)  # (n,)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        u = [float(torch.rand((), generator=generators[i])) for i in drawn]
        picked = _filtered_choice(logits.index_select(0, idx[drawn]), [params[i] for i in drawn], u)
        tokens = tokens.clone()
        tokens[drawn] = picked
    want_lp = [i for i, p in enumerate(params) if p.logprobs]
    if not want_lp:
        return tokens.tolist(), [None] * len(rows)
    sel = torch.tensor(want_lp, dtype=torch.int64).to(dev)
    lp = logits.index_select(0, idx[sel]).float().log_softmax(dim=-1)
    lp = lp.gather(1, tokens[sel][:, None])[:, 0]
    both = torch.cat([tokens.double(), lp.double()]).tolist()  # one device-to-host copy
    toks = [int(t) for t in both[: len(rows)]]
    out: list[float | None] = [None] * len(rows)
    for i, v in zip(want_lp, both[len(rows) :], strict=True):
        out[i] = v
    return toks, out
