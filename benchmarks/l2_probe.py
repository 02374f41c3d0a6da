"""Does an L2 prefetch pay on this GPU? A 22-layer chain of the 1.1B shape's four GEMMs (a small
kernel after each), captured as one CUDA graph, with and without each GEMM forking the next
GEMM's weight into L2 on a side stream.

    python -m benchmarks.l2_probe        # on the GPU; writes benchmarks/results/l2_probe-<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}


def probe(rows: int, layers: int, modes: list[tuple[str, int]], mb: float) -> dict:
    from blockllm.engine import triton_ops

    dev = torch.device("cuda")
    res: dict = {"rows": rows}
    # the chain: 22 layers x 4 GEMMs + a small kernel between them, one graph, prefetch forked per GEMM
    ws = [[torch.randn(*SHAPES[g], device=dev, dtype=torch.bfloat16) * 0.01 for g in SHAPES] for _ in range(layers)]
    h = torch.randn(rows, 2048, device=dev, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    seq = [w for lw in ws for w in lw]

    def chain(mode: str, programs: int) -> None:
        x = h
        for i, w in enumerate(seq):
            if mode != "off" and i + 1 < len(seq):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    triton_ops.l2_prefetch(seq[i + 1], int(mb * 2**20), mode, programs)
            k = w.shape[1]
            a = x[:, :k] if x.shape[1] >= k else F.pad(x, (0, k - x.shape[1]))
            x = torch.tanh(F.linear(a, w))  # the small kernel between GEMMs
        if mode != "off":
            torch.cuda.current_stream().wait_stream(side)

    total = sum(w.numel() * 2 for w in seq)
    res["chain"] = {"weight_MB": total / 1e6}
    for mode, programs in [("off", 0), *modes, ("off", 0)]:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            chain(mode, programs)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain(mode, programs)
        g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        us = 1e3 * a.elapsed_time(b) / 20
        res["chain"][f"{mode}:{programs}"] = {"us": us, "GBps": total / us / 1e3}
        print("chain", rows, mode, programs, res["chain"][f"{mode}:{programs}"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--modes", default="prefetch:0,prefetch:4,prefetch:16,prefetch:64,evict_last:16",
                    help="comma list of MODE:PROGRAMS (0: one program a 64 KiB chunk)")
    ap.add_argument("--mb", type=float, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "mb": args.mb,
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}  # fmt: skip
    for r in args.rows.split(","):
        modes = [(m, int(n)) for m, _, n in (x.partition(":") for x in args.modes.split(","))]
        out["runs"].append(probe(int(r), 22, modes, args.mb))
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name().split()[-1].lower()
    (args.out / f"l2_probe-{name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
