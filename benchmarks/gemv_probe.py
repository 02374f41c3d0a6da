"""Decode GEMMs of the 1.1B / 8B shapes: cuBLAS against the Triton GEMVs per tile config.

One row: triton_ops.gemv per (BLOCK_N, BLOCK_K, warps, stages). `--rows 2,4,8,16`: the row-bucket
GEMV (triton_gemv.gemv) per Tile, and the fused layer pieces (norm + qkv + rope + KV write, norm +
gate_up + SwiGLU) against the unfused kernels they replace. Each candidate runs over enough distinct
copies of the weight (>= 256 MiB) that L2 never holds the next one, all captured in one CUDA graph:
the time per call is what a captured decode step pays.

    python -m benchmarks.gemv_probe                  # on the GPU; results/gemv_probe-<gpu>.json
    python -m benchmarks.gemv_probe --rows 2,4,8,16  # results/gemv_probe-<gpu>-rows.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name: (N, K, residual)
    "1.1b.qkv": (2560, 2048, False), "1.1b.o": (2048, 2048, True), "1.1b.gate_up": (11264, 2048, False),
    "1.1b.down": (2048, 5632, True), "1.1b.head": (32000, 2048, False),
    "8b.qkv": (6144, 4096, False), "8b.o": (4096, 4096, True), "8b.gate_up": (28672, 4096, False),
    "8b.down": (4096, 14336, True),
}  # fmt: skip
CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (4, 512, 4, 3), (8, 512, 4, 3), (8, 256, 4, 4), (8, 1024, 4, 2), (8, 512, 8, 3), (16, 512, 8, 3),
    (16, 256, 4, 4), (4, 1024, 8, 2), (2, 1024, 4, 2), (8, 512, 2, 3), (4, 256, 2, 4), (16, 1024, 8, 2),
    (1, 1024, 4, 2), (2, 2048, 4, 2), (2, 1024, 2, 2), (2, 1024, 8, 2), (4, 1024, 4, 2), (2, 1024, 4, 3),
    (2, 512, 4, 2), (1, 2048, 4, 2), (1, 1024, 2, 2), (4, 2048, 8, 2),
]  # fmt: skip


def _graph_us(calls, reps: int = 10) -> float:
    """Microseconds per call of `calls` (a list of thunks) captured in one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return 1e3 * a.elapsed_time(b) / reps / len(calls)


