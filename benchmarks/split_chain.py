"""A chain split across two Dask workers: what the hand-off costs per decode step, and what
speculation (the first segment pre-running step t+1 on a guessed token) saves.

    python -m benchmarks.split_chain --preset h100     # two worker processes on one GPU
    python -m benchmarks.split_chain --preset cpu      # tiny shapes, a smoke test

Side by side in one run, same random-weight model and batches: the whole chain served by one
worker; the chain split at its middle layer over two workers, speculation off and on; and the
same two segments driven in this process with direct calls (no Dask, no hand-off), the compute
baseline. Per-step times as in serving_overhead.py. Writes benchmarks/results/split_chain-<preset>.json/.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving_overhead import (
    MODEL,
    apply_settings,
    build_zoo,
    device_name,
    prompts,
    served_steps,
    start_cluster,
)

log = logging.getLogger("benchmarks.split_chain")

PRESETS: dict[str, dict[str, Any]] = {
    "h100": {"shape": "llama-1.1b", "batches": [1, 8, 32], "prompt": 128, "new": 64, "repeats": 2, "kv_pages": 24000},
    "cpu": {"shape": "tiny-b", "batches": [1, 4], "prompt": 16, "new": 12, "repeats": 2, "kv_pages": 2048},
}  # fmt: skip


def _shape(preset: str):
    from benchmarks.serving_overhead import PRESETS as SO

    return SO[preset]["shape"]


def _split_stats(client: Any) -> dict[str, float]:
    """Summed split-driver counters over the workers (guesses, hits, misses, steps, wait)."""
    out: dict[str, float] = {"guesses": 0, "hits": 0, "misses": 0, "steps": 0, "wait_seconds": 0.0}
    for st in client.stats().values():
        for k in out:
            out[k] += (st.get("split") or {}).get(k, 0)
    return out


def _set_speculation(dask: Any, on: bool) -> None:
    def flip(dask_worker, on=on):
        dask_worker.extensions["blockllm-split"].driver.speculate = on

    dask.run(flip)


def _set_oracle(dask: Any, table: dict[int, int] | None) -> None:
    """Replace the prompt-lookup guess by a table of the right answers (None: back to prompt lookup)."""

    def put(dask_worker, table=table):
        from blockllm.serving.handoff import guess_next

        driver = dask_worker.extensions["blockllm-split"].driver
        driver.guess = guess_next if table is None else (lambda toks: table.get(hash(tuple(toks)), guess_next(toks)))

    dask.run(put)


def _oracle(p: dict[str, Any], batch: int, seeds: list[int], runs: list[dict[str, Any]]) -> dict[int, int]:
    """hash(tokens so far) -> the next token, from runs of the same prompts without speculation."""
    table = {}
    for seed, run in zip(seeds, runs, strict=True):
        for x, gen in zip(prompts(batch, p["prompt"], p["shape"].vocab, seed), run["tokens"], strict=True):
            seq = list(x) + list(gen)
            for i in range(len(x), len(seq)):
                table[hash(tuple(seq[:i]))] = seq[i]
    return table


def inprocess_steps(driver: Any, batch: int, p: dict[str, Any], seed: int) -> dict[str, Any]:
    """Both segments in this process (direct calls): per-step ms as in bare_steps."""
    from blockllm.types import Request, SamplingParams

    sp = SamplingParams(max_new_tokens=p["new"], ignore_eos=True)
    reqs = [Request(uuid.uuid4().hex, MODEL, tuple(x), sp) for x in prompts(batch, p["prompt"], p["shape"].vocab, seed)]
    for r in reqs:
        driver.add_request(r)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens = {}
    t0 = time.perf_counter()
    while driver.has_unfinished():
        for o in driver.step():
            now = time.perf_counter()
            if o.token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
            if o.finished:
                tokens[o.request_id] = list(o.token_ids)
    per = [(last[r.request_id] - first[r.request_id]) / (p["new"] - 1) for r in reqs]
    return {"step_ms": 1e3 * statistics.median(per), "wall_s": time.perf_counter() - t0, "tokens": [tokens[r.request_id] for r in reqs]}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["batches"]
    bs = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label in (("whole_step_ms", "whole chain, one worker"), ("inprocess_step_ms", "2 segments, one process (no hand-off)"),
                       ("split_step_ms", "split over 2 workers"), ("split_spec_step_ms", "split + speculation (prompt lookup)"),
                       ("split_oracle_step_ms", "split + speculation, every guess right")):  # fmt: skip
        ax.plot(bs, [r[key] for r in rows], marker="o", label=label)
    for r in rows:
        ax.annotate(f"hit {r['hit_rate']:.0%}", (r["batch"], r["split_spec_step_ms"]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title(f"split chain, {result['shape']['name']} at layer {result['split_at']} — {result['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(preset: str, out_dir: Path, zoo_url: str | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    from blockllm import config as _config
    from blockllm.engine.segment import SegmentEngine, unpack
    from blockllm.serving.handoff import SplitDriver
    from zoo_store import Zoo

    p = dict(PRESETS[preset], shape=_shape(preset))
    settings = apply_settings()
    s = p["shape"]
    zoo_url = zoo_url or (Path(_config.cache_dir()) / f"bench-zoo-{s.name}").as_uri()
    build_zoo(zoo_url, s)
    split_at = s.layers // 2
    engine_kw = {"kv_pages": p["kv_pages"], "max_batch_size": max(p["batches"])}

    # the compute baseline: both segments here, the hand-off a direct call
    zoo = Zoo(zoo_url, read_only=True)
    first, last = SegmentEngine(zoo, **engine_kw), SegmentEngine(zoo, **engine_kw)
    first.load(MODEL, 0, split_at)
    last.load(MODEL, split_at)
    pool = ThreadPoolExecutor(1)
    local = SplitDriver(first, lambda a, items, h: pool.submit(lambda: {"tokens": last.step_remote(items, unpack(h, last.device))}),
                        lambda a, ids: last.release(ids), speculate=False)  # fmt: skip
    local.route(MODEL, "here")

    cluster, dask, client = start_cluster(2, zoo_url, engine_kw)
    result: dict[str, Any] = {
        "preset": preset, "device": device_name(), "torch": torch.__version__, "shape": asdict(s), "split_at": split_at,
        "prompt_tokens": p["prompt"], "new_tokens": p["new"], "repeats": p["repeats"], "batches": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "setup": (("2 worker processes, one GPU each" if torch.cuda.device_count() >= 2 else "LocalCluster of 2 worker processes on one device")
                  + "; whole = one worker; split = layers [0, k) + embedding on one, [k, L) + head on the other"),
        "method": "median over requests of (last token - first token) / (new tokens - 1), host timestamps; median of repeats",
        "settings": settings,
        "oracle": "split_oracle_*: the guess is the token a run without speculation produced (what speculation saves when every guess is right)",
    }  # fmt: skip
    try:
        rows: dict[int, dict[str, Any]] = {b: {"batch": b} for b in p["batches"]}
        # whole, pinned to one worker (the planner would replicate a lone hot model on both)
        from blockllm.client import _place_on_host
        from blockllm.serving.placement import PlacementPlan

        w0, *rest = client.workers
        dask.submit(_place_on_host, [MODEL], [], workers=[w0], allow_other_workers=False, pure=False).result()
        client.plan = PlacementPlan({w0: (MODEL,), **{w: () for w in rest}}, {w0: {MODEL: "benchmark: the whole chain on one worker"}})
        for b in p["batches"]:
            served_steps(client, b, p, seed=b)  # warm-up
            runs = [served_steps(client, b, p, seed=100 + r) for r in range(p["repeats"])]
            rows[b]["whole_step_ms"] = statistics.median(x["step_ms"] for x in runs)
            rows[b]["_whole_tokens"] = runs[0]["tokens"]
        plan = client.place([MODEL], split={MODEL: split_at})
        result["placement"] = {"segments": [asdict(x) for x in plan.splits[MODEL]], "why": plan.explain(zoo.get_manifest(*MODEL.split("/")).chain[0], {MODEL: zoo.get_manifest(*MODEL.split("/"))})}
        for b in p["batches"]:
            inprocess_steps(local, b, p, seed=b)
            rows[b]["inprocess_step_ms"] = statistics.median(inprocess_steps(local, b, p, seed=100 + r)["step_ms"] for r in range(p["repeats"]))
            seeds = [100 + r for r in range(p["repeats"])]
            table = None
            for tag in ("split", "split_spec", "split_oracle"):
                _set_speculation(dask, tag != "split")
                _set_oracle(dask, table if tag == "split_oracle" else None)
                served_steps(client, b, p, seed=b)  # warm-up (graphs of this composition)
                before = _split_stats(client)
                runs = [served_steps(client, b, p, seed=s) for s in seeds]
                after = _split_stats(client)
                d = {k: after[k] - before[k] for k in after}
                rows[b][f"{tag}_step_ms"] = statistics.median(x["step_ms"] for x in runs)
                rows[b][f"{tag}_wait_ms_per_step"] = 1e3 * d["wait_seconds"] / max(d["steps"], 1)
                rows[b][f"_{tag}_tokens"] = runs[0]["tokens"]
                if tag == "split":
                    table = _oracle(p, b, seeds, runs)
                else:
                    pre = "" if tag == "split_spec" else "oracle_"
                    rows[b].update({pre + "guesses": d["guesses"], pre + "hits": d["hits"], pre + "misses": d["misses"],
                                    pre + "hit_rate": d["hits"] / max(d["hits"] + d["misses"], 1)})  # fmt: skip
            _set_oracle(dask, None)
            r = rows[b]
            r["handoff_ms_per_step"] = r["split_step_ms"] - r["inprocess_step_ms"]
            r["speculation_saving_ms"] = r["split_step_ms"] - r["split_spec_step_ms"]
            r["speculation_saving_pct"] = 100 * r["speculation_saving_ms"] / r["split_step_ms"]
            r["split_vs_whole"] = r["split_step_ms"] / r["whole_step_ms"]
            r["oracle_saving_ms"] = r["split_step_ms"] - r["split_oracle_step_ms"]
            r["oracle_saving_pct"] = 100 * r["oracle_saving_ms"] / r["split_step_ms"]
            r["spec_tokens_identical"] = r.pop("_split_spec_tokens") == r["_split_tokens"]
            r["oracle_tokens_identical"] = r.pop("_split_oracle_tokens") == r["_split_tokens"]
            r["split_tokens_match_whole"] = r.pop("_split_tokens") == r.pop("_whole_tokens")
            log.warning("batch %d: %s", b, {k: v for k, v in r.items()})
            result["batches"].append(r)
    finally:
        client.close()
        dask.close()
        cluster.close()
        pool.shutdown()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"split_chain-{preset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, stem.with_suffix(".png"))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--zoo", default=None, help="zoo URL for the random model (default: under the cache dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = run(args.preset, args.out, args.zoo)
    for row in r["batches"]:
        print(
            f"batch {row['batch']:>3}: whole {row['whole_step_ms']:.3f}  no-handoff {row['inprocess_step_ms']:.3f}  "
            f"split {row['split_step_ms']:.3f}  split+spec {row['split_spec_step_ms']:.3f} ms  (hit {row['hit_rate']:.0%}, "
            f"hand-off {row['handoff_ms_per_step']:+.3f} ms, spec saves {row['speculation_saving_ms']:+.3f} ms; "
            f"all guesses right {row['split_oracle_step_ms']:.3f} ms, hit {row['oracle_hit_rate']:.0%}, saves {row['oracle_saving_ms']:+.3f} ms)"
        )


if __name__ == "__main__":
    main()
