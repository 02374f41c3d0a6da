"""The row-bucket GEMV kernels against the torch ops they replace, and the engine with every Triton
kernel on (test_triton_cpu.py runs this under TRITON_INTERPRET=1, one JSON line out; GPU tests on
CUDA), and the kernels compiled for Hopper without a GPU (their registers and spills)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from blockllm.engine import ops, triton_gemv
from blockllm.engine.triton_gemv import gpu_tile, tile_for

ROWS = (1, 2, 3, 4, 5, 16)
DTYPES = (torch.float32, torch.float16)  # the interpreter's bf16 tl.dot is wrong (numpy has no bf16)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def kernel_errors(device: str = "cpu", dtypes: tuple[torch.dtype, ...] = DTYPES, K: int = 200, N: int = 77) -> dict[str, float]:
    """{case: relative error} of each kernel and tile against rms_norm -> F.linear -> the next op in
    fp32. The default K and N leave a partial K step and a partial tile of weight rows."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    out: dict[str, float] = {}
    eps = 1e-6
    for dt in dtypes:
        for m in ROWS:
            for tname, tile in (("gpu", gpu_tile(m)), ("wide", tile_for(m))):
                tag = f"{dt}-{m}-{tname}"
                x, w, r = rand(m, K, dt=dt), rand(N, K, scale=K**-0.5, dt=dt), rand(m, N, dt=dt)
                ln = (1 + rand(K, scale=0.1)).to(dt)
                out[f"gemv/{tag}"] = _err(triton_gemv.gemv(x, w, tile=tile), F.linear(x.float(), w.float()))
                res = triton_gemv.gemv(x, w, residual=r.clone(), tile=tile)
                out[f"residual/{tag}"] = _err(res, r.float() + F.linear(x.float(), w.float()))
                h = ops.rms_norm_ref(x, ln, eps)
                got = triton_gemv.gemv(x, w, norm=ln, eps=eps, tile=tile)
                out[f"norm/{tag}"] = _err(got, F.linear(h.float(), w.float()))
                wg = rand(2 * 43, K, scale=K**-0.5, dt=dt)
                act = triton_gemv.gate_up_silu(x, wg, ln, eps, tile=tile)
                out[f"gate_up_silu/{tag}"] = _err(act, ops.silu_mul_ref(F.linear(h.float(), wg.float())))
                out.update({f"{k}/{tag}": v for k, v in _qkv_errors(m, dt, tile, rand, g).items()})
    return out


def _qkv_errors(m: int, dt: torch.dtype, tile, rand, g: torch.Generator) -> dict[str, float]:
    """qkv_rope_kv against rms_norm -> F.linear -> rope_and_store_kv_ref: q and the K/V pages written."""
    H, Hkv, D, C, page, eps = 4, 2, 16, 64, 4, 1e-6
    x, w = rand(m, C, dt=dt), rand((H + 2 * Hkv) * D, C, scale=C**-0.5, dt=dt)
    ln = (1 + rand(C, scale=0.1)).to(dt)
    dev = x.device
    pos = torch.randint(0, 20, (m,), generator=g, dtype=torch.int32).to(dev)
    slots = torch.arange(1, m + 1, dtype=torch.int32, device=dev)  # one request a row
    table = (torch.randperm((m + 1) * 2 * 6, generator=g).view(m + 1, 2, 6).int() + 1).to(dev)
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(64).float()[:, None] * inv[None, :]
    cos_sin = torch.stack((ang.cos(), ang.sin()), dim=1).contiguous().to(dev)  # (T, 2, D/2)
    pools = [torch.zeros(int(table.max()) + 1, page, Hkv, D, dtype=dt, device=dev) for _ in range(4)]
    q = triton_gemv.qkv_rope_kv(x, w, pos, slots, 1, cos_sin, pools[0], pools[1], table, H, Hkv, ln, eps, tile)
    qkv = F.linear(ops.rms_norm_ref(x, ln, eps).float(), w.float())
    want = ops.rope_and_store_kv_ref(qkv, pos, slots, 1, cos_sin, pools[2], pools[3], table, H, Hkv)
    return {"qkv_q": _err(q, want), "qkv_k": _err(pools[0], pools[2]), "qkv_v": _err(pools[1], pools[3])}