def probe_shape(N: int, K: int, residual: bool) -> dict:
    from blockllm.engine import triton_ops

    dev = torch.device("cuda")
    nbytes = N * K * 2
    copies = max(4, min(64, -(-(256 << 20) // nbytes)))
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    ys = [torch.zeros(1, N, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    if residual:
        cub = [lambda w=w, y=y: y.addmm_(x, w.t()) for w, y in zip(ws, ys, strict=True)]
    else:
        cub = [lambda w=w: F.linear(x, w) for w in ws]
    row = {"N": N, "K": K, "residual": residual, "MB": nbytes / 1e6, "copies": copies}
    row["cublas_us"] = _graph_us(cub)
    row["cublas_GBps"] = nbytes / row["cublas_us"] / 1e3
    ref = (x.float() @ ws[0].float().t())
    best = None
    for bn, bk, nw, ns in CONFIGS:
        name = f"n{bn}k{bk}w{nw}s{ns}"
        try:
            def call(w, y, bn=bn, bk=bk, nw=nw, ns=ns):
                return triton_ops.gemv(x, w, y if residual else None, bn, bk, nw, ns)

            got = call(ws[0], torch.zeros(1, N, device=dev, dtype=torch.bfloat16)).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            us = _graph_us([lambda w=w, y=y: call(w, y) for w, y in zip(ws, ys, strict=True)])
            row[name] = {"us": us, "GBps": nbytes / us / 1e3, "rel_err": err}
            if err < 2e-2 and (best is None or us < row[best]["us"]):
                best = name
        except Exception as e:  # a config that does not compile or fit is recorded, not fatal
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    row["best"] = best
    if best:
        row["best_over_cublas"] = row[best]["us"] / row["cublas_us"]
    del ws, ys
    torch.cuda.empty_cache()
    return row


def _copies(nbytes: int) -> int:
    return max(4, min(64, -(-(256 << 20) // nbytes)))


def row_tiles(m: int) -> list:
    """The row-bucket GEMV tiles tried for m rows: the default (gpu_tile) first, then CUDA-core tiles
    (up to 4 rows) and tensor-core ones, each keeping its float32 accumulator at most 8192 values."""
    from blockllm.engine.triton_gemv import Tile, gpu_tile

    bm = 1 << (m - 1).bit_length()
    tiles = [gpu_tile(m)]
    if m <= 4:
        tiles += [Tile(bm, p, k, False, w, 2) for p in (1, 2, 4) for k in (256, 512, 1024) for w in (4, 8)
                  if bm * 2 * p * k <= 8192]  # fmt: skip
    tiles += [Tile(16, p, k, True, w, st) for p in (8, 16, 32) for k in (64, 128, 256) for w in (4, 8) for st in (3, 4)
              if 2 * p * k <= 8192]  # fmt: skip
    return list(dict.fromkeys(tiles))


def probe_rows(N: int, K: int, residual: bool, m: int) -> dict:
    """m rows against cuBLAS: the row-bucket GEMV per tile (its default first)."""
    from blockllm.engine import triton_gemv

    dev = torch.device(DEVICE)
    nbytes = N * K * 2
    ws = [torch.randn(N, K, device=dev, dtype=DTYPE) * 0.02 for _ in range(_copies(nbytes))]
    x = torch.randn(m, K, device=dev, dtype=DTYPE)
    ys = [torch.zeros(m, N, device=dev, dtype=DTYPE) for _ in ws]
    if residual:
        cub = [lambda w=w, y=y: y.addmm_(x, w.t()) for w, y in zip(ws, ys, strict=True)]
    else:
        cub = [lambda w=w: F.linear(x, w) for w in ws]
    row = {"N": N, "K": K, "rows": m, "residual": residual, "MB": nbytes / 1e6, "cublas_us": _graph_us(cub)}
    ref = x.float() @ ws[0].float().t()
    best = None
    for i, t in enumerate(row_tiles(m)):
        name = "default" if i == 0 else f"m{t.block_m}p{t.pairs}k{t.block_k}{'dot' if t.dot else 'fma'}w{t.num_warps}s{t.num_stages}"
        try:
            def call(w, y, t=t):
                return triton_gemv.gemv(x, w, y if residual else None, tile=t)

            got = call(ws[0], torch.zeros(m, N, device=dev, dtype=DTYPE)).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            us = _graph_us([lambda w=w, y=y: call(w, y) for w, y in zip(ws, ys, strict=True)])
            row[name] = {"tile": list(t), "us": us, "GBps": nbytes / us / 1e3, "rel_err": err}
            if err < 2e-2 and (best is None or us < row[best]["us"]):
                best = name
        except Exception as e:  # a tile that does not compile or fit is recorded, not fatal
            row[name] = {"tile": list(t), "error": f"{type(e).__name__}: {str(e)[:200]}"}
    row["best"] = best
    if best:
        row["best_over_cublas"] = row[best]["us"] / row["cublas_us"]
        if "us" in row.get("default", {}):
            row["default_over_cublas"] = row["default"]["us"] / row["cublas_us"]
    del ws, ys
    torch.cuda.empty_cache()
    return row


DEVICE, DTYPE = "cuda", torch.bfloat16  # the probes of rows and fused pieces (a CPU check swaps them)
LAYERS = {"1.1b": (2048, 5632, 32, 4), "8b": (4096, 14336, 32, 8)}  # hidden, intermediate, heads, KV heads


def probe_fused(name: str, m: int) -> dict:
    """The fused pieces of one layer (triton_gemv.qkv_rope_kv, gate_up_silu) against the kernels they
    replace (rms_norm, the GEMM: row-bucket GEMV or cuBLAS, then rope + KV write or silu_mul), on m rows."""
    from blockllm.engine import ops, triton_gemv, triton_ops

    C, inter, H, Hkv = LAYERS[name]
    D, page, dev, dt = C // H, 16, torch.device(DEVICE), DTYPE
    n = _copies(((H + 2 * Hkv) * D + 2 * inter) * C * 2)
    qkv_w = [torch.randn((H + 2 * Hkv) * D, C, device=dev, dtype=dt) * 0.02 for _ in range(n)]
    gu_w = [torch.randn(2 * inter, C, device=dev, dtype=dt) * 0.02 for _ in range(n)]
    x = torch.randn(m, C, device=dev, dtype=dt)
    ln = 1 + 0.1 * torch.randn(C, device=dev, dtype=dt)
    pos = torch.arange(m, device=dev, dtype=torch.int32) * 7 + 100
    slots = torch.arange(1, m + 1, device=dev, dtype=torch.int32)
    pages = 40 * (m + 1) + 1
    table = torch.randperm(pages - 1, device=dev)[: (m + 1) * 40].view(m + 1, 1, 40).int() + 1
    kp, vp = (torch.zeros(pages, page, Hkv, D, device=dev, dtype=dt) for _ in range(2))
    cs = torch.randn(1024, 2, D // 2, device=dev)

    def lin(h, w, gemv):
        return triton_gemv.gemv(h, w) if gemv else F.linear(h, w)

    def qkv_unfused(w, gemv):
        qkv = lin(ops.rms_norm(x, ln, 1e-5), w, gemv)
        return triton_ops.rope_and_store_kv(qkv, pos, slots, 0, cs, kp, vp, table, H, Hkv)

    def mlp_unfused(w, gemv):
        return triton_ops.silu_mul(lin(ops.rms_norm(x, ln, 1e-5), w, gemv))

    row: dict = {"layer": name, "rows": m}
    for part, ws, fused, unfused in (
        ("qkv", qkv_w, lambda w: triton_gemv.qkv_rope_kv(x, w, pos, slots, 0, cs, kp, vp, table, H, Hkv, ln, 1e-5),
         qkv_unfused),
        ("gate_up", gu_w, lambda w: triton_gemv.gate_up_silu(x, w, ln, 1e-5), mlp_unfused),
    ):  # fmt: skip
        r = row[part] = {}
        for label, fn in (("fused", fused), ("gemv", lambda w, f=unfused: f(w, True)),
                          ("cublas", lambda w, f=unfused: f(w, False))):  # fmt: skip
            try:
                r[label + "_us"] = _graph_us([lambda w=w, fn=fn: fn(w) for w in ws])
            except Exception as e:
                r[label + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if "fused_us" in r and "cublas_us" in r:
            r["fused_over_cublas"] = r["fused_us"] / r["cublas_us"]
            r["fused_over_gemv"] = r["fused_us"] / r.get("gemv_us", float("nan"))
    del qkv_w, gu_w
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma list of shape names (default all)")
    ap.add_argument("--rows", default="", help="comma list of row counts 2-16: the row-bucket GEMV and fused pieces")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SHAPES)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shapes": {}}  # fmt: skip
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    if args.rows:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"gemv_probe-{gpu}-rows.json"
        out["fused"] = {}
        for m in (int(r) for r in args.rows.split(",")):
            for n in names:
                out["shapes"][f"{n}@{m}"] = r = probe_rows(*SHAPES[n], m)
                print(f"{n:>13} m={m:>2}: cuBLAS {r['cublas_us']:7.2f} us  default {r.get('default_over_cublas', float('nan')):.3f}x"
                      f"  best {r['best']} {r.get('best_over_cublas', float('nan')):.3f}x", flush=True)  # fmt: skip
                path.write_text(json.dumps(out, indent=1))
            for layer in LAYERS:
                out["fused"][f"{layer}@{m}"] = r = probe_fused(layer, m)
                print(f"{layer:>13} m={m:>2}: " + "  ".join(
                    f"{p} fused/cuBLAS {r[p].get('fused_over_cublas', float('nan')):.3f} fused/gemv {r[p].get('fused_over_gemv', float('nan')):.3f}"
                    for p in ("qkv", "gate_up")), flush=True)  # fmt: skip
                path.write_text(json.dumps(out, indent=1))
        return
    for n in names:
        out["shapes"][n] = r = probe_shape(*SHAPES[n])
        print(f"{n:>13}: {r['MB']:7.1f} MB  cuBLAS {r['cublas_us']:7.2f} us ({r['cublas_GBps']:5.0f} GB/s)  best "
              f"{r['best']} {r[r['best']]['us'] if r['best'] else float('nan'):7.2f} us "
              f"({r[r['best']]['GBps'] if r['best'] else float('nan'):5.0f} GB/s)", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gemv_probe-{gpu}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
