"""The chain's math over a planned batch: embeddings, Llama decoder layer runs, final norm + LM head.

Plain tensors only (gpt-fast style); each block instance runs once per step over its rows. No
host-device synchronisation happens here, so the same function is captured as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .kv_cache import KVPool
from .plan import Plan, Rows, Stage
from .prefetch import L2Prefetcher, gemm_weights
from .weights import EmbedBlock, HeadBlock, LayerBlock, LayerWeights


@dataclass
class Lane:
    """Models whose hidden states can share one tensor: same width, vocabulary, KV geometry, rope."""

    key: tuple
    pool: KVPool
    cos_sin: torch.Tensor  # (positions, 2, D/2) float32
    hidden: int
    vocab: int
    dtype: torch.dtype
    device: torch.device
    tune: bool = False  # engine.tune-kernels: time Triton against cuBLAS per shape at warm-up
    prefetch: L2Prefetcher = field(default_factory=L2Prefetcher)  # engine.l2-prefetch (inert when off)
    gemv: int = 0  # engine.gemv / gemv-rows: GEMMs of up to this many rows take the Triton GEMV (0: none)
    fuse: bool = False  # engine.gemv-fuse: those GEMVs also do the norm before and the op after them


def _take(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _is_all(rows: Rows, n: int) -> bool:
    return isinstance(rows, slice) and rows.start == 0 and rows.stop == n


def _add_rows_(out: torch.Tensor, rows: Rows, c0: int, c1: int, delta: torch.Tensor) -> None:
    if isinstance(rows, slice):
        out[rows, c0:c1] += delta
    else:
        out[:, c0:c1].index_add_(0, rows, delta)


def _lora_(st: Stage, layer: int, gemm: str, inp: torch.Tensor, out: torch.Tensor) -> None:
    """Each adapter's delta on its own rows only (Punica/S-LoRA style segments); others pay nothing.

    With stacked adapters (`st.dense`, segment graphs), one masked pair of GEMMs serves every row.
    """
    if st.dense is not None:
        t = st.dense[layer].get(gemm)
        if t is not None:
            a, b, slots, scale = t
            mask = (st.lora_slots[:, None] == slots[None, :]).to(inp.dtype) * scale  # (n, R)
            out += ((inp @ a.t()) * mask) @ b.t()
        return
    for ad, rows in st.lora:
        mods = ad.layers[layer].get(gemm)
        if not mods:
            continue
        x = _take(inp, rows)  # (n_a, in)
        for m in mods:
            _add_rows_(out, rows, m.c0, m.c1, ((x @ m.a.t()) @ m.b.t()) * m.scale)


def _has_lora(st: Stage, layer: int, gemm: str) -> bool:
    """Whether any row of the stage adds an adapter delta to `gemm` of `layer` (see _lora_)."""
    if st.dense is not None:
        return st.dense[layer].get(gemm) is not None
    return any(ad.layers[layer].get(gemm) for ad, _ in st.lora)


def _project_residual_(
    st: Stage,
    layer: int,
    gemm: str,
    x: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    lane: Lane,
) -> None:
    """x += a @ w.T (+ b) (+ LoRA deltas of the rows that have them)."""
    if ops.fused_on(x.device):
        ops.add_residual_(x, a, w, b, lane.tune, lane.gemv)
        _lora_(st, layer, gemm, a, x)
        return
    o = F.linear(a, w, b)  # CPU: transformers' order (projection + LoRA, then residual)
    _lora_(st, layer, gemm, a, o)
    x.add_(o)


def _attend(
    q: torch.Tensor, st: Stage, lane: Lane, layer: int, scale: float, max_ctx: int
) -> torch.Tensor:
    """(n, H, D) queries against each row's paged context -> (n, H * D)."""
    n, H, D = q.shape
    pool = lane.pool
    if st.decode is not None and _is_all(st.decode, n) and not st.prefill:
        out = ops.decode_attention(
            q,
            pool.k,
            pool.v,
            pool.block_table,
            st.slot_ids,
            st.positions,
            layer,
            scale,
            max_ctx,
            lane.tune,
        )
        return out.reshape(n, H * D)
    out = torch.empty(n, H, D, dtype=q.dtype, device=q.device)
    if st.decode is not None:
        rows = st.decode
        part = ops.decode_attention(
            _take(q, rows),
            pool.k,
            pool.v,
            pool.block_table,
            _take(st.slot_ids, rows),
            _take(st.positions, rows),
            layer,
            scale,
            max_ctx,
            lane.tune,
        )
        if isinstance(rows, slice):
            out[rows] = part
        else:
            out.index_copy_(0, rows, part)
    for r, m, ctx, slot in st.prefill:
        out[r : r + m] = ops.prefill_attention(
            q[r : r + m], pool.k, pool.v, pool.block_table, slot, layer, ctx, scale
        )
    return out.view(n, H * D)


