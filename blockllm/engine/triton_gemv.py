"""Decode GEMVs for a bucket of 1-16 rows with the neighbouring kernels fused in: the RMSNorm before
the projection; rope + the paged KV write after qkv, SwiGLU after gate_up, the residual add after o/down.

Each fusion saves a launch and a trip of the activations through memory per layer (engine.gemv-fuse).
The norm is computed as transformers' LlamaRMSNorm rounds it (float32 statistic, the normalised row
cast to the dtype, times the weight), so the result matches ops.rms_norm -> F.linear -> the op after.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .ops import interpreting


class Tile(NamedTuple):
    """A program's share: BLOCK_M padded rows of x against 2 * pairs rows of W, BLOCK_K of K a step."""

    block_m: int
    pairs: int
    block_k: int
    dot: bool  # tensor-core tl.dot (16 padded rows) instead of CUDA-core products
    num_warps: int
    num_stages: int


def gpu_tile(m: int) -> Tile:
    """The GPU tile for m rows. One row is the measured GEMV tile (2 rows x 1024 of K, 4 warps,
    2 stages, benchmarks/NOTES-engine.md); more rows keep the float32 accumulator near 4096 values a
    program, and from 5 rows the products move to tensor cores (CUDA cores would do 16 FMAs a weight)."""
    if m <= 1:
        return Tile(1, 1, 1024, False, 4, 2)
    if m <= 2:
        return Tile(2, 1, 512, False, 4, 2)
    if m <= 4:
        return Tile(4, 2, 256, False, 4, 2)
    return Tile(16, 8, 128, True, 4, 3)


def tile_for(m: int) -> Tile:
    """gpu_tile(m); under Triton's interpreter, which runs programs one after another in numpy, 128
    weight rows a program (the same kernels with far fewer programs; tests pass gpu_tile to check it)."""
    t = gpu_tile(m)
    return t._replace(pairs=64, block_k=min(t.block_k, 256)) if interpreting() else t


MAX_ROWS = 16


@triton.jit
def _project(X, LN, W, stride_xm, stride_wn, M, K, rows, mask_r, eps,
             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_R) float32: rows :M of X against rows `rows` of W. With NORM, X's rows are
    first RMS-normalised and scaled by LN as LlamaRMSNorm rounds them (a first pass over X gathers
    each row's statistic: X is a few KiB, read from L2)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    x_ptr = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptr = W + rows[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if NORM:
        ss = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xs = tl.load(x_ptr + k0, mask=mask_m[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
            xs = xs.to(tl.float32)
            ss += xs * xs
        inv = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)  # (BLOCK_M,)
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptr + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + k0, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if NORM:  # LlamaRMSNorm: weight * (x * inv).to(dtype), the product rounded to the dtype too
            ln = tl.load(LN + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) * inv[:, None]).to(x.dtype).to(tl.float32)
            x = (xn * ln[None, :]).to(x.dtype)
        if DOT:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=2)
    return y


@triton.jit
def _halves(y, BLOCK_M: tl.constexpr, R: tl.constexpr):
    """(BLOCK_M, 2R) -> its first and second R columns."""
    return tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, R)), (0, 2, 1)))


@triton.jit
def _gemv_rows_kernel(X, LN, W, Y, M, N, K, stride_xm, stride_wn, stride_ym, eps,
                      RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < N
    y = _project(X, LN, W, stride_xm, stride_wn, M, K, rows, mask_r, eps, BLOCK_M, BLOCK_R, BLOCK_K, DOT, NORM)
    offs_m = tl.arange(0, BLOCK_M)
    ptr = Y + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
    mask = (offs_m < M)[:, None] & mask_r[None, :]
    if RESIDUAL:
        y += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, y.to(Y.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor | None) -> int:
    M, K = x.shape
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"the row-bucket GEMV takes 1 to {MAX_ROWS} rows, not {M}")
    if w.shape[1] != K or x.stride(1) != 1 or w.stride(1) != 1 or (norm is not None and norm.shape != (K,)):
        raise ValueError(f"x {tuple(x.shape)}, w {tuple(w.shape)}: not unit-stride operands of one K")
    return M


