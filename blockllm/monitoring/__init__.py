"""Monitoring of a BlockLLM cluster: the Dask dashboard page and the Prometheus series.

`install(dask_client)` registers the two plugins that do it: `MonitorWorkerPlugin` on every
worker (metrics of its block host, `blockllm_*` on the worker's /metrics) and
`MonitorSchedulerPlugin` on the scheduler (polls the workers once a second; the `/blockllm`
dashboard page; `blockllm_*` on the scheduler's /metrics).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MonitorSchedulerPlugin", "MonitorWorkerPlugin", "aggregate", "dashboard_url", "host_metrics", "install"]

_LAZY = {  # imported on first use: the CLI imports this package and must start fast
    "MonitorSchedulerPlugin": "cluster",
    "aggregate": "cluster",
    "MonitorWorkerPlugin": "worker",
    "host_metrics": "worker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


def install(dask_client: Any, *, dashboard: bool = True, poll_ms: int | None = None) -> None:
    """Register the monitoring plugins on the cluster of `dask_client` (idempotent)."""
    from .cluster import MonitorSchedulerPlugin
    from .worker import MonitorWorkerPlugin

    kwargs: dict[str, Any] = {"dashboard": dashboard}
    if poll_ms is not None:
        kwargs["poll_ms"] = poll_ms
    dask_client.register_plugin(MonitorWorkerPlugin(), name=MonitorWorkerPlugin.name)
    dask_client.register_plugin(MonitorSchedulerPlugin(**kwargs), name=MonitorSchedulerPlugin.name)


def dashboard_url(dask_client: Any) -> str | None:
    """The address of the BlockLLM dashboard page, if the scheduler serves a dashboard."""
    link = dask_client.dashboard_link
    if not link:
        return None
    return link.rsplit("/", 1)[0] + "/blockllm"