def hopper_resources() -> dict[str, dict[str, int]]:
    """{kernel/rows/norm: {"REG", "STACK", "LOCAL"}}: every triton_gemv kernel on every GPU tile,
    compiled for sm_90 (no GPU needed), its resources as cuobjdump reads them off the cubin."""
    import inspect
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    P = "*bf16"
    types = {"X": P, "LN": P, "W": P, "Y": P, "Q": P, "KP": P, "VP": P, "POS": "*i32", "SLOT": "*i32",
             "BT": "*i32", "CS": "*fp32", "eps": "fp32"}  # fmt: skip
    out: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as d:
        for m in ROWS:
            t = gpu_tile(m)
            for norm in (False, True):
                common = {"BLOCK_M": t.block_m, "BLOCK_K": t.block_k, "DOT": t.dot, "NORM": norm}
                for fn, consts in (
                    (triton_gemv._gemv_rows_kernel, {**common, "RESIDUAL": True, "BLOCK_R": 2 * t.pairs}),
                    (triton_gemv._qkv_rope_kv_kernel, {**common, "H": 32, "HKV": 4, "HALF": 32, "PAGE": 16,
                                                       "R": min(t.pairs, 32)}),  # fmt: skip
                    (triton_gemv._gate_up_silu_kernel, {**common, "R": t.pairs}),
                ):
                    names = inspect.signature(fn.fn).parameters
                    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
                    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                       options={"num_warps": t.num_warps, "num_stages": t.num_stages, "enable_fp_fusion": True})  # fmt: skip
                    cubin = Path(d) / "k.cubin"
                    cubin.write_bytes(k.asm["cubin"])
                    usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
                    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
                    out[f"{fn.fn.__name__}/{m}/{'norm' if norm else 'plain'}"] = {k: int(v) for k, v in found.items()}
    return out


def engine_tokens(zoo_url: str, prompts: list[list[int]], n: int) -> dict:
    """Greedy tokens of every tiny-family member, alone and mixed in one batch, with
    GEMVs of up to 16 rows fused with their neighbours; and how often each fused kernel ran."""
    import dask.config

    from blockllm.demo import members
    from blockllm.engine import Engine, triton_ops
    from blockllm.model_sets import build_tiny_family
    from blockllm.types import Request, SamplingParams
    from zoo_store import Zoo

    calls = {name: 0 for name in ("qkv_rope_kv", "gate_up_silu", "gemv_rows")}
    for name in calls:
        fn = getattr(triton_ops, name)

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        setattr(triton_ops, name, counted)
    family = build_tiny_family()
    cfg = {"blockllm.engine.gemv-rows": 16, "blockllm.engine.gemv-fuse": True, "blockllm.engine.fold-norms": False}
    with dask.config.set(cfg):
        eng = Engine(Zoo(zoo_url), device="cpu", dtype=torch.float32, prefill_chunk=4)
    assert (eng.gemv, eng.gemv_fuse) == (16, True), (eng.gemv, eng.gemv_fuse)
    keys = [m.key for m in members(family)]
    for k in keys:
        eng.load(k)

    def req(rid: str, key: str, i: int) -> Request:
        return Request(rid, key, tuple(prompts[i]), SamplingParams(max_new_tokens=n))

    # alone: each member on one prompt (in turn); mixed: every member on the first two, in one batch
    alone = {f"{k}|{j % len(prompts)}": eng.generate([req("a", k, j % len(prompts))])[0].token_ids for j, k in enumerate(keys)}
    batch = [req(f"{k}|{i}", k, i) for k in keys for i in range(min(2, len(prompts)))]
    mixed = {r.request_id: list(o.token_ids) for r, o in zip(batch, eng.generate(batch), strict=True)}
    return {"alone": {k: list(v) for k, v in alone.items()}, "mixed": mixed, "calls": calls}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    what = json.loads(sys.argv[1])
    result: dict = {}
    if "kernels" in what:
        result["kernels"] = kernel_errors()
    if "engine" in what:
        e = what["engine"]
        result["engine"] = engine_tokens(e["zoo"], e["prompts"], e["n"])
    print(json.dumps(result))
