"""The BlockLLM page of the Dask dashboard (`/blockllm`), a Bokeh document like distributed's own.

`add_page` mounts a Bokeh application next to the scheduler's (the way distributed adds its
Jupyter and shutdown apps) and links it from the dashboard's navigation. The document reads
the monitor's cluster view once a second: blocks per worker with their memory, replicas, batch
and queue, KV pool use, request and token rates, latency percentiles, substitutions, tenants.
The headline numbers are also written into a plain HTML summary (ids `blockllm-*`, raw value
in `data-value`) so that scripts and screen readers see them outside Bokeh's shadow DOM.
"""

from __future__ import annotations

import functools
import html
import logging
import os
from collections.abc import Mapping
from typing import Any

from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    CustomJS,
    DataTable,
    FactorRange,
    HTMLTemplateFormatter,
    NumberFormatter,
    TableColumn,
)
from bokeh.plotting import figure
from jinja2 import ChoiceLoader, DictLoader, Environment, FileSystemLoader
from tornado.ioloop import IOLoop

from ..metrics import human_bytes

log = logging.getLogger(__name__)

ROUTE = "/blockllm"
NAV = "blockllm"

# (id suffix, label, how to show the number)
SUMMARY = (
    ("workers", "workers with a block host", "int"),
    ("models", "models placed", "int"),
    ("blocks", "distinct blocks resident", "int"),
    ("block-instances", "block instances (with replicas)", "int"),
    ("weight-bytes", "weights resident", "bytes"),
    ("kv-used", "KV pages used", "int"),
    ("kv-total", "KV pages total", "int"),
    ("request-rate", "requests / s (1 min)", "float"),
    ("token-rate", "tokens / s (1 min)", "float"),
    ("running", "requests running", "int"),
    ("waiting", "requests waiting", "int"),
    ("requests", "requests finished", "int"),
    ("tokens", "tokens generated", "int"),
    ("mean-batch", "mean step batch (1 min)", "float"),
    ("max-queue", "deepest block queue", "int"),
    ("ttft-p50", "TTFT p50", "seconds"),
    ("ttft-p95", "TTFT p95", "seconds"),
    ("tpot-p50", "per-token p50", "seconds"),
    ("tpot-p95", "per-token p95", "seconds"),
    ("latency-p50", "end-to-end p50", "seconds"),
    ("latency-p95", "end-to-end p95", "seconds"),
    ("substitutions", "substituted blocks", "int"),
    ("tenants", "tenants served", "int"),
    ("polls", "monitor polls", "int"),
)

TEMPLATE = """{% extends "base.html" %}
{% block extra_resources %}
<style>
  #blockllm-summary { display: flex; flex-wrap: wrap; gap: 6px; margin: 8px 10px; font-family: sans-serif; }
  #blockllm-summary .blockllm-stat { border: 1px solid #ddd; border-radius: 4px; padding: 4px 8px; min-width: 120px; }
  #blockllm-summary .blockllm-label { font-size: 11px; color: #666; }
  #blockllm-summary .blockllm-value { font-size: 18px; font-weight: bold; }
</style>
{% endblock %}
{% block content %}
<div id="blockllm-summary" class="blockllm">
{% for key, label, value, shown in summary %}
  <div class="blockllm-stat"><div class="blockllm-label">{{ label }}</div>
  <div class="blockllm-value" id="blockllm-{{ key }}" data-value="{{ value }}">{{ shown }}</div></div>
{% endfor %}
</div>
{{ plot_div }}
{{ plot_script }}
{% endblock %}
"""

_UPDATE_SUMMARY_JS = """
const d = source.data;
for (let i = 0; i < d.key.length; i++) {
  const el = document.getElementById('blockllm-' + d.key[i]);
  if (el) { el.textContent = d.shown[i]; el.dataset.value = String(d.value[i]); }
}
"""


