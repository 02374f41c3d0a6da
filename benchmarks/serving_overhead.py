"""What serving through Dask costs per decode step: the bare block engine against the same engine
behind a Dask worker (a BlockHost reached by blockllm.Client on a one-worker LocalCluster).

    python -m benchmarks.serving_overhead --preset h100     # on the GPU
    python -m benchmarks.serving_overhead --preset cpu      # tiny shapes, a smoke test

Same random-weight model (read from a file:// zoo by both), same batches of greedy requests, run
alternately in one process run. A decode step is timed as (last token - first token) / (tokens - 1)
per request: by the loop itself for the bare engine, by the block host's own timestamps when
served (the client is not on the per-token path). Writes benchmarks/results/serving_overhead-<preset>.json/.png.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_decode import Shape, embed_head, layer_tensors

log = logging.getLogger("benchmarks.serving_overhead")

PRESETS: dict[str, dict[str, Any]] = {
    "h100": {"shape": Shape("llama-1.1b", 22, 2048, 5632, 32, 4, 32000), "batches": [1, 8, 32, 64], "prompt": 128, "new": 64, "repeats": 2, "kv_pages": 24000},
    "cpu": {"shape": Shape("tiny-b", 4, 128, 256, 4, 1, 512), "batches": [1, 4], "prompt": 16, "new": 12, "repeats": 2, "kv_pages": 2048},
}  # fmt: skip
MODEL = "bench/llama"
# Steady decode on both sides: every prompt prefilled in one step, every request handed to the
# engine at once (admission pacing shapes time to first token, not the per-step cost measured here).
SETTINGS = {"engine.prefill-chunk": 8192, "serving.engine-waiting": 1024}


def apply_settings() -> dict[str, Any]:
    """SETTINGS here (dask.config) and in the workers to be started (their environment)."""
    import dask

    for k, v in SETTINGS.items():
        os.environ["DASK_BLOCKLLM__" + k.upper().replace(".", "__").replace("-", "_")] = str(v)
    dask.config.set({f"blockllm.{k}": v for k, v in SETTINGS.items()})
    return dict(SETTINGS)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")


def build_zoo(url: str, s: Shape, seed: int = 0) -> str:
    """A random-weight Llama of shape `s` in the zoo at `url` (kept if already there); its key."""
    from blockllm.engine.source import make_spec
    from blockllm.families.llama import arch_of
    from zoo_store import Manifest, Zoo

    zoo = Zoo(url)
    tenant, name = MODEL.split("/")
    if zoo.has_model(tenant, name):
        return MODEL
    torch.manual_seed(seed)
    cfg, cpu, dt = s.config(), torch.device("cpu"), torch.bfloat16
    arch = arch_of(cfg)
    embed, head = embed_head(s, cpu, dt)
    chain = [zoo.put_block(make_spec("embed", arch, 0, 0, embed), embed)]
    for i in range(s.layers):
        t = layer_tensors(s, cpu, dt)
        chain.append(zoo.put_block(make_spec("layers", arch, i, i + 1, t), t))
    chain.append(zoo.put_block(make_spec("head", arch, s.layers, s.layers, head, tied_embedding=False), head))
    zoo.put_manifest(Manifest(tenant=tenant, name=name, family="llama", chain=tuple(chain), config=cfg, visibility="shared"))
    return MODEL


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def bare_steps(engine: Any, batch: int, p: dict[str, Any], seed: int) -> dict[str, float]:
    """Per-step ms (median over requests) of the engine stepped in this loop, and the wall time."""
    from blockllm.types import Request, SamplingParams

    sp = SamplingParams(max_new_tokens=p["new"], ignore_eos=True)
    ids = prompts(batch, p["prompt"], p["shape"].vocab, seed)
    reqs = [Request(uuid.uuid4().hex, MODEL, tuple(x), sp) for x in ids]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    tokens = {}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
            if o.finished:
                tokens[o.request_id] = o.token_ids
    wall = time.perf_counter() - t0
    per = [(last[r.request_id] - first[r.request_id]) / (p["new"] - 1) for r in reqs]
    return {"step_ms": 1e3 * statistics.median(per), "wall_s": wall, "tokens": [list(tokens[r.request_id]) for r in reqs]}


def served_steps(client: Any, batch: int, p: dict[str, Any], seed: int, model: str = MODEL) -> dict[str, float]:
    """The same through the cluster: per-step ms from the host's timestamps, and the client's wall time."""
    from blockllm.client import GenerationRequest
    from blockllm.types import SamplingParams

    sp = SamplingParams(max_new_tokens=p["new"], ignore_eos=True)
    ids = prompts(batch, p["prompt"], p["shape"].vocab, seed)
    t0 = time.perf_counter()
    futures = client.submit([GenerationRequest(model=model, prompt_token_ids=x, sampling=sp) for x in ids])
    done = [f.result(600) for f in futures]
    wall = time.perf_counter() - t0
    per = [(c.latency - c.ttft) / (p["new"] - 1) for c in done]
    return {"step_ms": 1e3 * statistics.median(per), "wall_s": wall, "tokens": [list(c.token_ids) for c in done]}


def start_cluster(n_workers: int, zoo_url: str, engine: dict[str, Any], one_gpu_each: bool | None = None) -> tuple[Any, Any, Any]:
    """A local cluster of `n_workers` processes and a blockllm.Client. Where the machine has a GPU
    per worker (or `one_gpu_each`), each worker process sees only its own (CUDA_VISIBLE_DEVICES,
    as dask-cuda does); otherwise all share this machine's device."""
    import distributed

    from blockllm.auth import create_key
    from blockllm.client import Client
    from zoo_store import Zoo

    if one_gpu_each is None:
        one_gpu_each = n_workers > 1 and torch.cuda.device_count() >= n_workers
    if one_gpu_each:
        workers = {
            f"gpu{i}": {"cls": distributed.Nanny, "options": {
                "nthreads": 2, "host": "127.0.0.1", "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
            for i in range(n_workers)
        }  # fmt: skip
        cluster = distributed.SpecCluster(
            workers=workers,
            scheduler={"cls": distributed.Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}},
            silence_logs=logging.WARNING,
        )
    else:
        cluster = distributed.LocalCluster(
            n_workers=n_workers, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0",
            host="127.0.0.1", silence_logs=logging.WARNING,
        )  # fmt: skip
    dask = distributed.Client(cluster)
    key = create_key(Zoo(zoo_url), "bench")
    return cluster, dask, Client(dask, api_key=key, zoo=zoo_url, engine=engine)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["batches"]
    bs = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bs, [r["bare_step_ms"] for r in rows], marker="o", label="bare engine")
    ax.plot(bs, [r["served_step_ms"] for r in rows], marker="o", label="through a Dask worker")
    for r in rows:
        ax.annotate(f"{r['overhead_pct']:+.1f}%", (r["batch"], r["served_step_ms"]), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title(f"serving overhead, {result['shape']['name']} — {result['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(preset: str, out_dir: Path, zoo_url: str | None = None, repeats: int | None = None, batches: list[int] | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    from blockllm import config as _config
    from blockllm.engine import Engine
    from zoo_store import Zoo

    p = dict(PRESETS[preset])
    p["repeats"] = repeats or p["repeats"]
    p["batches"] = batches or p["batches"]
    settings = apply_settings()
    zoo_url = zoo_url or (Path(_config.cache_dir()) / f"bench-zoo-{p['shape'].name}").as_uri()
    t = time.perf_counter()
    build_zoo(zoo_url, p["shape"])
    built = time.perf_counter() - t
    engine_kw = {"kv_pages": p["kv_pages"], "max_batch_size": max(p["batches"])}
    engine = Engine(Zoo(zoo_url, read_only=True), **engine_kw)
    engine.load(MODEL)
    cluster, dask, client = start_cluster(1, zoo_url, engine_kw)
    result: dict[str, Any] = {
        "preset": preset, "device": device_name(), "torch": torch.__version__, "shape": asdict(p["shape"]),
        "prompt_tokens": p["prompt"], "new_tokens": p["new"], "repeats": p["repeats"], "zoo_build_s": built,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "batches": [],
        "method": "median over requests of (last token - first token) / (new tokens - 1); bare and served alternate, median of repeats",
        "settings": settings,
    }  # fmt: skip
    try:
        client.place([MODEL])
        for b in p["batches"]:  # warm-up: graphs captured, kernels compiled, on both sides
            bare_steps(engine, b, p, seed=b)
            served_steps(client, b, p, seed=b)
        for b in p["batches"]:
            bare, served = [], []
            for r in range(p["repeats"]):
                bare.append(bare_steps(engine, b, p, seed=100 + r))
                served.append(served_steps(client, b, p, seed=100 + r))
            bm = statistics.median(x["step_ms"] for x in bare)
            sm = statistics.median(x["step_ms"] for x in served)
            row = {
                "batch": b, "bare_step_ms": bm, "served_step_ms": sm, "overhead_pct": 100 * (sm / bm - 1),
                "bare_wall_s": statistics.median(x["wall_s"] for x in bare),
                "served_wall_s": statistics.median(x["wall_s"] for x in served),
                "same_tokens": all(x["tokens"] == y["tokens"] for x, y in zip(bare, served, strict=True)),
                "bare_runs_ms": [x["step_ms"] for x in bare], "served_runs_ms": [x["step_ms"] for x in served],
            }  # fmt: skip
            result["batches"].append(row)
            log.warning("batch %d: bare %.3f ms, served %.3f ms (%+.1f%%)", b, bm, sm, row["overhead_pct"])
    finally:
        client.close()
        dask.close()
        cluster.close()
    result["max_overhead_pct"] = max(r["overhead_pct"] for r in result["batches"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"serving_overhead-{preset}"
    import json

    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, stem.with_suffix(".png"))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--zoo", default=None, help="zoo URL for the random model (default: under the cache dir)")
    ap.add_argument("--repeats", type=int, default=None, help="alternating bare/served runs per batch (default: the preset's)")
    ap.add_argument("--batches", default="", help="comma list of batch sizes (default: the preset's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",") if b]
    r = run(args.preset, args.out, args.zoo, args.repeats, batches or None)
    for row in r["batches"]:
        print(f"batch {row['batch']:>3}: bare {row['bare_step_ms']:.3f} ms  served {row['served_step_ms']:.3f} ms  overhead {row['overhead_pct']:+.1f}%")


if __name__ == "__main__":
    main()
