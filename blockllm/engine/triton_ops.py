"""Triton kernels for the CUDA hot path: RMSNorm, SwiGLU, rope + paged KV write, paged decode attention,
one-row GEMV, skinny GEMM, L2 prefetch; the row-bucket GEMVs with fused neighbours come from triton_gemv.

Each wrapper mirrors the torch reference of the same name in ops.py (tests compare them); none
reads a device value on the host, so all of them run inside captured CUDA graphs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .ops import interpreting
from .triton_gemv import gate_up_silu, qkv_rope_kv
from .triton_gemv import gemv as gemv_rows

_LOG2E = 1.4426950408889634


@functools.cache
def _sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, C, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / C
    r = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + offs, mask=mask, other=0.0)
    y = (x * r).to(w.dtype).to(tl.float32) * w.to(
        tl.float32
    )  # as transformers: w * norm(x).to(dtype)
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    T, C = x.shape  # (T, C), unit stride along C
    y = torch.empty((T, C), dtype=x.dtype, device=x.device)
    if T:
        block = triton.next_power_of_2(C)
        _rms_norm_kernel[(T,)](
            x,
            w,
            y,
            x.stride(0),
            y.stride(0),
            C,
            eps,
            BLOCK=block,
            num_warps=4 if block <= 2048 else 8,
        )
    return y


# ---------------------------------------------------------------------------------------- SwiGLU
@triton.jit
def _inv_rms(X, row, stride_x, C, eps, BLOCK_C: tl.constexpr):
    """1 / rms of row `row` of X (float32): a folded RMSNorm's row scale."""
    offs = tl.arange(0, BLOCK_C)
    x = tl.load(X + row * stride_x + offs, mask=offs < C, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)


@triton.jit
def _silu_mul_kernel(GU, Y, X, stride_gu, stride_y, stride_x, n_inter, C, eps,
                     BLOCK: tl.constexpr, NORM: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_inter
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + n_inter + offs, mask=mask, other=0.0)
    if NORM:  # gate_up came from a folded RMSNorm: scale both halves by 1/rms(x) first
        r = _inv_rms(X, row, stride_x, C, eps, BLOCK_C)
        g = g * r
        uf = u.to(tl.float32) * r
    else:
        uf = u.to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype).to(tl.float32)  # silu rounded like F.silu, then * up
    tl.store(Y + row * stride_y + offs, (s * uf).to(Y.dtype.element_ty), mask=mask)