def _env() -> Environment:
    import distributed

    templates = os.path.join(os.path.dirname(distributed.__file__), "http", "templates")
    return Environment(loader=ChoiceLoader([DictLoader({"blockllm.html": TEMPLATE}), FileSystemLoader(templates)]))


def _shown(value: float | None, how: str) -> str:
    if value is None:
        return "-"
    if how == "bytes":
        return human_bytes(value)
    if how == "seconds":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if how == "float":
        return f"{value:.2f}"
    return f"{int(value)}"


def summary_values(view: Mapping[str, Any] | None) -> list[tuple[str, str, float | str, str]]:
    """(key, label, raw value, shown text) for the page's headline numbers."""
    view = view or {}
    t = view.get("totals") or {}
    p = view.get("percentiles") or {}
    queues = [b.get("queue") or 0 for w in (view.get("workers") or {}).values() for b in (w.get("blocks") or [])]
    raw: dict[str, float | None] = {
        "workers": t.get("workers", 0),
        "models": len(view.get("model_replicas") or {}),
        "blocks": t.get("blocks", 0),
        "block-instances": t.get("block_instances", 0),
        "weight-bytes": t.get("weight_bytes", 0),
        "kv-used": t.get("kv_used", 0),
        "kv-total": t.get("kv_total", 0),
        "request-rate": t.get("request_rate", 0.0),
        "token-rate": t.get("token_rate", 0.0),
        "running": t.get("running", 0),
        "waiting": t.get("waiting", 0),
        "requests": t.get("requests", 0),
        "tokens": t.get("tokens", 0),
        "mean-batch": t.get("mean_batch", 0.0),
        "max-queue": max(queues, default=0),
        "substitutions": t.get("substitutions", 0),
        "tenants": len([x for x in (view.get("tenants") or {}) if x != "?"]),
        "polls": view.get("polls", 0),
    }
    for kind in ("ttft", "tpot", "latency"):
        for q in ("50", "95"):
            raw[f"{kind}-p{q}"] = (p.get(kind) or {}).get(f"0.{q}")
    return [(key, label, "" if raw[key] is None else raw[key], _shown(raw[key], how)) for key, label, how in SUMMARY]


def _short(fp: str) -> str:
    return fp[:12]


