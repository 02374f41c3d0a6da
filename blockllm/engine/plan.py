"""A step's batch layout: rows per request class, the rows each block instance runs, the inputs.

Requests whose chains (and adapters) are identical form a class; classes are laid out one after
another, so a block shared by several classes sees one run of rows (a slice) whenever those
classes are adjacent, and a gathered index otherwise. A decode layout pads each class to a bucket
size; the structure then depends only on (class, bucket) pairs and can be captured as a graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .weights import EmbedBlock, HeadBlock, LayerBlock, LoraAdapter

Rows = slice | torch.Tensor  # a run of rows, or gathered row indices (int64, on the device)

# at most 1/8 padding past 64 rows; the large ones hold prefill chunks (one row a token)
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
           320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096)  # fmt: skip


def bucket(n: int) -> int:
    """The row count a captured batch of n rows is padded to."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // 512) * 512


@dataclass(eq=False)
class ModelClass:
    """Requests that run through the same blocks: one embedding, layer runs, head, adapters."""

    key: tuple
    lane: tuple  # models of one lane share hidden states: (n_kv, head_dim, hidden, vocab)
    embed: EmbedBlock | None  # None: a later segment of a split chain (segment.py)
    layers: list[LayerBlock]
    head: HeadBlock | None  # None: an earlier segment of a split chain
    head_key: str  # the head's instance key (a tied head is one per embedding)
    adapters: dict[int, LoraAdapter] = field(
        default_factory=dict
    )  # position in `layers` -> adapter
    n_layers: int = 0

    def block_keys(self) -> list[str]:
        return [self.embed.fingerprint, *(b.fingerprint for b in self.layers), self.head_key]


@dataclass
class Item:
    """One request's share of a step: tokens [start, start + n) of its sequence."""

    tokens: list[int]
    start: int
    slot: int  # its row in the KV block table
    samples: bool  # the last row's logits pick its next token


@dataclass
class Stage:
    """One block instance's work in a step: which rows, which LoRA segments, how they attend."""

    block: EmbedBlock | LayerBlock | HeadBlock
    key: str
    rows: Rows
    n: int
    lora: list[tuple[LoraAdapter, Rows]] = field(default_factory=list)  # rows relative to `rows`
    decode: Rows | None = None  # relative rows that attend as single queries (paged decode)
    prefill: list[tuple[int, int, int, int]] = field(default_factory=list)  # (row, n, ctx, slot)
    positions: torch.Tensor | None = None  # (n,) this stage's rows of the step inputs, set per run
    slot_ids: torch.Tensor | None = None
    # segment graphs (stepgraphs.py): every adapter of the block stacked per layer, masked per row
    dense: list | None = None
    lora_slots: torch.Tensor | None = None  # (n,) each row's LoRA slot (0: none)


@dataclass
class Plan:
    """Everything one forward of a lane needs; for a captured decode graph, all of it is static."""

    lane: tuple
    n_rows: int
    inputs: torch.Tensor  # (3, n_rows) int64: token ids, positions, block-table slots
    stages: list[Stage]  # embeddings then layer runs, in chain order
    heads: list[Stage]  # over the sampled rows
    sample_rows: torch.Tensor | None  # (S,) rows whose logits are sampled; None: every row
    n_sample: int
    max_ctx: int  # host bound on any row's context (sizes the torch reference attention)
    decode_only: bool
    class_ranges: list[tuple[int, int]] = field(default_factory=list)
    # host side: for each item (in the order given), its first row and its sampled row (or -1)
    item_rows: list[int] = field(default_factory=list)
    item_sample: list[int] = field(default_factory=list)


def _rows_of(ranges: list[tuple[int, int]], device: torch.device) -> tuple[Rows, int]:
    """Merge adjacent ranges; one range is a slice (a view, no copy), several an index."""
    merged: list[list[int]] = []
    for a, b in ranges:
        if b <= a:
            continue
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    n = sum(b - a for a, b in merged)
    if len(merged) == 1:
        return slice(merged[0][0], merged[0][1]), n
    if not merged:
        return slice(0, 0), 0
    idx = np.concatenate([np.arange(a, b) for a, b in merged])
    return torch.from_numpy(idx).to(device), n