def silu_mul(gu: torch.Tensor, x: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    T, I2 = gu.shape
    inter = I2 // 2
    y = torch.empty((T, inter), dtype=gu.dtype, device=gu.device)
    if T:
        block = 1024
        xx = x if x is not None else gu
        _silu_mul_kernel[(T, triton.cdiv(inter, block))](
            gu, y, xx, gu.stride(0), y.stride(0), xx.stride(0), inter, xx.shape[1], eps,
            BLOCK=block, NORM=x is not None, BLOCK_C=triton.next_power_of_2(xx.shape[1]), num_warps=4,
        )  # fmt: skip
    return y


# ---------------------------------------------------------------------------------------- rope + KV
@triton.jit
def _rope_kv_kernel(
    QKV, POS, SLOT, BT, CS, KP, VP, X,
    stride_qkv, stride_btb, stride_btl, stride_kp, stride_ks, stride_kh, layer, stride_x, C, eps,
    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr,
    HP: tl.constexpr, HKVP: tl.constexpr, NORM: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    if NORM:  # qkv came from a folded RMSNorm: scale q, k and v by 1/rms(x)
        r = _inv_rms(X, t, stride_x, C, eps, BLOCK_C)
    else:
        r = 1.0
    pos = tl.load(POS + t)
    slot = tl.load(SLOT + t)
    D: tl.constexpr = 2 * HALF
    offs_d = tl.arange(0, HALF)
    c = tl.load(CS + pos * D + offs_d)  # cos_sin row: [cos (D/2), sin (D/2)], float32
    s = tl.load(CS + pos * D + HALF + offs_d)
    offs_h = tl.arange(0, HP)
    mask_h = offs_h < H + HKV
    base = QKV + t * stride_qkv + offs_h[:, None] * D
    x1 = tl.load(base + offs_d[None, :], mask=mask_h[:, None], other=0.0).to(tl.float32) * r
    x2 = tl.load(base + HALF + offs_d[None, :], mask=mask_h[:, None], other=0.0).to(tl.float32) * r
    o1 = (x1 * c[None, :] - x2 * s[None, :]).to(QKV.dtype.element_ty)
    o2 = (x2 * c[None, :] + x1 * s[None, :]).to(QKV.dtype.element_ty)
    is_q = (offs_h < H)[:, None]
    tl.store(base + offs_d[None, :], o1, mask=is_q)  # q rotated in place
    tl.store(base + HALF + offs_d[None, :], o2, mask=is_q)
    page = tl.load(BT + slot * stride_btb + layer * stride_btl + pos // PAGE).to(tl.int64)
    dst = page * stride_kp + (pos % PAGE) * stride_ks
    is_k = ((offs_h >= H) & mask_h)[:, None]
    kh = (offs_h - H)[:, None] * stride_kh
    tl.store(KP + dst + kh + offs_d[None, :], o1.to(KP.dtype.element_ty), mask=is_k)
    tl.store(KP + dst + kh + HALF + offs_d[None, :], o2.to(KP.dtype.element_ty), mask=is_k)
    offs_v = tl.arange(0, HKVP)
    offs_full = tl.arange(0, D)
    mask_v = (offs_v < HKV)[:, None]
    v = tl.load(
        QKV + t * stride_qkv + (H + HKV) * D + offs_v[:, None] * D + offs_full[None, :],
        mask=mask_v,
        other=0.0,
    )
    if NORM:
        v = v.to(tl.float32) * r
    tl.store(
        VP + dst + offs_v[:, None] * stride_kh + offs_full[None, :],
        v.to(VP.dtype.element_ty),
        mask=mask_v,
    )


def rope_and_store_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slot_ids: torch.Tensor,
    layer: int,
    cos_sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    n_heads: int,
    n_kv: int,
    x: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    T = qkv.shape[0]
    _, page, _, D = k_pool.shape
    if T:
        xx = x if x is not None else qkv
        _rope_kv_kernel[(T,)](
            qkv, positions, slot_ids, block_table, cos_sin, k_pool, v_pool, xx,
            qkv.stride(0), block_table.stride(0), block_table.stride(1),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), layer, xx.stride(0), xx.shape[1], eps,
            H=n_heads, HKV=n_kv, HALF=D // 2, PAGE=page,
            HP=triton.next_power_of_2(n_heads + n_kv), HKVP=triton.next_power_of_2(n_kv),
            NORM=x is not None, BLOCK_C=triton.next_power_of_2(xx.shape[1]), num_warps=4,
        )  # fmt: skip
    return qkv[:, : n_heads * D].view(T, n_heads, D)


# ---------------------------------------------------------------------------------------- attention
def _graph_bench(fn, quantiles=None):
    """Time `fn` replayed in a CUDA graph: what a captured step pays, without the host's launch
    cost (run 3 timed eagerly and so favoured fewer, cuBLAS launches: see NOTES-engine.md).

    do_bench_cudagraph runs `fn` on a stream of its own, which does not wait for the caller's:
    the device is synchronized first, or `fn` may read inputs (positions, block tables, the
    layer's q) that work still queued on the caller's stream has not written yet. The 8B
    per-model warm-up crashed so with an illegal address (NOTES-multitenant.md, 8b run 3)."""
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=10, quantiles=quantiles)


_ATTN_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
]