def blockllm_doc(monitor: Any, scheduler: Any, extra: dict, doc: Any) -> None:
    """Build the page's Bokeh document (one per browser session)."""
    from distributed.dashboard.components.scheduler import BOKEH_THEME

    summary = ColumnDataSource({"key": [], "value": [], "shown": []})
    summary.js_on_change("data", CustomJS(args={"source": summary}, code=_UPDATE_SUMMARY_JS))

    blocks = ColumnDataSource({k: [] for k in ("worker", "block", "kind", "mb", "replicas", "batch", "queue", "models")})
    blocks_table = DataTable(
        source=blocks, name="blockllm-blocks", sizing_mode="stretch_width", height=300, index_position=None,
        columns=[
            TableColumn(field="worker", title="worker"),
            TableColumn(field="block", title="block", formatter=HTMLTemplateFormatter(template='<code><%= value %></code>')),
            TableColumn(field="kind", title="kind"),
            TableColumn(field="mb", title="MB", formatter=NumberFormatter(format="0.00")),
            TableColumn(field="replicas", title="replicas"),
            TableColumn(field="batch", title="batch"),
            TableColumn(field="queue", title="queue"),
            TableColumn(field="models", title="models"),
        ],
    )

    workers = ColumnDataSource({k: [] for k in ("worker", "weights_mb", "kv_used", "kv_free", "kv_pct", "running", "waiting")})
    mem_fig = figure(title="Block weights per worker (MB)", y_range=[], height=220, width=680, name="blockllm-memory", tools="", toolbar_location=None)
    mem_fig.hbar(y="worker", right="weights_mb", height=0.6, source=workers, color="#1f77b4")
    kv_fig = figure(title="KV pool per worker (pages used / free)", y_range=[], height=220, width=680, name="blockllm-kv", tools="", toolbar_location=None)
    kv_fig.hbar_stack(["kv_used", "kv_free"], y="worker", height=0.6, source=workers, color=["#d62728", "#dddddd"], legend_label=["used", "free"])

    history = ColumnDataSource({k: [] for k in ("time", "request_rate", "token_rate", "running", "waiting")})
    rate_fig = figure(title="Requests / s and tokens / s (last minute, all workers)", x_axis_type="datetime", height=220, width=680, name="blockllm-rates", tools="", toolbar_location=None)
    rate_fig.line("time", "request_rate", source=history, color="#1f77b4", legend_label="requests/s", line_width=2)
    rate_fig.line("time", "token_rate", source=history, color="#ff7f0e", legend_label="tokens/s", line_width=2)
    rate_fig.line("time", "running", source=history, color="#2ca02c", legend_label="running", line_dash="dashed")
    rate_fig.legend.location = "top_left"

    factors = [(kind, q) for kind in ("TTFT", "per token", "end to end") for q in ("p50", "p90", "p95", "p99")]
    latency = ColumnDataSource({"x": factors, "ms": [0.0] * len(factors)})
    lat_fig = figure(title="Latency percentiles, last minute (ms)", x_range=FactorRange(*factors), height=220, width=680, name="blockllm-latency", tools="", toolbar_location=None)
    lat_fig.vbar(x="x", top="ms", width=0.8, source=latency, color="#9467bd")
    lat_fig.xaxis.major_label_orientation = 0.8

    tenants = ColumnDataSource({k: [] for k in ("tenant", "requests", "tokens", "errors", "models")})
    tenants_table = DataTable(
        source=tenants, name="blockllm-tenants", height=180, sizing_mode="stretch_width", index_position=None,
        columns=[TableColumn(field=f, title=f) for f in ("tenant", "requests", "tokens", "errors", "models")],
    )
    models = ColumnDataSource({k: [] for k in ("model", "replicas", "finished", "substitutions")})
    models_table = DataTable(
        source=models, name="blockllm-models", height=180, sizing_mode="stretch_width", index_position=None,
        columns=[TableColumn(field=f, title=f) for f in ("model", "replicas", "finished", "substitutions")],
    )

    def update() -> None:
        view = monitor.view or {}
        vals = summary_values(view)
        summary.data = {"key": [v[0] for v in vals], "value": [v[2] for v in vals], "shown": [v[3] for v in vals]}
        rows: dict[str, list] = {k: [] for k in blocks.data}
        wrows: dict[str, list] = {k: [] for k in workers.data}
        replicas = view.get("replicas") or {}
        for addr, w in sorted((view.get("workers") or {}).items()):
            if not w.get("host"):
                continue
            name = addr.rsplit("/", 1)[-1]
            for b in w.get("blocks") or []:
                rows["worker"].append(name)
                rows["block"].append(_short(b["fingerprint"]))
                rows["kind"].append(b.get("kind", ""))
                rows["mb"].append((b.get("bytes") or 0) / 1e6)
                rows["replicas"].append(replicas.get(b["fingerprint"], 1))
                rows["batch"].append(b.get("batch") or 0)
                rows["queue"].append(b.get("queue") or 0)
                rows["models"].append(", ".join(b.get("models") or []))
            e = w.get("engine") or {}
            used, total = e.get("kv_used", 0) or 0, e.get("kv_total", 0) or 0
            wrows["worker"].append(name)
            wrows["weights_mb"].append((e.get("weight_bytes") or 0) / 1e6)
            wrows["kv_used"].append(used)
            wrows["kv_free"].append(max(0, total - used))
            wrows["kv_pct"].append(100.0 * used / total if total else 0.0)
            wrows["running"].append(w.get("running", 0) or 0)
            wrows["waiting"].append(w.get("waiting", 0) or 0)
        blocks.data = rows
        workers.data = wrows
        mem_fig.y_range.factors = list(wrows["worker"])
        kv_fig.y_range.factors = list(wrows["worker"])
        if monitor.history:
            history.data = {k: [h[k] for h in monitor.history] for k in history.data}
        p = view.get("percentiles") or {}
        latency.data = {
            "x": factors,
            "ms": [1000.0 * ((p.get(k) or {}).get(f"0.{q[1:]}") or 0.0) for k, q in ((({"TTFT": "ttft", "per token": "tpot", "end to end": "latency"}[f[0]]), f[1]) for f in factors)],
        }
        trows = {k: [] for k in tenants.data}
        for tenant, d in (view.get("tenants") or {}).items():
            trows["tenant"].append(tenant)
            trows["requests"].append(d["requests"])
            trows["tokens"].append(d["tokens"])
            trows["errors"].append(d["errors"])
            trows["models"].append(", ".join(d["models"]))
        tenants.data = trows
        finished_by_model: dict[str, int] = {}
        for (model, _tenant), n in (view.get("finished") or {}).items():
            finished_by_model[model] = finished_by_model.get(model, 0) + n
        subs = view.get("substitutions") or {}
        mrows = {k: [] for k in models.data}
        for model, n in sorted((view.get("model_replicas") or {}).items()):
            mrows["model"].append(model)
            mrows["replicas"].append(n)
            mrows["finished"].append(finished_by_model.get(model, 0))
            mrows["substitutions"].append(subs.get(model, 0))
        models.data = mrows

    update()
    doc.add_periodic_callback(update, 1000)
    layout = column(
        row(mem_fig, kv_fig),
        row(rate_fig, lat_fig),
        blocks_table,
        row(models_table, tenants_table, sizing_mode="stretch_width"),
        sizing_mode="stretch_width",
        name="blockllm-page",
    )
    doc.title = "Dask: BlockLLM"
    doc.add_root(layout)
    doc.template = _env().get_template("blockllm.html")
    doc.template_variables.update(extra)
    doc.template_variables["summary"] = [(k, html.escape(label), v, s) for k, label, v, s in summary_values(monitor.view)]
    doc.theme = BOKEH_THEME