def _k_block(t: Tile, K: int) -> int:
    return min(t.block_k, triton.next_power_of_2(K))


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    residual: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    tile: Tile | None = None,
) -> torch.Tensor:
    """x (M, K) @ w.T -> (M, N) for 1 <= M <= 16; with `residual` (M, N), added into it in place;
    with `norm` (K,), x is first RMSNorm-ed with that weight and `eps` (ops.rms_norm's rounding)."""
    M, K = _rows(x, w, norm), x.shape[1]
    N = w.shape[0]
    t = tile or tile_for(M)
    y = residual if residual is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_r = 2 * t.pairs
    _gemv_rows_kernel[(triton.cdiv(N, block_r),)](
        x, x if norm is None else norm, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), eps,
        RESIDUAL=residual is not None, BLOCK_M=t.block_m, BLOCK_R=block_r, BLOCK_K=_k_block(t, K),
        DOT=t.dot, NORM=norm is not None, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return y


# ---------------------------------------------------------------------------------------- norm + qkv + rope + KV
@triton.jit
def _qkv_rope_kv_kernel(
    X, LN, W, Q, POS, SLOT, BT, CS, KP, VP,
    M, K, stride_xm, stride_wn, stride_qm, stride_btb, stride_btl, stride_kp, stride_ks, stride_kh,
    layer, eps,
    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """One head's dims j and j + D/2 (R of each) for every row: project, rotate (q, k), then store q
    or write k / v into the row's page of the pool."""
    D: tl.constexpr = 2 * HALF
    PER: tl.constexpr = HALF // R
    pid = tl.program_id(0)
    head = pid // PER
    j = (pid % PER) * R + tl.arange(0, R)  # (R,) dims of the first half
    idx = tl.arange(0, 2 * R)
    rows = head * D + (pid % PER) * R + idx % R + (idx // R) * HALF
    y = _project(X, LN, W, stride_xm, stride_wn, M, K, rows, rows >= 0, eps, BLOCK_M, 2 * R, BLOCK_K, DOT, NORM)
    # dims j and j + HALF, each rounded to the dtype as the projection's output is before rope
    a, b = _halves(y.to(Q.dtype.element_ty).to(tl.float32), BLOCK_M, R)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (j < HALF)[None, :]
    pos = tl.load(POS + offs_m, mask=mask_m, other=0)
    if head < H + HKV:  # q and k turn by their position (cos_sin rows: [cos (D/2), sin (D/2)])
        cs = CS + pos[:, None].to(tl.int64) * D + j[None, :]
        c = tl.load(cs, mask=mask, other=0.0)
        s = tl.load(cs + HALF, mask=mask, other=0.0)
        o1 = a * c - b * s
        o2 = b * c + a * s
    else:
        o1 = a
        o2 = b
    if head < H:
        qp = Q + offs_m[:, None].to(tl.int64) * stride_qm + head * D + j[None, :]
        tl.store(qp, o1.to(Q.dtype.element_ty), mask=mask)
        tl.store(qp + HALF, o2.to(Q.dtype.element_ty), mask=mask)
    else:
        slot = tl.load(SLOT + offs_m, mask=mask_m, other=0).to(tl.int64)
        page = tl.load(BT + slot * stride_btb + layer * stride_btl + pos // PAGE, mask=mask_m, other=0)
        dst = page.to(tl.int64) * stride_kp + (pos % PAGE).to(tl.int64) * stride_ks
        if head < H + HKV:
            p = KP + dst[:, None] + (head - H) * stride_kh + j[None, :]
        else:
            p = VP + dst[:, None] + (head - H - HKV) * stride_kh + j[None, :]
        tl.store(p, o1.to(KP.dtype.element_ty), mask=mask)
        tl.store(p + HALF, o2.to(KP.dtype.element_ty), mask=mask)


def qkv_rope_kv(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    positions: torch.Tensor,
    slot_ids: torch.Tensor,
    layer: int,
    cos_sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    n_heads: int,
    n_kv: int,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    tile: Tile | None = None,
) -> torch.Tensor:
    """q (M, H, D) of [rms_norm(x, norm, eps)] @ w_qkv.T, rotated, with k and v written into the
    pool: what ops.rms_norm, F.linear and ops.rope_and_store_kv do one after the other."""
    M, K = _rows(x, w_qkv, norm), x.shape[1]
    _, page, _, D = k_pool.shape
    t = tile or tile_for(M)
    R = min(t.pairs, D // 2)
    if w_qkv.shape[0] != (n_heads + 2 * n_kv) * D or (D // 2) % R:
        raise ValueError(f"w_qkv {tuple(w_qkv.shape)} does not hold {n_heads}+2x{n_kv} heads of {D}")
    q = torch.empty((M, n_heads, D), dtype=x.dtype, device=x.device)
    _qkv_rope_kv_kernel[((n_heads + 2 * n_kv) * (D // 2 // R),)](
        x, x if norm is None else norm, w_qkv, q, positions, slot_ids, block_table, cos_sin, k_pool, v_pool,
        M, K, x.stride(0), w_qkv.stride(0), q.stride(0), block_table.stride(0), block_table.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), layer, eps,
        H=n_heads, HKV=n_kv, HALF=D // 2, PAGE=page, BLOCK_M=t.block_m, R=R, BLOCK_K=_k_block(t, K),
        DOT=t.dot, NORM=norm is not None, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return q


# ---------------------------------------------------------------------------------------- norm + gate_up + SwiGLU
@triton.jit
def _gate_up_silu_kernel(X, LN, W, Y, M, INTER, K, stride_xm, stride_wn, stride_ym, eps,
                         BLOCK_M: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """R columns of silu(gate) * up: gate rows j and the matching up rows INTER + j of W."""
    j = tl.program_id(0) * R + tl.arange(0, R)
    idx = tl.arange(0, 2 * R)
    cols = tl.program_id(0) * R + idx % R
    rows = cols + (idx // R) * INTER
    y = _project(X, LN, W, stride_xm, stride_wn, M, K, rows, cols < INTER, eps, BLOCK_M, 2 * R, BLOCK_K, DOT, NORM)
    g, u = _halves(y.to(Y.dtype.element_ty).to(tl.float32), BLOCK_M, R)  # rounded as F.linear's output
    s = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)  # silu rounded like F.silu
    offs_m = tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & (j < INTER)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + j[None, :], (s * u).to(Y.dtype.element_ty), mask=mask)


def gate_up_silu(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    tile: Tile | None = None,
) -> torch.Tensor:
    """silu(h @ gate.T) * (h @ up.T) -> (M, I), h = [rms_norm(x, norm, eps)], from the fused (2I, K)
    weight: what ops.rms_norm, F.linear and ops.silu_mul do one after the other."""
    M, K = _rows(x, w_gate_up, norm), x.shape[1]
    inter = w_gate_up.shape[0] // 2
    t = tile or tile_for(M)
    y = torch.empty((M, inter), dtype=x.dtype, device=x.device)
    _gate_up_silu_kernel[(triton.cdiv(inter, t.pairs),)](
        x, x if norm is None else norm, w_gate_up, y, M, inter, K, x.stride(0), w_gate_up.stride(0),
        y.stride(0), eps, BLOCK_M=t.block_m, R=t.pairs, BLOCK_K=_k_block(t, K), DOT=t.dot,
        NORM=norm is not None, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return y


__all__ = ["MAX_ROWS", "Tile", "gate_up_silu", "gemv", "gpu_tile", "qkv_rope_kv", "tile_for"]