@triton.jit
def _paged_decode_kernel(
    Q, K, V, BT, SLOT, POS, OUT, LSE,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_btb, stride_btl,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
    layer, qk_scale, T_KEY,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (row, kv head, split): the G query heads of the group against a share of the context."""
    t = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    slot = tl.load(SLOT + t)
    ctx = tl.load(POS + t).to(tl.int32) + 1
    per = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    start = s * per
    end = tl.minimum(start + per, ctx)
    offs_g = tl.arange(0, GP)
    mask_g = offs_g < G
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    q = tl.load(
        Q + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None],
        other=0.0,
    )
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    bt = BT + slot * stride_btb + layer * stride_btl
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(bt + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        row = page * stride_kp + (offs_n % PAGE) * stride_ks + kvh * stride_kh
        k = tl.load(K + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)  # (N, D)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # (GP, N), log2 domain
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = OUT + t * stride_ot + heads[:, None] * stride_oh + s * stride_os + offs_d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=mask_g[:, None])
    if SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(LSE + t * stride_lt + heads * stride_lh + s, lse, mask=mask_g)


# the same kernel, its tile/warps/stages picked per shape by timing (engine.tune-kernels)
_paged_decode_tuned = triton.autotune(
    configs=_ATTN_CONFIGS, key=["T_KEY", "G", "D", "SPLITS"], do_bench=_graph_bench
)(_paged_decode_kernel)


@triton.jit
def _combine_kernel(OP, LSE, OUT, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
                    D: tl.constexpr, SPLITS: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    lse = tl.load(LSE + t * stride_lt + h * stride_lh + offs_s)
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - m)
    o = tl.load(OP + t * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :])
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(OUT + t * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


def _splits(rows: int, n_kv: int, device: torch.device) -> int:
    """Split the context so that rows x kv heads x splits fills the GPU about twice."""
    programs = rows * n_kv
    want = -(-2 * _sm_count(device.index or 0) // max(programs, 1))
    return 1 if want <= 1 else min(32, triton.next_power_of_2(want))


_SPLITS: dict[tuple, int] = {}  # (rows bucket, G, D, page) -> context splits that timed fastest


def _best_splits(run, T: int, n_kv: int, G: int, D: int, page: int, device: torch.device) -> int:
    """Time a few split counts once per shape (never inside a capture) and keep the fastest."""
    key = (triton.next_power_of_2(T), G, D, page)
    best = _SPLITS.get(key)
    if best is None:
        guess = _splits(T, n_kv, device)
        if torch.cuda.is_current_stream_capturing():
            return guess
        cands = sorted({1, max(1, guess // 4), max(1, guess // 2), guess})
        times = {}
        for c in cands:
            run(c)  # autotunes the kernel's configs for this split count
            times[c] = _graph_bench(lambda c=c: run(c))
        best = _SPLITS[key] = min(times, key=times.get)
    return best


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
    scale: float,
    splits: int | None = None,
    tune: bool = False,
) -> torch.Tensor:
    T, H, D = q.shape
    _, page, n_kv, _ = k_pool.shape
    G = H // n_kv
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if not T:
        return out
    if splits is None:

        def run(c: int) -> torch.Tensor:
            return decode_attention(
                q, k_pool, v_pool, block_table, slot_ids, positions, layer, scale, c
            )

        splits = _best_splits(run, T, n_kv, G, D, page, q.device) if q.is_cuda else 1
    S = splits
    if S > 1:
        part = torch.empty((T, H, S, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((T, H, S), dtype=torch.float32, device=q.device)
        o, so = part, (part.stride(0), part.stride(1), part.stride(2))
    else:
        lse = out  # unused
        o, so = out, (out.stride(0), out.stride(1), 0)
    # the measured default (run 2): 64-token tiles, 4 warps, 2 stages; autotuned with tune=True
    fixed = {} if tune else {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    (_paged_decode_tuned if tune else _paged_decode_kernel)[(T, n_kv, S)](
        q, k_pool, v_pool, block_table, slot_ids, positions, o, lse,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        block_table.stride(0), block_table.stride(1),
        so[0], so[1], so[2], lse.stride(0), lse.stride(1),
        layer, scale * _LOG2E, triton.next_power_of_2(T),
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, PAGE=page, SPLITS=S, **fixed,
    )  # fmt: skip
    if S > 1:
        _combine_kernel[(T, H)](
            part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), D=D, SPLITS=S, num_warps=1,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------- skinny GEMM
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
]


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["M_KEY", "N", "K", "RESIDUAL"],
    restore_value=["Y"],
    do_bench=_graph_bench,
)
@triton.jit
def _skinny_gemm_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym, M_KEY,
                        BLOCK_M: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Y (M, N) = X (M, K) @ W (N, K).T [+ Y]: few rows, weights streamed once, K pipelined."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_ptr = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptr = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptr + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + k0, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    y_ptr = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if RESIDUAL:
        acc += tl.load(y_ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=mask)


def gemm(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T for a few rows (M <= 64); with `residual`, added into it in place (x += ...)."""
    M, K = x.shape
    N = w.shape[0]
    y = residual if residual is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M:
        block_m = min(64, max(16, triton.next_power_of_2(M)))
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))  # noqa: E731
        _skinny_gemm_kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), triton.next_power_of_2(M),
                                  BLOCK_M=block_m, RESIDUAL=residual is not None)  # fmt: skip
    return y


