"""What one prefill step costs on the engine, host against device: wall time, kernel time and
kernel launches for a few prompt mixes, beside running decodes (the step an arrival forces).
Prefills run on the segment graphs by default; DASK_BLOCKLLM__ENGINE__PREFILL_GRAPHS=false
measures the eager path.

    python -m benchmarks.prefill_probe --preset h100   # Llama-1.1B shape, random bf16 weights
    python -m benchmarks.prefill_probe --preset cpu    # tiny shape: a smoke test of the harness

Writes benchmarks/results/prefill_probe-<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.batch_online import PRESETS, build_engine
from benchmarks.engine_decode import sync

log = logging.getLogger("benchmarks.prefill_probe")

# (prompts, tokens each, running decodes beside them)
MIXES = ((1, 512, 0), (4, 128, 0), (16, 32, 0), (4, 128, 16))


def _add(eng, model: str, tag: str, n: int, length: int, vocab: int, rng, max_new: int) -> None:
    from blockllm.types import Request, SamplingParams

    for i in range(n):
        prompt = tuple(int(t) for t in rng.integers(3, vocab, length))
        eng.add_request(Request(f"{tag}-{i}", model, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True)))


def _drain(eng) -> None:
    for s in list(eng.scheduler.running) + list(eng.scheduler.waiting):
        eng.abort(s.req.request_id)
    while eng.has_unfinished():
        eng.step()


def probe(eng, model: str, vocab: int, max_prompt: int, device: torch.device, reps: int = 5) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    rng = np.random.default_rng(0)
    rows = []
    for n, length, running in MIXES:
        length = min(length, max_prompt)  # the cpu preset's tiny context
        if n * length > eng.scheduler.prefill_chunk:
            continue
        walls, prof_row = [], {}
        for k in range(reps + 1):
            if running:
                _add(eng, model, f"d{n}-{length}-{k}", running, 16, vocab, rng, 10**4)
                while any(len(s.tokens) - s.computed > 1 for s in (*eng.scheduler.running, *eng.scheduler.waiting)):
                    eng.step()
                for _ in range(4):
                    eng.step()
            _add(eng, model, f"p{n}-{length}-{k}", n, length, vocab, rng, 2)
            sync(device)
            if k == reps:  # the last one under the profiler (its overhead stays out of the wall times)
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    while any(s.computed < s.n_prompt for s in (*eng.scheduler.running, *eng.scheduler.waiting)):
                        eng.step()
                    sync(device)
                ev = prof.key_averages()
                kern = [e for e in ev if (getattr(e, "device_time_total", 0) or 0) > 0 and e.device_type.name == "CUDA"]
                prof_row = {
                    "kernel_us": sum(e.device_time_total for e in kern),
                    "kernel_launches": sum(e.count for e in kern),
                    "top_kernels": sorted(((e.key[:70], e.count, round(e.device_time_total)) for e in kern), key=lambda r: -r[2])[:8],
                    "top_cpu_ops": sorted(((e.key[:50], e.count, round(e.self_cpu_time_total)) for e in ev if e.device_type.name == "CPU"),
                                          key=lambda r: -r[2])[:10],
                }  # fmt: skip
            else:
                t = time.perf_counter()
                steps = 0
                while any(s.computed < s.n_prompt for s in (*eng.scheduler.running, *eng.scheduler.waiting)):
                    eng.step()
                    steps += 1
                sync(device)
                if k:  # the first rep compiles
                    walls.append((time.perf_counter() - t) * 1e3)
            _drain(eng)
        row = {"prompts": n, "tokens_each": length, "running_decodes": running, "wall_ms_median": float(np.median(walls)),
               "wall_ms_all": walls, "steps": steps, **prof_row}  # fmt: skip
        log.info("%s", {k: v for k, v in row.items() if k not in ("top_kernels", "top_cpu_ops")})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset != "cpu" else "cpu")
    eng, model = build_engine(p, device)
    result = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "prefill_chunk": eng.scheduler.prefill_chunk, "rows": probe(eng, model, p.shape.vocab, p.max_prompt, device)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill_probe-{args.preset}{args.tag}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    for r in result["rows"]:
        print(json.dumps(r, default=str))


if __name__ == "__main__":
    main()
