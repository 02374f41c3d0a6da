"""Serving metrics: what each block host records, and the Prometheus collectors that export it.

A `HostMetrics` lives on every block host and is fed from the stepping thread (requests
admitted, requests finished with their latencies, engine steps with their batch sizes). It
keeps plain counters, fixed-bucket histograms and a short window of recent samples (for rates
and percentiles on the dashboard). Nothing here touches the scheduler: the workers' `/metrics`
read it at scrape time (`WorkerCollector`), and the scheduler's `/metrics` read the cluster view
that the monitor polls once a second (`SchedulerCollector`, see monitoring/cluster.py).
Every series is named `blockllm_*`; docs/METRICS.md lists them.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

# Bucket bounds (seconds / requests) of the exported histograms.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

WINDOW_SECONDS = 60.0  # rates and percentiles on the dashboard are over the last minute
MAX_SAMPLES = 2048  # recent samples kept per host (bounded memory whatever the load)


class Histogram:
    """A cumulative fixed-bucket histogram (the Prometheus kind), thread-compatible under a lock."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Histogram:
        h = cls(d["buckets"])
        h.counts, h.sum, h.count = list(d["counts"]), float(d["sum"]), int(d["count"])
        return h

    def merge(self, other: Histogram) -> None:
        if other.buckets != self.buckets:
            raise ValueError("cannot merge histograms with different buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum
        self.count += other.count


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class HostMetrics:
    """What one block host has served: counters, histograms and a window of recent samples."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (model, tenant, outcome)
        self.tokens: Counter[tuple[str, str]] = Counter()  # generated tokens per (model, tenant)
        self.prompt_tokens: Counter[tuple[str, str]] = Counter()
        self.substitutions: Counter[str] = Counter()  # substituted blocks per model
        self.ttft: dict[str, Histogram] = {}
        self.tpot: dict[str, Histogram] = {}
        self.latency: dict[str, Histogram] = {}
        self.steps = 0
        self.step_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        # (finish time, model, tenant, ttft, tpot, latency, tokens) of recently finished requests
        self._recent: deque[tuple[float, str, str, float | None, float | None, float | None, int]] = deque(maxlen=MAX_SAMPLES)
        self._arrivals: deque[float] = deque(maxlen=MAX_SAMPLES)
        self._batches: deque[tuple[float, int]] = deque(maxlen=MAX_SAMPLES)

    # -------------------------------------------------------------- observations
    def admitted(self, model: str, tenant: str, prompt_tokens: int = 0) -> None:
        with self._lock:
            self.requests[(model, tenant, "admitted")] += 1
            self.prompt_tokens[(model, tenant)] += prompt_tokens
            self._arrivals.append(self._clock())

    def rejected(self, model: str, tenant: str, error_type: str) -> None:
        with self._lock:
            self.requests[(model or "", tenant or "", f"rejected:{error_type}")] += 1

    def finished(
        self,
        model: str,
        tenant: str,
        *,
        n_tokens: int,
        ttft: float | None,
        latency: float | None,
        finish_reason: str | None,
        substituted: int = 0,
    ) -> None:
        tpot = (latency - ttft) / (n_tokens - 1) if latency is not None and ttft is not None and n_tokens > 1 else None
        outcome = "error" if finish_reason == "error" else "finished"
        with self._lock:
            self.requests[(model, tenant, outcome)] += 1
            self.tokens[(model, tenant)] += n_tokens
            if substituted:
                self.substitutions[model] += substituted
            for table, value, buckets in ((self.ttft, ttft, LATENCY_BUCKETS), (self.tpot, tpot, TOKEN_BUCKETS), (self.latency, latency, LATENCY_BUCKETS)):
                if value is not None:
                    table.setdefault(model, Histogram(buckets)).observe(value)
            self._recent.append((self._clock(), model, tenant, ttft, tpot, latency, n_tokens))

    def step(self, seconds: float, batch: int) -> None:
        with self._lock:
            self.steps += 1
            self.step_seconds.observe(seconds)
            if batch:
                self.batch_size.observe(batch)
                self._batches.append((self._clock(), batch))

    # -------------------------------------------------------------- reading
    def snapshot(self, window: float = WINDOW_SECONDS) -> dict[str, Any]:
        """A plain-data view (msgpack-able) for the monitor and the dashboard."""
        with self._lock:
            now = self._clock()
            since = now - window
            recent = [r for r in self._recent if r[0] >= since]
            arrivals = sum(1 for t in self._arrivals if t >= since)
            batches = [b for t, b in self._batches if t >= since]
            span = max(1e-9, min(window, now - self.started))
            return {
                "time": now,
                "requests": [[m, t, o, n] for (m, t, o), n in self.requests.items()],
                "tokens": [[m, t, n] for (m, t), n in self.tokens.items()],
                "prompt_tokens": [[m, t, n] for (m, t), n in self.prompt_tokens.items()],
                "substitutions": dict(self.substitutions),
                "steps": self.steps,
                "ttft": {m: h.to_dict() for m, h in self.ttft.items()},
                "tpot": {m: h.to_dict() for m, h in self.tpot.items()},
                "latency": {m: h.to_dict() for m, h in self.latency.items()},
                "step_seconds": self.step_seconds.to_dict(),
                "batch_size": self.batch_size.to_dict(),
                "window": {
                    "seconds": span,
                    "arrivals": arrivals,
                    "finished": len(recent),
                    "tokens": sum(r[6] for r in recent),
                    "ttft": [r[3] for r in recent if r[3] is not None],
                    "tpot": [r[4] for r in recent if r[4] is not None],
                    "latency": [r[5] for r in recent if r[5] is not None],
                    "tenants": sorted({r[2] for r in recent}),
                    "batch": batches,
                },
            }


# ------------------------------------------------------------------------------ host views
def engine_view(engine_stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """The engine's stats reduced to what monitoring shows, whatever optional fields it has.

    Reads `weight_bytes`, `kv_pages_used`/`kv_pages_total` (or `kv_used`/`kv_total`), a per-block
    list `blocks` of {fingerprint, bytes, batch, queue} where the engine gives one, and per-block
    {fingerprint: n} tables `last_batch` (rows in the last step) and `block_queue` (waiting).
    """
    s = dict(engine_stats or {})

    def first(*names: str, default: Any = 0) -> Any:
        for n in names:
            if s.get(n) is not None:
                return s[n]
        return default

    blocks = []
    raw_blocks = first("blocks", "resident_blocks", default=[]) or []
    if isinstance(raw_blocks, Mapping):
        raw_blocks = [{"fingerprint": k, **(v if isinstance(v, Mapping) else {"bytes": v})} for k, v in raw_blocks.items()]
    for b in raw_blocks:
        if isinstance(b, str):
            b = {"fingerprint": b}
        if not isinstance(b, Mapping):
            continue
        blocks.append({
            "fingerprint": str(b.get("fingerprint") or b.get("fp") or b.get("block") or ""),
            "bytes": int(b.get("bytes") or b.get("nbytes") or b.get("weight_bytes") or 0),
            "batch": _num(b.get("batch", b.get("batch_size", b.get("last_batch")))),
            "queue": _num(b.get("queue", b.get("queue_depth", b.get("waiting")))),
        })
    # Per-block figures given as {fingerprint: n}: rows in the last step (EngineStats.last_batch),
    # requests waiting for the block (block_queue).
    by_fp = {b["fingerprint"]: b for b in blocks}
    for key, field_name in (("last_batch", "batch"), ("block_queue", "queue")):
        table = s.get(key) if isinstance(s.get(key), Mapping) else {}
        for fp, n in table.items():
            b = by_fp.get(str(fp))
            if b is None:
                b = by_fp[str(fp)] = {"fingerprint": str(fp), "bytes": 0, "batch": None, "queue": None}
                blocks.append(b)
            if b[field_name] is None:
                b[field_name] = _num(n)
    return {
        "weight_bytes": int(first("weight_bytes", "weights_bytes")),
        "kv_used": int(first("kv_pages_used", "kv_used", "used_pages")),
        "kv_total": int(first("kv_pages_total", "kv_total", "total_pages")),
        "kv_page_bytes": int(first("kv_page_bytes", "page_bytes")),
        "running": _int(first("running", "num_running", default=None)),
        "waiting": _int(first("waiting", "num_waiting", default=None)),
        "preemptions": int(first("preemptions", default=0) or 0),
        "blocks": blocks,
    }


def _int(x: Any) -> int | None:
    v = _num(x)
    return None if v is None else int(v)


def _num(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------ prometheus
def _families(prefix: str = "blockllm"):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    def c(name, doc, labels=()):
        return CounterMetricFamily(f"{prefix}_{name}", doc, labels=list(labels))

    def g(name, doc, labels=()):
        return GaugeMetricFamily(f"{prefix}_{name}", doc, labels=list(labels))

    def h(name, doc, labels=()):
        return HistogramMetricFamily(f"{prefix}_{name}", doc, labels=list(labels))

    return c, g, h


def host_metric_families(view: Mapping[str, Any]) -> Iterator[Any]:
    """Prometheus metric families for one worker's view ({"metrics": snapshot, "engine": engine_view, ...})."""
    c, g, h = _families()
    m = view.get("metrics") or {}
    e = view.get("engine") or {}

    requests = c("requests", "Requests seen by this worker's block host, by model, tenant and outcome (admitted, finished, error, rejected:<error>).", ("model", "tenant", "outcome"))
    for model, tenant, outcome, n in m.get("requests", []):
        requests.add_metric([model, tenant, outcome], n)
    yield requests
    tokens = c("generated_tokens", "Tokens generated, by model and tenant.", ("model", "tenant"))
    for model, tenant, n in m.get("tokens", []):
        tokens.add_metric([model, tenant], n)
    yield tokens
    prompt = c("prompt_tokens", "Prompt tokens admitted, by model and tenant.", ("model", "tenant"))
    for model, tenant, n in m.get("prompt_tokens", []):
        prompt.add_metric([model, tenant], n)
    yield prompt
    subs = c("substituted_blocks", "Blocks served by an equivalent stand-in instead of the model's own block, by model.", ("model",))
    for model, n in (m.get("substitutions") or {}).items():
        subs.add_metric([model], n)
    yield subs
    for key, name, doc in (
        ("ttft", "time_to_first_token_seconds", "Time from admission to the first generated token."),
        ("tpot", "time_per_output_token_seconds", "Mean time per generated token after the first, per request."),
        ("latency", "request_latency_seconds", "Time from admission to the last token (end to end on the worker)."),
    ):
        fam = h(name, doc, ("model",))
        for model, hd in (m.get(key) or {}).items():
            hist = Histogram.from_dict(hd)
            fam.add_metric([model], hist.cumulative(), hist.sum)
        yield fam
    steps = c("engine_steps", "Engine steps (one batched forward of every running request through its chain).")
    steps.add_metric([], m.get("steps", 0))
    yield steps
    for key, name, doc in (
        ("step_seconds", "engine_step_seconds", "Duration of an engine step."),
        ("batch_size", "engine_batch_size", "Requests advanced by one engine step."),
    ):
        if m.get(key):
            hist = Histogram.from_dict(m[key])
            fam = h(name, doc)
            fam.add_metric([], hist.cumulative(), hist.sum)
            yield fam
    for name, value, doc in (
        ("weight_bytes", e.get("weight_bytes", 0), "Bytes of block weights resident on this worker's device."),
        ("kv_pages_used", e.get("kv_used", 0), "KV cache pages in use in this worker's pool."),
        ("kv_pages_total", e.get("kv_total", 0), "KV cache pages in this worker's pool."),
        ("blocks_loaded", len(view.get("blocks") or []), "Distinct blocks resident on this worker."),
        ("engine_preemptions", e.get("preemptions", 0), "Requests the engine preempted since it started (KV memory pressure: recomputed later, never dropped)."),
        ("models_loaded", len(view.get("models") or []), "Models whose chains this worker hosts."),
        ("requests_running", view.get("running", 0), "Requests admitted and not finished on this worker."),
        ("requests_waiting", view.get("waiting", 0), "Admitted requests still waiting for their first token."),
    ):
        yield _gauge(g, name, doc, value)
    batch = g("block_batch_size", "Requests in the current batch of each resident block.", ("block",))
    queue = g("block_queue_depth", "Requests waiting for each resident block.", ("block",))
    nbytes = g("block_bytes", "Weight bytes of each resident block.", ("block", "kind"))
    for b in view.get("blocks") or []:
        batch.add_metric([b["fingerprint"]], b.get("batch") or 0)
        queue.add_metric([b["fingerprint"]], b.get("queue") or 0)
        nbytes.add_metric([b["fingerprint"], b.get("kind", "")], b.get("bytes") or 0)
    yield batch
    yield queue
    yield nbytes


def _gauge(g, name: str, doc: str, value: Any):
    fam = g(name, doc)
    fam.add_metric([], float(value or 0))
    return fam


class ViewCollector:
    """A Prometheus collector over a view read at scrape time (`families(view)` makes the series).

    A failing read is logged and yields nothing: a scrape must never take the endpoint down.
    Unchecked (`describe` is empty): the families depend on what is loaded.
    """

    what = "blockllm metrics"

    def __init__(self, view: Callable[[], Any]) -> None:
        self._view = view

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        try:
            view = self._view()
        except Exception:
            log.exception("collecting %s failed", self.what)
            return
        if view:
            yield from self.families(view)

    def families(self, view: Any) -> Iterator[Any]:
        raise NotImplementedError


class WorkerCollector(ViewCollector):
    """Prometheus collector for the block hosts of this process (read at scrape time).

    The view is one entry per live block host; a process normally has one worker. Where several
    share a process (an in-process cluster) their series are emitted once per host with the same
    names, so the collector adds them up.
    """

    what = "blockllm worker metrics"

    def families(self, views: list[Mapping[str, Any]]) -> Iterator[Any]:
        yield from _merge_families(host_metric_families(v) for v in views)


class SchedulerCollector(ViewCollector):
    """Prometheus collector for the cluster view the monitor keeps on the scheduler."""

    what = "blockllm scheduler metrics"

    def families(self, view: Mapping[str, Any]) -> Iterator[Any]:
        _, g, _ = _families()
        workers = view.get("workers") or {}
        yield _gauge(g, "workers", "Workers running a block host.", sum(1 for w in workers.values() if w.get("host")))
        replicas = g("block_replicas", "Workers holding each block.", ("block",))
        for fp, n in (view.get("replicas") or {}).items():
            replicas.add_metric([fp], n)
        yield replicas
        placed = g("model_replicas", "Workers hosting each model's chain.", ("model",))
        for model, n in (view.get("model_replicas") or {}).items():
            placed.add_metric([model], n)
        yield placed
        totals = view.get("totals") or {}
        for name, key, doc in (
            ("cluster_weight_bytes", "weight_bytes", "Block weight bytes resident over all workers."),
            ("cluster_kv_pages_used", "kv_used", "KV pages in use over all workers."),
            ("cluster_kv_pages_total", "kv_total", "KV pages over all workers."),
            ("cluster_requests_running", "running", "Requests in flight over all workers."),
            ("cluster_request_rate", "request_rate", "Requests admitted per second over the last minute, all workers."),
            ("cluster_token_rate", "token_rate", "Tokens generated per second over the last minute, all workers."),
        ):
            yield _gauge(g, name, doc, totals.get(key, 0))
        requests = g("cluster_requests", "Requests finished over all workers (as of the last poll), by model and tenant.", ("model", "tenant"))
        for (model, tenant), n in sorted((view.get("finished") or {}).items()):
            requests.add_metric([model, tenant], n)
        yield requests
        lat = g("cluster_latency_seconds", "Latency percentiles over the last minute, all workers.", ("kind", "quantile"))
        for kind, qs in (view.get("percentiles") or {}).items():
            for q, v in qs.items():
                if v is not None:
                    lat.add_metric([kind, q], v)
        yield lat
        yield _gauge(g, "monitor_polls", "Polls of the workers by the BlockLLM monitor.", view.get("polls", 0))


def _merge_families(groups: Iterable[Iterable[Any]]) -> Iterator[Any]:
    """Families of several hosts combined: samples with equal name and labels are added up."""
    merged: dict[str, Any] = {}
    for group in groups:
        for fam in group:
            have = merged.get(fam.name)
            if have is None:
                merged[fam.name] = fam
                continue
            index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(have.samples)}
            for s in fam.samples:
                i = index.get((s.name, tuple(sorted(s.labels.items()))))
                if i is None:
                    have.samples.append(s)
                else:
                    old = have.samples[i]
                    have.samples[i] = old._replace(value=old.value + s.value)
    yield from merged.values()


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the CLI and the dashboard print sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