@triton.jit
def _gemv_kernel(X, W, Y, N, K, stride_wn, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (N,) = W (N, K) @ x (K,) [+ y] for one row: BLOCK_N rows of W per program, CUDA-core
    products summed in float32 (no tensor-core tile to pad), so programs stay many at N = 2048."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w_ptr = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(X + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k0, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if RESIDUAL:
        y += tl.load(Y + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=mask_n)


def gemv(
    x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None,
    block_n: int | None = None, block_k: int = 1024, num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:  # fmt: skip
    """x (1, K) @ w.T -> (1, N); with `residual` (1, N), added into it in place.

    The default tile (2 rows x 1024 of K, 4 warps, 2 stages) timed fastest, or within 12% of the
    fastest, on all nine 1.1B / 8B decode shapes on the H200 (results/gemv_probe-h200.json).
    Under Triton's interpreter the default is 128 rows a program (64x fewer programs to run in numpy).
    """
    block_n = block_n or (128 if interpreting() else 2)
    K = x.shape[1]
    N = w.shape[0]
    block_k = min(block_k, triton.next_power_of_2(K))
    y = residual if residual is not None else torch.empty((1, N), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](x, w, y, N, K, w.stride(0), RESIDUAL=residual is not None,
                                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                                             num_stages=num_stages)  # fmt: skip
    return y


# ---------------------------------------------------------------------------------------- L2 prefetch
@triton.jit(do_not_specialize=["n_bytes", "n_chunks"])  # one compile for every size: none inside a capture
def _l2_prefetch_kernel(P, n_bytes, n_chunks, CHUNK: tl.constexpr, LINE: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Programs ask L2 for CHUNK-byte chunks of P in turn, one `prefetch` per LINE; nothing is read back."""
    base = P.to(tl.pointer_type(tl.int8))
    for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        offs = c.to(tl.int64) * CHUNK + tl.arange(0, CHUNK // LINE).to(tl.int64) * LINE
        ptrs = base + tl.minimum(offs, n_bytes - 1)  # the tail's lines repeat the last one: harmless
        if EVICT_LAST:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
        else:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


def l2_prefetch(t: torch.Tensor, nbytes: int, mode: str = "prefetch", programs: int = 0) -> None:
    """Ask L2 for the first `nbytes` of `t`'s storage ahead of the kernel that reads it.

    mode "prefetch": PTX `prefetch.global.L2` (no registers held, nothing read back); "evict_last":
    the same with the L2 evict-last priority. `programs` > 0: that many programs loop over the
    chunks (few SM slots taken from the kernels running beside it); 0: one program a chunk.
    """
    nbytes = min(nbytes, t.numel() * t.element_size())
    if nbytes <= 0:
        return
    chunk = 65536
    chunks = triton.cdiv(nbytes, chunk)
    grid = (min(chunks, programs) if programs > 0 else chunks,)
    _l2_prefetch_kernel[grid](t, nbytes, chunks, CHUNK=chunk, LINE=128, EVICT_LAST=mode == "evict_last", num_warps=4)


__all__ = [
    "decode_attention", "gate_up_silu", "gemm", "gemv", "gemv_rows", "l2_prefetch", "qkv_rope_kv", "rms_norm",
    "rope_and_store_kv", "silu_mul",
]  # fmt: skip