def _qk_norm_(qkv: torch.Tensor, w: LayerWeights, H: int, Hkv: int, D: int, eps: float) -> None:
    """Qwen3: RMSNorm over each head of q and k, before rope (in place on the fused projection)."""
    n = qkv.shape[0]
    q = qkv[:, : H * D].view(n, H, D)
    k = qkv[:, H * D : (H + Hkv) * D].view(n, Hkv, D)
    q.copy_(ops.rms_norm(q.reshape(n * H, D), w.q_norm, eps).view(n, H, D))
    k.copy_(ops.rms_norm(k.reshape(n * Hkv, D), w.k_norm, eps).view(n, Hkv, D))


def run_layers(block: LayerBlock, x: torch.Tensor, st: Stage, lane: Lane, max_ctx: int) -> None:
    """A run of decoder layers over rows x (n, C), in place (x is the residual stream)."""
    a = block.arch
    H, Hkv, D, eps = a.n_heads, a.n_kv, a.head_dim, a.eps
    scale = D**-0.5
    pool = lane.pool
    for i, w in enumerate(block.layers):
        layer = block.layer_start + i
        if w.folded:
            _folded_layer(w, i, layer, x, st, lane, max_ctx)
            continue
        fuse = lane.fuse and ops.gemv_fits(x, w.w_qkv, lane.gemv)  # norm, GEMV and the next op in one kernel
        lane.prefetch.step(w.w_qkv)
        if fuse and ops._pow2(D) and w.b_qkv is None and w.q_norm is None and not _has_lora(st, i, "qkv"):
            q = ops.fused(x).qkv_rope_kv(
                x, w.w_qkv, st.positions, st.slot_ids, layer, lane.cos_sin, pool.k, pool.v,
                pool.block_table, H, Hkv, w.ln1, eps,
            )  # fmt: skip
        else:
            h = ops.rms_norm(x, w.ln1, eps)  # (n, C)
            qkv = ops.linear(h, w.w_qkv, w.b_qkv, gemv=lane.gemv)  # (n, (H + 2 Hkv) D)
            _lora_(st, i, "qkv", h, qkv)
            if w.q_norm is not None:
                _qk_norm_(qkv, w, H, Hkv, D, eps)
            q = ops.rope_and_store_kv(
                qkv, st.positions, st.slot_ids, layer, lane.cos_sin, pool.k, pool.v, pool.block_table, H, Hkv
            )  # (n, H, D); k and v are in the pool now
        attn = _attend(q, st, lane, layer, scale, max_ctx)  # (n, H D)
        lane.prefetch.step(w.w_o)
        _project_residual_(st, i, "o", x, attn, w.w_o, w.b_o, lane)
        lane.prefetch.step(w.w_gate_up)
        if fuse and w.b_gate_up is None and not _has_lora(st, i, "gate_up"):
            act = ops.fused(x).gate_up_silu(x, w.w_gate_up, w.ln2, eps)  # (n, I)
        else:
            h = ops.rms_norm(x, w.ln2, eps)
            gu = ops.linear(h, w.w_gate_up, w.b_gate_up, gemv=lane.gemv)  # (n, 2 I)
            _lora_(st, i, "gate_up", h, gu)
            act = ops.silu_mul(gu)  # (n, I)
        lane.prefetch.step(w.w_down)
        _project_residual_(st, i, "down", x, act, w.w_down, w.b_down, lane)


