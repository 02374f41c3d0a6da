"""The scheduler side of monitoring: poll the block hosts once a second into one cluster view.

`MonitorSchedulerPlugin` asks every worker for its `blockllm_metrics` view (never per token:
one small RPC per worker per second), folds them into a cluster view (replicas, memory, KV
use, rates, latency percentiles, tenants), serves it to the BlockLLM dashboard page and adds
`blockllm_*` series to the scheduler's `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

from distributed import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from ..metrics import SchedulerCollector, percentile
from .split import SplitSchedulerCollector, split_totals

log = logging.getLogger(__name__)

PLUGIN_NAME = "blockllm-monitor"
POLL_MS = 1000
HISTORY = 300  # points of the rate time series (five minutes at one poll a second)
QUANTILES = (50, 90, 95, 99)


def aggregate(workers: Mapping[str, Mapping[str, Any]], polls: int = 0) -> dict[str, Any]:
    """The cluster view from per-worker views (see monitoring/worker.py `_HostWatch.view`)."""
    replicas: Counter[str] = Counter()
    model_replicas: Counter[str] = Counter()
    block_info: dict[str, dict[str, Any]] = {}
    finished: Counter[tuple[str, str]] = Counter()
    tenants: dict[str, dict[str, Any]] = {}
    substitutions: Counter[str] = Counter()
    samples: dict[str, list[float]] = {"ttft": [], "tpot": [], "latency": []}
    batch_samples: list[int] = []
    totals = Counter()
    for view in workers.values():
        if not view.get("host"):
            continue
        engine = view.get("engine") or {}
        m = view.get("metrics") or {}
        win = m.get("window") or {}
        totals["workers"] += 1
        totals["weight_bytes"] += engine.get("weight_bytes", 0) or 0
        totals["kv_used"] += engine.get("kv_used", 0) or 0
        totals["kv_total"] += engine.get("kv_total", 0) or 0
        totals["running"] += view.get("running", 0) or 0
        totals["waiting"] += view.get("waiting", 0) or 0
        totals["steps"] += m.get("steps", 0)
        seconds = max(1e-9, float(win.get("seconds", 1.0)))
        totals["request_rate"] += win.get("arrivals", 0) / seconds
        totals["finish_rate"] += win.get("finished", 0) / seconds
        totals["token_rate"] += win.get("tokens", 0) / seconds
        for key in samples:
            samples[key].extend(win.get(key) or [])
        batch_samples.extend(b for b in (win.get("batch") or []))
        for b in view.get("blocks") or []:
            fp = b["fingerprint"]
            replicas[fp] += 1
            info = block_info.setdefault(fp, {"bytes": b.get("bytes", 0), "kind": b.get("kind", "")})
            info["bytes"] = max(info["bytes"], b.get("bytes", 0) or 0)
        for model in view.get("models") or []:
            model_replicas[model] += 1
        for model, tenant, outcome, n in m.get("requests", []):
            t = tenants.setdefault(tenant or "?", {"requests": 0, "tokens": 0, "errors": 0, "models": set()})
            if outcome == "finished":
                finished[(model, tenant)] += n
                t["requests"] += n
                t["models"].add(model)
            elif outcome != "admitted":
                t["errors"] += n
        for _model, tenant, n in m.get("tokens", []):
            tenants.setdefault(tenant or "?", {"requests": 0, "tokens": 0, "errors": 0, "models": set()})["tokens"] += n
            totals["tokens"] += n
        for model, n in (m.get("substitutions") or {}).items():
            substitutions[model] += n
    totals["requests"] = sum(finished.values())
    totals["substitutions"] = sum(substitutions.values())
    totals["blocks"] = len(replicas)
    totals["block_instances"] = sum(replicas.values())
    totals["mean_batch"] = (sum(batch_samples) / len(batch_samples)) if batch_samples else 0.0
    return {
        "time": time.time(),
        "polls": polls,
        "workers": dict(workers),
        "replicas": dict(replicas),
        "model_replicas": dict(model_replicas),
        "blocks": block_info,
        "finished": dict(finished),
        "tenants": {t: {**d, "models": sorted(d["models"])} for t, d in sorted(tenants.items())},
        "substitutions": dict(substitutions),
        "percentiles": {k: {f"0.{q:02d}" if q < 100 else "1": percentile(v, q) for q in QUANTILES} for k, v in samples.items()},
        "totals": dict(totals),
        "split": split_totals(workers),  # hand-offs and speculation of chains split across workers
    }


class MonitorSchedulerPlugin(SchedulerPlugin):
    """Polls block hosts once a second; feeds the dashboard page and the scheduler's /metrics."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, poll_ms: int = POLL_MS, dashboard: bool = True) -> None:
        self.poll_ms = poll_ms
        self.dashboard = dashboard
        self.view: dict[str, Any] | None = None
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY)
        self.polls = 0
        self.scheduler = None
        self._pc: PeriodicCallback | None = None
        self._collector = None
        self._split_collector = None
        self._page = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        scheduler.extensions["blockllm-monitor"] = self
        self._pc = PeriodicCallback(self.poll, self.poll_ms)
        self._pc.start()
        try:
            import prometheus_client

            self._collector = SchedulerCollector(lambda: self.view)
            prometheus_client.REGISTRY.register(self._collector)
            self._split_collector = SplitSchedulerCollector(lambda: self.view)
            prometheus_client.REGISTRY.register(self._split_collector)
        except ImportError:
            pass
        if self.dashboard:
            try:
                from .dashboard import add_page

                self._page = add_page(scheduler, self)
            except ImportError as e:  # no bokeh: distributed has no dashboard either
                log.warning("BlockLLM dashboard page not added: %s", e)
        await self.poll()

    async def close(self) -> None:
        if self._pc is not None:
            self._pc.stop()
        for attr in ("_collector", "_split_collector"):
            collector = getattr(self, attr)
            if collector is not None:
                import prometheus_client

                try:
                    prometheus_client.REGISTRY.unregister(collector)
                except KeyError:
                    pass
                setattr(self, attr, None)
        if self._page is not None:
            self._page.remove()
            self._page = None
        if self.scheduler is not None:
            self.scheduler.extensions.pop("blockllm-monitor", None)

    async def _one(self, address: str) -> tuple[str, dict[str, Any]]:
        try:
            view = await asyncio.wait_for(self.scheduler.rpc(address).blockllm_metrics(), timeout=max(2.0, self.poll_ms / 1000))
            return address, dict(view)
        except Exception as e:  # no monitor plugin (yet) on it, or it is busy/leaving
            return address, {"host": False, "address": address, "error": repr(e)}

    async def poll(self) -> None:
        if self.scheduler is None:
            return
        results = await asyncio.gather(*(self._one(a) for a in list(self.scheduler.workers)))
        self.polls += 1
        self.view = aggregate(dict(results), self.polls)
        t = self.view["totals"]
        self.history.append({
            "time": self.view["time"] * 1000.0,  # bokeh datetime axis: ms
            "request_rate": t.get("request_rate", 0.0),
            "token_rate": t.get("token_rate", 0.0),
            "running": float(t.get("running", 0)),
            "waiting": float(t.get("waiting", 0)),
        })
