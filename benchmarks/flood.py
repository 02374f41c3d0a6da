"""Flood fairness: one tenant sends 10x what a worker can serve for 60 s while a quiet tenant sends a
few requests; the quiet tenant's p95 latency against its unloaded p95, and the worker's memory.

    python -m benchmarks.flood                 # the full run: 60 s of flood (about 2 minutes in all)
    python -m benchmarks.flood --flood-s 10    # a shorter one

A real LocalCluster (one worker process, the tiny model family in a file:// zoo); the flooder is a
separate process with its own blockllm.Client, as another tenant's would be. Writes
benchmarks/results/flood-cpu.json and .png.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import platform
import random
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
MODEL = "platform/tiny-base"  # both tenants use the shared base: fairness inside one model's batches
FLOOD_TOKENS = 32
QUIET_TOKENS = 16


def _device() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"CPU: {name} ({os.cpu_count()} cores)"


def _sampling(n: int):
    from blockllm.types import SamplingParams

    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = "the a b c one two three four five six reverse next number after is letter".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _flood(address: str, key: str, zoo_url: str, rate: float, duration: float, out: mp.Queue) -> None:
    """The flooding tenant (its own process): `rate` requests/s, open loop, for `duration` s."""
    import os

    from blockllm.client import Client, GenerationRequest
    from blockllm.exceptions import OverloadedError

    # On a small shared box the flooding client would otherwise take CPU from the server it floods;
    # niced, it stands for a client on another machine (what is measured is the server's fairness).
    os.nice(10)
    counts = {"sent": 0, "completed": 0, "overloaded": 0, "other_errors": 0}
    lock = threading.Lock()

    def done(f):
        with lock:
            e = f.exception()
            counts["completed" if e is None else "overloaded" if isinstance(e, OverloadedError) else "other_errors"] += 1

    with Client(address, api_key=key, zoo=zoo_url) as client:
        client.place([MODEL])  # routes from its plan, not a stats call per request
        prompts = _prompts(1, 512)
        start = time.monotonic()
        tick = 0.2
        i = 0
        while time.monotonic() - start < duration:
            due = int(rate * (time.monotonic() - start)) - counts["sent"]
            if due > 0:
                reqs = [GenerationRequest(model=MODEL, prompt=prompts[(i + k) % len(prompts)], sampling=_sampling(FLOOD_TOKENS)) for k in range(due)]
                i += due
                for f in client.submit(reqs):
                    f.add_done_callback(done)
                counts["sent"] += due
            time.sleep(tick)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if counts["completed"] + counts["overloaded"] + counts["other_errors"] >= counts["sent"]:
                    break
            time.sleep(0.1)
    out.put(counts)


def _quiet(client, rate: float, duration: float, seed: int) -> list[dict]:
    """The quiet tenant: Poisson arrivals at `rate`/s for `duration` s; per request its latency."""
    from blockllm.client import GenerationRequest

    rng = np.random.default_rng(seed)
    prompts = _prompts(seed, 256)
    records: list[dict] = []
    lock = threading.Lock()
    start = time.monotonic()
    t_next = start
    futures = []
    while time.monotonic() - start < duration:
        t_next += rng.exponential(1 / rate)
        time.sleep(max(0.0, t_next - time.monotonic()))
        sent = time.monotonic()
        (f,) = client.submit([GenerationRequest(model=MODEL, prompt=prompts[len(futures) % len(prompts)], sampling=_sampling(QUIET_TOKENS))])

        def done(f, sent=sent):
            e = f.exception()
            c = f.result() if e is None else None
            with lock:
                records.append({
                    "t": sent - start, "latency": time.monotonic() - sent, "error": None if e is None else type(e).__name__,
                    "host_latency": c.latency if c else None, "host_ttft": c.ttft if c else None,
                })

        f.add_done_callback(done)
        futures.append(f)
    for f in futures:
        try:
            f.result(120)
        except Exception:  # counted in the records
            pass
    return sorted(records, key=lambda r: r["t"])


class _RSS:
    """Samples a process's resident memory on a thread."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        import psutil

        self.proc, self.every, self.samples = psutil.Process(pid), every, []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, self.proc.memory_info().rss))
            time.sleep(self.every)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def _p(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def run(flood_s: float = 60.0, unloaded_s: float = 20.0, quiet_rate: float = 2.0, factor: float = 10.0, max_batch: int = 8) -> dict:
    import distributed

    from blockllm import config as _config
    from blockllm.auth import create_key
    from blockllm.client import Client, GenerationRequest
    from blockllm.demo import ingest_family
    from blockllm.model_sets import build_tiny_family
    from zoo_store import Zoo

    zoo_dir = _config.cache_dir() / "bench-flood-zoo"
    zoo = Zoo(zoo_dir.as_uri())
    ingest_family(zoo, build_tiny_family())
    keys = {t: create_key(zoo, t) for t in ("acme", "globex")}
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster) as dask:
        quiet = Client(dask, api_key=keys["globex"], zoo=zoo.url, engine={"max_batch_size": max_batch})
        quiet.place([MODEL])
        (worker,) = quiet.workers
        pid = dask.run(lambda: __import__("os").getpid())[worker]
        quiet.generate(["warm up"] * 4, MODEL, _sampling(4))

        # Capacity: what one worker completes per second when saturated (flooder-sized requests).
        cap_client = Client(dask, api_key=keys["acme"], zoo=zoo.url)
        cap_client.place([MODEL])
        n_cap = 200
        t0 = time.monotonic()
        futs = cap_client.submit([GenerationRequest(model=MODEL, prompt=p, sampling=_sampling(FLOOD_TOKENS)) for p in _prompts(2, n_cap)])
        for f in futs:
            f.result(300)
        capacity = n_cap / (time.monotonic() - t0)

        rss = _RSS(pid)
        # The unloaded baseline is taken half before and half after the flood, so that a change in
        # other load on the machine during the run weighs on both sides of the ratio alike.
        before = _quiet(quiet, quiet_rate, unloaded_s / 2, seed=3)
        rss_before_flood = max(r for _, r in rss.samples)
        t_flood = time.monotonic() - rss._t0
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        flooder = ctx.Process(target=_flood, args=(cluster.scheduler_address, keys["acme"], zoo.url, factor * capacity, flood_s, out))
        flooder.start()
        time.sleep(5.0)  # the flooder's process starts (imports) before the quiet tenant's clock runs
        admission_peak = {}
        stop_stats = threading.Event()

        def watch():
            while not stop_stats.is_set():
                try:
                    snap = quiet.stats()[worker]["admission"]
                    for k, v in snap["per_tenant"].items():
                        admission_peak[k] = max(admission_peak.get(k, 0), v)
                except Exception:  # the stats call may race the shutdown
                    pass
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        loaded = _quiet(quiet, quiet_rate, max(1.0, flood_s - 5.0), seed=4)
        flood_counts = out.get(timeout=flood_s + 180)
        flooder.join(60)
        stop_stats.set()
        watcher.join(5)
        time.sleep(2.0)  # the flood's last requests drain
        t_after = time.monotonic() - rss._t0
        after = _quiet(quiet, quiet_rate, unloaded_s / 2, seed=5)
        for r in after:
            r["t"] += t_after - t_flood + 5.0  # on the plot: after the flood
        unloaded = before + after
        rss_samples = rss.stop()

    lat_u = [r["latency"] for r in unloaded if r["error"] is None]
    lat_f = [r["latency"] for r in loaded if r["error"] is None]
    result = {
        "benchmark": "flood",
        "device": _device(),
        "model": MODEL,
        "engine_max_batch": max_batch,
        "config": {k: _config.get(f"serving.{k}") for k in ("max-queued-per-tenant", "max-queued-per-model", "engine-waiting", "fair-quantum", "tenant-share", "fair-window")},
        "capacity_requests_per_s": capacity,
        "flood": {"factor": factor, "rate_requests_per_s": factor * capacity, "seconds": flood_s, "tokens_per_request": FLOOD_TOKENS, **flood_counts},
        "quiet": {
            "rate_requests_per_s": quiet_rate,
            "tokens_per_request": QUIET_TOKENS,
            "unloaded": {"n": len(unloaded), "errors": sum(r["error"] is not None for r in unloaded), "p50_s": _p(lat_u, 50), "p95_s": _p(lat_u, 95)},
            "under_flood": {"n": len(loaded), "errors": sum(r["error"] is not None for r in loaded), "p50_s": _p(lat_f, 50), "p95_s": _p(lat_f, 95)},
        },
        "p95_ratio": (_p(lat_f, 95) / _p(lat_u, 95)) if lat_u and lat_f else None,
        "unloaded_p95_before_and_after_flood_s": [_p([r["latency"] for r in before if r["error"] is None], 95), _p([r["latency"] for r in after if r["error"] is None], 95)],
        "worker_rss_bytes": {
            "before_flood_peak": rss_before_flood,
            "during_flood_peak": max((r for t, r in rss_samples if t_flood <= t < t_after), default=None),
            "end": rss_samples[-1][1] if rss_samples else None,
        },
        "admission_peak_queued_per_tenant": admission_peak,
        "series": {"unloaded": unloaded, "under_flood": loaded, "rss": rss_samples, "flood_starts_at_s": t_flood},
    }
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, color in (("unloaded", "tab:blue"), ("under_flood", "tab:red")):
        rows = result["series"][key]
        a.scatter([r["t"] for r in rows], [1000 * r["latency"] for r in rows], s=8, color=color, label=key.replace("_", " "))
        p95 = result["quiet"][key]["p95_s"]
        if p95:
            a.axhline(1000 * p95, color=color, ls="--", lw=1)
    a.set_xlabel("seconds into the phase")
    a.set_ylabel("quiet tenant latency (ms)")
    a.set_title(f"quiet tenant, p95 under flood / unloaded = {result['p95_ratio']:.2f}x")
    a.legend()
    rss = result["series"]["rss"]
    b.plot([t for t, _ in rss], [r / 2**20 for _, r in rss], color="tab:green")
    b.axvline(result["series"]["flood_starts_at_s"], color="tab:red", ls=":", label="flood starts")
    b.set_xlabel("seconds")
    b.set_ylabel("worker RSS (MiB)")
    b.set_title(f"flood at {result['flood']['factor']:.0f}x capacity ({result['flood']['rate_requests_per_s']:.0f} req/s)")
    b.legend()
    fig.suptitle(result["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flood-s", type=float, default=60.0)
    ap.add_argument("--unloaded-s", type=float, default=20.0)
    ap.add_argument("--quiet-rate", type=float, default=2.0)
    ap.add_argument("--factor", type=float, default=10.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "flood-cpu.json"))
    args = ap.parse_args()
    result = run(args.flood_s, args.unloaded_s, args.quiet_rate, args.factor, args.max_batch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:  # no matplotlib: the JSON still stands
        pass
    q = result["quiet"]
    print(f"capacity {result['capacity_requests_per_s']:.1f} req/s; flood {result['flood']}")
    print(f"quiet p95: unloaded {q['unloaded']['p95_s']:.3f} s, under flood {q['under_flood']['p95_s']:.3f} s ({result['p95_ratio']:.2f}x)")
    print(f"worker RSS: {result['worker_rss_bytes']}; admission peak {result['admission_peak_queued_per_tenant']}")


if __name__ == "__main__":
    main()