class Page:
    """A mounted BlockLLM page; `remove()` takes it and its navigation links away."""

    def __init__(self, scheduler: Any, app: Any, nav: dict) -> None:
        self.scheduler, self.app, self.nav = scheduler, app, nav

    def remove(self) -> None:
        try:
            self.app.stop()
        except Exception:
            pass
        apps = self.scheduler.http_application.applications
        if self.app in apps:
            apps.remove(self.app)
        pages, plots = self.nav.get("pages", []), self.nav.get("plots", [])
        if NAV in pages:
            pages.remove(NAV)
        plots[:] = [p for p in plots if p.get("url") != NAV]


def add_page(scheduler: Any, monitor: Any) -> Page | None:
    """Mount `/blockllm` on the scheduler's dashboard and link it from the navigation bar."""
    http_app = getattr(scheduler, "http_application", None)
    if http_app is None or getattr(scheduler, "http_server", None) is None:
        return None
    from bokeh.server.server import BokehTornado
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables

    existing = [a for a in http_app.applications if isinstance(a, BokehTornado)]
    if not existing:
        log.info("the scheduler has no dashboard; BlockLLM page not added")
        return None
    if any(ROUTE in getattr(a, "app_paths", ()) for a in existing):
        raise RuntimeError("a BlockLLM page is already mounted on this scheduler")
    prefix = existing[0].prefix or ""
    nav = template_variables(scheduler)  # memoized per scheduler: the lists every page renders
    if NAV not in nav["pages"]:
        nav["pages"].append(NAV)
    if not any(p.get("url") == NAV for p in nav["plots"]):
        nav["plots"].append({"url": NAV, "name": "BlockLLM"})
        nav["plots"].sort(key=lambda d: d["name"])
    app = BokehApplication({ROUTE: functools.partial(blockllm_doc, monitor)}, scheduler, prefix=prefix, template_variables=nav)
    http_app.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    return Page(scheduler, app, nav)
