"""The worker side of monitoring: a plugin that exports each block host's metrics.

`MonitorWorkerPlugin` gives every worker a `blockllm_metrics` RPC handler (polled by the
scheduler's monitor at most once a second) and adds the `blockllm_*` series to the worker's own
`/metrics` endpoint. Engine stats are refreshed off the event loop once a second and cached, so
neither a scrape nor a poll ever waits for an engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import weakref
from collections import Counter
from typing import Any

from distributed import WorkerPlugin
from tornado.ioloop import PeriodicCallback

from ..metrics import HostMetrics, WorkerCollector, engine_view
from .split import SplitWorkerCollector, split_view

log = logging.getLogger(__name__)

PLUGIN_NAME = "blockllm-monitor"
REFRESH_MS = 1000

_workers: weakref.WeakSet = weakref.WeakSet()  # workers of this process with the plugin
_collector: WorkerCollector | None = None
_collector_lock = threading.Lock()


def host_metrics(host: Any) -> HostMetrics:
    """The metrics a block host records itself (admissions, finishes, steps)."""
    return host.metrics


_SUBSTITUTED = re.compile(r"\.sub-[0-9a-f]{10}$")


def public_model(model: str) -> str:
    """The model a request asked for: a chain the planner substituted runs as '<name>.sub-<digest>'."""
    return _SUBSTITUTED.sub("", model)


class _HostWatch:
    """Cached engine stats of one worker's host, refreshed off the event loop."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.stats: dict[str, Any] = {}
        self.stats_time = 0.0
        self._busy = False
        self._sizes: dict[str, tuple[int, str]] = {}
        self._chains: dict[str, tuple[str, ...]] = {}

    @property
    def host(self) -> Any:
        return self.worker.extensions.get("blockllm")

    async def refresh(self) -> None:
        host = self.host
        if host is None:
            return
        if self._busy or getattr(host, "engine", None) is None:
            return
        self._busy = True
        try:
            self.stats = await asyncio.get_running_loop().run_in_executor(None, self._read, host)
            self.stats_time = time.time()
        except Exception as e:
            log.debug("block host stats failed: %r", e)
        finally:
            self._busy = False

    def _read(self, host: Any) -> dict[str, Any]:
        """Off the event loop: the host's stats, and the zoo facts (chains, block sizes) views need."""
        stats = host.stats()
        for model in list(stats.get("models") or ()) + [public_model(t.model) for t in list(getattr(host, "_tracked", {}).values())]:
            for fp in self._load_chain(host, model):
                self._load_block(host, fp)
        return stats

    def _load_block(self, host: Any, fp: str) -> None:
        if fp not in self._sizes:
            try:
                spec = host.zoo.block_spec(fp)
                self._sizes[fp] = (int(spec.nbytes), str(spec.kind))
            except Exception:
                self._sizes[fp] = (0, "")

    def _load_chain(self, host: Any, model: str) -> tuple[str, ...]:
        if model not in self._chains:
            try:
                tenant, _, name = model.partition("/")
                m = host.zoo.get_manifest(tenant, name)
                self._chains[model] = tuple(m.chain) + tuple(a.fingerprint for a in m.adapters)
            except Exception:
                return ()
        return self._chains[model]

    def view(self) -> dict[str, Any]:
        """This worker's monitoring view (plain data)."""
        host = self.host
        address = getattr(self.worker, "address", "")
        if host is None:
            return {"host": False, "address": address}
        metrics = host_metrics(host)
        stats = self.stats or {}
        engine = engine_view(stats.get("engine"))
        models = sorted(stats.get("models") or getattr(host, "loaded", ()) or ())
        # Requests in flight from the host's own table: running once they have a first token.
        running_by_block: Counter[str] = Counter()
        waiting_by_block: Counter[str] = Counter()
        running = waiting = 0
        tenants_live: set[str] = set()
        with getattr(host, "_lock", None) or contextlib.nullcontext():
            tracked = [(public_model(t.model), t.tenant, t.finished, t.first_token) for t in getattr(host, "_tracked", {}).values()]
        for model, tenant, finished, first in tracked:
            if finished:
                continue
            tenants_live.add(tenant)
            which = running_by_block if first else waiting_by_block
            if first:
                running += 1
            else:
                waiting += 1
            for fp in self._chains.get(model, ()):
                which[fp] += 1
        blocks = {b["fingerprint"]: b for b in engine["blocks"] if b["fingerprint"]}
        for model in models:
            for fp in self._chains.get(model, ()):
                blocks.setdefault(fp, {"fingerprint": fp, "bytes": 0, "batch": None, "queue": None})
        out_blocks = []
        for fp, b in sorted(blocks.items()):
            nbytes, kind = self._sizes.get(fp, (0, ""))
            out_blocks.append({
                "fingerprint": fp,
                "kind": kind,
                "bytes": b["bytes"] or nbytes,
                "batch": b["batch"] if b["batch"] is not None else running_by_block.get(fp, 0),
                "queue": b["queue"] if b["queue"] is not None else waiting_by_block.get(fp, 0),
                "models": [m for m in models if fp in self._chains.get(m, ())],
            })
        if not engine["weight_bytes"]:
            engine["weight_bytes"] = sum(b["bytes"] for b in out_blocks)
        return {
            "host": True,
            "address": address,
            "models": models,
            "engine": engine,
            "blocks": out_blocks,
            "running": engine["running"] if engine["running"] is not None else running,
            "waiting": engine["waiting"] if engine["waiting"] is not None else waiting,
            "tenants_live": sorted(tenants_live),
            "traffic": dict(stats.get("traffic") or {}),
            "stats_age": (time.time() - self.stats_time) if self.stats_time else None,
            "metrics": metrics.snapshot(),
            "split": split_view(getattr(host, "split", None)),  # live counters, not the cached stats
        }


def _process_views() -> list[dict[str, Any]]:
    out = []
    for worker in list(_workers):
        watch = getattr(worker, "_blockllm_watch", None)
        if watch is not None:
            v = watch.view()
            if v.get("host"):
                out.append(v)
    return out


def _register_collector() -> None:
    global _collector
    with _collector_lock:
        if _collector is not None:
            return
        try:
            import prometheus_client
        except ImportError:  # distributed serves a stub /metrics without it
            return
        _collector = WorkerCollector(_process_views)
        prometheus_client.REGISTRY.register(_collector)
        prometheus_client.REGISTRY.register(SplitWorkerCollector(_process_views))  # blockllm_split_*


class MonitorWorkerPlugin(WorkerPlugin):
    """Exports the block host's metrics: `blockllm_metrics` RPC and `blockllm_*` on /metrics."""

    name = PLUGIN_NAME
    idempotent = True

    async def setup(self, worker) -> None:
        watch = _HostWatch(worker)
        worker._blockllm_watch = watch
        _workers.add(worker)
        _register_collector()

        async def metrics_handler(comm=None):
            return watch.view()

        worker.handlers["blockllm_metrics"] = metrics_handler
        pc = PeriodicCallback(watch.refresh, REFRESH_MS)
        worker.periodic_callbacks["blockllm-monitor"] = pc
        pc.start()
        await watch.refresh()

    def teardown(self, worker) -> None:
        pc = worker.periodic_callbacks.pop("blockllm-monitor", None)
        if pc is not None:
            pc.stop()
        worker.handlers.pop("blockllm_metrics", None)
        _workers.discard(worker)
