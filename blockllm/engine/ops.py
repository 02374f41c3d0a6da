"""The decoder's elementary ops: plain torch references (CPU, tests) and fused Triton kernels on CUDA.

Every op takes plain tensors and host integers only, never reads a device value on the host, so a
whole step can be captured as one CUDA graph.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@functools.cache
def _triton_ops():
    try:
        from . import triton_ops
    except ImportError as e:  # no triton: say so once, loudly, and run the torch references
        log.warning(
            "Triton is not importable (%s); the engine runs its slower torch ops on CUDA", e
        )
        return None
    return triton_ops


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1, read when triton_ops is first imported):
    the kernels then run in numpy on CPU tensors, which lets tests check them without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_on(device: torch.device) -> bool:
    """Whether the Triton kernels serve `device`: a CUDA device with Triton importable, or the CPU
    under Triton's interpreter."""
    return (device.type == "cuda" or (device.type == "cpu" and interpreting())) and _triton_ops() is not None


def fused(x: torch.Tensor) -> object | None:
    """The Triton kernels module when they serve `x`'s device (fused_on), else None."""
    return _triton_ops() if fused_on(x.device) else None


# ---------------------------------------------------------------------------------------- norms
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm: float32 statistics, weight times the cast result."""
    k = fused(x)
    if k is not None and x.dim() == 2 and x.stride(1) == 1:
        return k.rms_norm(x, w, eps)
    return rms_norm_ref(x, w, eps)


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # (T, C)
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(x.dtype)


# (rows bucket, N, K, residual) -> True when the Triton skinny GEMM beat cuBLAS for that shape
_GEMM_CHOICE: dict[tuple[int, int, int, bool], bool] = {}
SKINNY_ROWS = 64  # GEMMs of at most this many rows (decode) may use the Triton kernel


def _use_triton_gemm(
    k: object, a: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None
) -> bool:
    """Time both GEMMs once per shape (outside graph capture, on real operands) and keep the faster.

    Timed as CUDA-graph replays (what a captured step pays); run 3 timed them eagerly, which charged
    the Triton launch's host cost to the kernel and chose cuBLAS almost everywhere.
    """
    M = a.shape[0]
    if (
        M > SKINNY_ROWS
        or a.stride(1) != 1
        or w.stride(1) != 1
        or a.dtype not in (torch.bfloat16, torch.float16)
    ):
        return False
    key = (1 << (M - 1).bit_length(), w.shape[0], w.shape[1], residual is not None)
    choice = _GEMM_CHOICE.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return False  # undecided shapes take cuBLAS inside a capture
        from triton.testing import do_bench_cudagraph

        if residual is None:
            ours, theirs = (lambda: k.gemm(a, w)), (lambda: F.linear(a, w))
        else:
            scratch = residual.clone()
            ours, theirs = (lambda: k.gemm(a, w, scratch)), (lambda: scratch.addmm_(a, w.t()))
        ours()  # autotunes the Triton configs for this shape
        t_ours, t_theirs = do_bench_cudagraph(ours, rep=15), do_bench_cudagraph(theirs, rep=15)
        choice = _GEMM_CHOICE[key] = t_ours < 0.97 * t_theirs
        log.info(
            "GEMM %s: triton %.2f us, cuBLAS %.2f us -> %s",
            key,
            1e3 * t_ours,
            1e3 * t_theirs,
            "triton" if choice else "cuBLAS",
        )
    return choice


def gemv_fits(a: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """Whether `a` takes the Triton GEMV: 1 to `rows` rows (engine.gemv-rows; 0: never) of bf16 or
    fp16 (float32 too under the interpreter) against a weight of its dtype, both unit-stride along K."""
    return (
        1 <= a.shape[0] <= rows
        and (a.dtype in (torch.bfloat16, torch.float16) or (a.dtype == torch.float32 and interpreting()))
        and w.dtype == a.dtype
        and a.stride(1) == 1
        and w.stride(1) == 1
    )


def _gemv(k: object, a: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """One row on the measured one-row kernel (triton_ops.gemv), 2-16 on the row-bucket GEMV."""
    if a.shape[0] == 1:
        return k.gemv(a, w, residual)
    return k.gemv_rows(a, w, residual)


def linear(
    a: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    tune: bool = False,
    gemv: int = 0,
) -> torch.Tensor:
    """a @ w.T (+ b): cuBLAS; up to `gemv` rows (engine.gemv, engine.gemv-rows) take the Triton GEMV
    (one row: faster than cuBLAS on every decode shape measured, benchmarks/NOTES-engine.md); with
    `tune` (engine.tune-kernels), the Triton skinny GEMM where it timed faster."""
    k = fused(a) if (tune or gemv) else None
    if k is not None and b is None:
        if gemv_fits(a, w, gemv):
            return _gemv(k, a, w)
        if tune and _use_triton_gemm(k, a, w, None):
            return k.gemm(a, w)
    return F.linear(a, w, b)


def norm_linear(
    x: torch.Tensor,
    norm: torch.Tensor,
    eps: float,
    w: torch.Tensor,
    tune: bool = False,
    gemv: int = 0,
    fuse: bool = False,
) -> torch.Tensor:
    """linear(rms_norm(x, norm, eps), w); with `fuse` (engine.gemv-fuse) and rows the GEMV takes,
    one kernel that normalises as it reads x (triton_gemv)."""
    k = fused(x) if fuse else None
    if k is not None and gemv_fits(x, w, gemv):
        return k.gemv_rows(x, w, norm=norm, eps=eps)
    return linear(rms_norm(x, norm, eps), w, tune=tune, gemv=gemv)


def add_residual_(
    x: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    tune: bool = False,
    gemv: int = 0,
) -> None:
    """x += a @ w.T (+ b), in place: on CUDA one GEMM with the residual as its C operand."""
    if fused_on(x.device):
        k = fused(x) if (tune or gemv) else None
        if k is not None and x.stride(1) == 1 and gemv_fits(a, w, gemv):
            _gemv(k, a, w, x)
        elif k is not None and tune and x.stride(1) == 1 and _use_triton_gemm(k, a, w, x):
            k.gemm(a, w, x)
        else:
            x.addmm_(a, w.t())
        if b is not None:
            x.add_(b)
    else:  # the exact order of transformers (linear, then residual add) for bit-faithful fp32 tests
        x.add_(F.linear(a, w, b))


def row_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) per row, float32 (T, 1): what a folded RMSNorm leaves to apply after the GEMM."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def silu_mul(gu: torch.Tensor, x: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """SwiGLU's silu(gate) * up from the fused gate_up projection (T, 2I) -> (T, I).

    With `x`, gate_up came from a folded RMSNorm: both halves are first scaled by 1/rms(x).
    """
    k = fused(gu)
    if k is not None:
        return k.silu_mul(gu, x, eps)
    return silu_mul_ref(gu, x, eps)


def silu_mul_ref(gu: torch.Tensor, x: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    if x is not None:
        gu = (gu.float() * row_scale(x, eps)).to(gu.dtype)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


# ---------------------------------------------------------------------------------------- rope + KV
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rot * sin)


def kv_slots(
    block_table: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
    page_size: int,
) -> torch.Tensor:
    """Flat pool row of each token's KV at `layer`: page * page_size + offset, (T,) int64."""
    pages = block_table[slot_ids.long(), layer, (positions // page_size).long()]  # (T,)
    return pages.long() * page_size + (positions % page_size).long()


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
    """Rotate q and k of the fused projection, write k and v into the paged pool; returns q (T, H, D).

    qkv: (T, (H + 2 Hkv) D); pools: (pages, page_size, Hkv, D); block_table: (slots, layers, pages).
    With `x`, qkv came from a folded RMSNorm: q, k and v are first scaled by 1/rms(x).
    """
    k_ops = fused(qkv)
    if k_ops is not None and _pow2(k_pool.shape[3]):
        return k_ops.rope_and_store_kv(
            qkv,
            positions,
            slot_ids,
            layer,
            cos_sin,
            k_pool,
            v_pool,
            block_table,
            n_heads,
            n_kv,
            x,
            eps,
        )
    return rope_and_store_kv_ref(
        qkv, positions, slot_ids, layer, cos_sin, k_pool, v_pool, block_table, n_heads, n_kv, x, eps
    )


def rope_and_store_kv_ref(
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
    if x is not None:
        qkv.copy_((qkv.float() * row_scale(x, eps)).to(qkv.dtype))
    T = qkv.shape[0]
    page_size, D = k_pool.shape[1], k_pool.shape[3]
    q = qkv[:, : n_heads * D].view(T, n_heads, D)
    k = qkv[:, n_heads * D : (n_heads + n_kv) * D].view(T, n_kv, D)
    v = qkv[:, (n_heads + n_kv) * D :].view(T, n_kv, D)
    cs = cos_sin[positions.long()]  # (T, 2, D/2) float32
    cos = torch.cat((cs[:, 0], cs[:, 0]), dim=-1)[:, None, :].to(qkv.dtype)  # (T, 1, D)
    sin = torch.cat((cs[:, 1], cs[:, 1]), dim=-1)[:, None, :].to(qkv.dtype)
    q = _rotate(q, cos, sin)
    k = _rotate(k, cos, sin)
    rows = kv_slots(block_table, slot_ids, positions, layer, page_size)
    k_pool.view(-1, n_kv, D).index_copy_(0, rows, k.to(k_pool.dtype))
    v_pool.view(-1, n_kv, D).index_copy_(0, rows, v.to(v_pool.dtype))
    return q


# ---------------------------------------------------------------------------------------- attention
def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
    scale: float,
    max_ctx: int,
    tune: bool = False,
) -> torch.Tensor:
    """One query token per row against its paged context [0, position]: (T, H, D) -> (T, H, D).

    `max_ctx` (a host bound on position + 1) sizes the torch reference's gather; the Triton kernel
    reads each row's own length on the device and ignores it.
    """
    k_ops = fused(q)
    if k_ops is not None and _pow2(q.shape[2]):
        return k_ops.decode_attention(
            q, k_pool, v_pool, block_table, slot_ids, positions, layer, scale, tune=tune
        )
    return decode_attention_ref(
        q, k_pool, v_pool, block_table, slot_ids, positions, layer, scale, max_ctx
    )


def decode_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
    scale: float,
    max_ctx: int,
) -> torch.Tensor:
    T, H, D = q.shape
    page_size, n_kv = k_pool.shape[1], k_pool.shape[2]
    n_pages = -(-max_ctx // page_size)
    pages = block_table[slot_ids.long(), layer, :n_pages].long()  # (T, P)
    L = n_pages * page_size
    k = k_pool[pages].reshape(T, L, n_kv, D).transpose(1, 2)  # (T, Hkv, L, D)
    v = v_pool[pages].reshape(T, L, n_kv, D).transpose(1, 2)
    valid = torch.arange(L, device=q.device)[None, :] <= positions.long()[:, None]  # (T, L)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        k.to(q.dtype),
        v.to(q.dtype),
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )  # (T, H, 1, D)
    return out[:, :, 0, :]


def prefill_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    slot: int,
    layer: int,
    ctx: int,
    scale: float,
) -> torch.Tensor:
    """A chunk of n query tokens (the last n of a context of `ctx`), causal: (n, H, D) -> (n, H, D)."""
    n, H, D = q.shape
    page_size, n_kv = k_pool.shape[1], k_pool.shape[2]
    n_pages = -(-ctx // page_size)
    pages = block_table[slot, layer, :n_pages].long()  # (P,)
    k = k_pool[pages].reshape(-1, n_kv, D)[:ctx].transpose(0, 1)[None]  # (1, Hkv, ctx, D)
    v = v_pool[pages].reshape(-1, n_kv, D)[:ctx].transpose(0, 1)[None]
    qh = q.transpose(0, 1)[None]  # (1, H, n, D)
    if n == ctx:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        keys = torch.arange(ctx, device=q.device)[None, :]
        mask = keys <= (ctx - n + torch.arange(n, device=q.device))[:, None]  # (n, ctx)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)  # (n, H, D)