def _folded_layer(
    w: LayerWeights, i: int, layer: int, x: torch.Tensor, st: Stage, lane: Lane, max_ctx: int
) -> None:
    """The same layer with its RMSNorm weights folded into the GEMMs (CUDA): no norm kernels."""
    arch = st.block.arch
    H, Hkv, D, eps = arch.n_heads, arch.n_kv, arch.head_dim, arch.eps
    pool = lane.pool
    lane.prefetch.step(w.w_qkv)
    qkv = ops.linear(
        x, w.w_qkv, tune=lane.tune, gemv=lane.gemv
    )  # (n, (H + 2 Hkv) D), rows not yet scaled by 1/rms(x)
    _lora_(st, i, "qkv", x, qkv)
    q = ops.rope_and_store_kv(
        qkv,
        st.positions,
        st.slot_ids,
        layer,
        lane.cos_sin,
        pool.k,
        pool.v,
        pool.block_table,
        H,
        Hkv,
        x,
        eps,
    )
    attn = _attend(q, st, lane, layer, D**-0.5, max_ctx)  # (n, H D)
    lane.prefetch.step(w.w_o)
    _project_residual_(st, i, "o", x, attn, w.w_o, w.b_o, lane)
    lane.prefetch.step(w.w_gate_up)
    gu = ops.linear(x, w.w_gate_up, tune=lane.tune, gemv=lane.gemv)  # (n, 2 I), likewise unscaled
    _lora_(st, i, "gate_up", x, gu)
    act = ops.silu_mul(gu, x, eps)  # (n, I)
    lane.prefetch.step(w.w_down)
    _project_residual_(st, i, "down", x, act, w.w_down, w.b_down, lane)


def run_segment(plan: Plan, lane: Lane, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The plan's embeddings and layer runs -> hidden states (n_rows, C) in plan row order.

    `hidden` (n_rows, C): a previous segment's output of a split chain (updated in place);
    None: the plan embeds its token ids.
    """
    ids = plan.inputs[0]
    h = hidden if hidden is not None else torch.empty(plan.n_rows, lane.hidden, dtype=lane.dtype, device=lane.device)
    for st in plan.stages:
        if isinstance(st.block, EmbedBlock):
            e = F.embedding(_take(ids, st.rows), st.block.weight)
            if isinstance(st.rows, slice):
                h[st.rows] = e
            else:
                h.index_copy_(0, st.rows, e)
            continue
        # this stage's rows of the inputs: views for a run of rows, gathers (inside the graph) otherwise
        st.positions, st.slot_ids = _take(plan.inputs[1], st.rows), _take(plan.inputs[2], st.rows)
        if isinstance(st.rows, slice):
            run_layers(st.block, h[st.rows], st, lane, plan.max_ctx)  # a view: updated in place
        else:
            x = h.index_select(0, st.rows)
            run_layers(st.block, x, st, lane, plan.max_ctx)
            h.index_copy_(0, st.rows, x)
    return h


def head_logits(head: HeadBlock, hs: torch.Tensor, lane: Lane) -> torch.Tensor:
    """The final norm and LM head over hidden rows (n, C) -> logits (n, V)."""
    return ops.norm_linear(hs, head.norm, head.arch.eps, head.weight, lane.tune, lane.gemv, lane.fuse)


def run_plan(plan: Plan, lane: Lane) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a lane's batch -> (logits (S, V), greedy tokens (S,)) for the sampled rows."""
    with lane.prefetch.sequence(lambda: gemm_weights([*(st.block for st in plan.stages), *(st.block for st in plan.heads)])):
        return _run_plan(plan, lane)


def _run_plan(plan: Plan, lane: Lane) -> tuple[torch.Tensor, torch.Tensor]:
    h = run_segment(plan, lane)  # (T, C)
    hs = h if plan.sample_rows is None else h.index_select(0, plan.sample_rows)  # (S, C)
    if len(plan.heads) == 1 and _is_all(plan.heads[0].rows, plan.n_sample):
        head = plan.heads[0].block
        lane.prefetch.step(head.weight)
        logits = head_logits(head, hs, lane)  # (S, V)
    else:
        logits = torch.empty(plan.n_sample, lane.vocab, dtype=lane.dtype, device=lane.device)
        for st in plan.heads:
            head = st.block
            lane.prefetch.step(head.weight)
            part = head_logits(head, _take(hs, st.rows), lane)
            if isinstance(st.rows, slice):
                logits[st.rows] = part
            else:
                logits.index_copy_(0, st.rows, part)
    return logits, logits.argmax(-1)