def _take(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def build_plan(
    groups: list[tuple[ModelClass, list[Item]]],
    *,
    padded: bool,
    device: torch.device,
    inputs: torch.Tensor | None = None,
) -> Plan:
    """Lay out one lane's step. `padded`: a decode step, each class padded to its bucket."""
    lane = groups[0][0].lane
    ranges: list[tuple[int, int]] = []  # rows of each class
    row = 0
    item_rows: list[int] = []
    for _cls, items in groups:
        n = bucket(len(items)) if padded else sum(len(it.tokens) for it in items)
        ranges.append((row, row + n))
        for it in items:
            item_rows.append(row)
            row += len(it.tokens)
        row = ranges[-1][1]
    n_rows = row
    if inputs is None:
        inputs = torch.zeros(3, n_rows, dtype=torch.int64, device=device)

    # Which classes each block instance serves, in layout order.
    users: dict[str, list[int]] = {}
    blocks: dict[str, object] = {}
    order: dict[str, tuple[int, int]] = {}
    for c, (cls, _) in enumerate(groups):
        for rank, b in [(0, cls.embed), *((1, blk) for blk in cls.layers)]:
            if b is None:
                continue
            users.setdefault(b.fingerprint, []).append(c)
            blocks[b.fingerprint] = b
            order[b.fingerprint] = (rank, getattr(b, "layer_start", -1))
    stages: list[Stage] = []
    for key in sorted(users, key=lambda k: order[k]):
        cs = users[key]
        rows, n = _rows_of([ranges[c] for c in cs], device)
        st = Stage(blocks[key], key, rows, n)
        if isinstance(st.block, LayerBlock):
            # relative rows of each class inside this stage, for LoRA segments and attention
            rel, at = {}, 0
            for c in cs:
                rel[c] = at
                at += ranges[c][1] - ranges[c][0]
            segs: dict[str, tuple[LoraAdapter, list[tuple[int, int]]]] = {}
            for c in cs:
                cls = groups[c][0]
                pos = next(i for i, b in enumerate(cls.layers) if b.fingerprint == key)
                ad = cls.adapters.get(pos)
                if ad is not None:
                    segs.setdefault(ad.fingerprint, (ad, []))[1].append(
                        (rel[c], rel[c] + ranges[c][1] - ranges[c][0])
                    )
            st.lora = [(ad, _rows_of(rs, device)[0]) for ad, rs in segs.values()]
            if padded:
                st.decode = slice(0, n)
            else:
                single: list[tuple[int, int]] = []
                for c in cs:
                    r = rel[c]
                    for it in groups[c][1]:
                        if len(it.tokens) == 1:
                            single.append((r, r + 1))
                        else:
                            st.prefill.append(
                                (r, len(it.tokens), it.start + len(it.tokens), it.slot)
                            )
                        r += len(it.tokens)
                st.decode = _rows_of(single, device)[0] if single else None
                if isinstance(st.decode, slice) and st.decode.stop - st.decode.start == n:
                    st.decode = slice(0, n)
        stages.append(st)

    # Sampled rows: the last row of each sampling item (every row of a padded decode batch).
    item_sample: list[int] = []
    if padded:
        sample_rows, n_sample = None, n_rows
        s_ranges = ranges
        item_sample = list(item_rows)
    else:
        picks, s_ranges = [], []
        k = 0
        for _cls, items in groups:
            first = len(picks)
            for it, r in zip(items, item_rows[k : k + len(items)], strict=True):
                if it.samples:
                    item_sample.append(len(picks))
                    picks.append(r + len(it.tokens) - 1)
                else:
                    item_sample.append(-1)
            k += len(items)
            s_ranges.append((first, len(picks)))
        n_sample = len(picks)
        sample_rows = torch.tensor(picks, dtype=torch.int64).to(device) if picks else None
    heads: list[Stage] = []
    head_users: dict[str, list[int]] = {}
    for c, (cls, _) in enumerate(groups):
        if cls.head is not None:
            head_users.setdefault(cls.head_key, []).append(c)
    for key, cs in head_users.items():
        rows, n = _rows_of([s_ranges[c] for c in cs], device)
        if n:
            heads.append(Stage(groups[cs[0]][0].head, key, rows, n))
    max_ctx = max((it.start + len(it.tokens) for _, items in groups for it in items), default=1)
    return Plan(
        lane,
        n_rows,
        inputs,
        stages,
        heads,
        sample_rows,
        n_sample,
        max_ctx,
        padded,
        ranges,
        item_rows,
        item_sample,
    )


def fill_inputs(
    plan: Plan, groups: list[tuple[ModelClass, list[Item]]], out: np.ndarray | None = None
) -> np.ndarray:
    """Host values of the (3, n_rows) inputs: token ids, positions, slots (padding rows: zeros).

    A padded plan is reused across steps with any counts inside its buckets: its item rows are
    placed again here, each class's requests from the start of its rows.
    """
    host = out if out is not None else np.zeros((3, plan.n_rows), dtype=np.int64)
    host.fill(0)
    if plan.decode_only:
        plan.item_rows = [
            a + i
            for (a, _), (_, items) in zip(plan.class_ranges, groups, strict=True)
            for i in range(len(items))
        ]
        plan.item_sample = list(plan.item_rows)
        plan.max_ctx = max(it.start + len(it.tokens) for _, items in groups for it in items)
    k = 0
    for _, items in groups:
        for it in items:
            r, n = plan.item_rows[k], len(it.tokens)
            host[0, r : r + n] = it.tokens
            host[1, r : r + n] = np.arange(it.start, it.start + n)
            host[2, r : r + n] = it.slot
            k += 1
    return host
