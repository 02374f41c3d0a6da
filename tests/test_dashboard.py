"""The BlockLLM page of the Dask dashboard, loaded in headless Chromium after real requests.

Two passes: `chromium --headless --dump-dom` reads the page as served (navigation link, the
summary figures rendered on the server), then Chromium driven over its DevTools protocol waits
for Bokeh's websocket session (which --dump-dom/--screenshot do not wait for), reads the live
figures and tables, and takes the screenshot. `BLOCKLLM_UPDATE_SCREENSHOT=1` also writes it to
docs/dashboard.png.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars", "--window-size=1400,1500",
]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="!!! CHROMIUM IS NOT INSTALLED: the dashboard browser test did NOT run (apt-get install chromium; CI installs it) !!!",
)


# ------------------------------------------------------------------------------------ unit
def test_summary_values_and_aggregate_from_worker_views():
    from blockllm.monitoring.cluster import aggregate
    from blockllm.monitoring.dashboard import summary_values

    def worker(models, blocks, finished, tokens, ttfts):
        return {
            "host": True, "models": models, "running": 1, "waiting": 2,
            "engine": {"weight_bytes": sum(b[1] for b in blocks), "kv_used": 3, "kv_total": 10},
            "blocks": [{"fingerprint": fp, "bytes": n, "kind": "decoder", "batch": 1, "queue": q, "models": models} for fp, n, q in blocks],
            "metrics": {
                "requests": [[models[0], "acme", "finished", finished], [models[0], "globex", "rejected:ForbiddenError", 1]],
                "tokens": [[models[0], "acme", tokens]], "substitutions": {models[0]: 2}, "steps": 7,
                "window": {"seconds": 10.0, "arrivals": finished, "finished": finished, "tokens": tokens, "ttft": ttfts, "tpot": [0.01], "latency": [0.5], "tenants": ["acme"], "batch": [2, 4]},
            },
        }

    view = aggregate({
        "tcp://a": worker(["acme/m"], [("aa" * 32, 100, 0), ("bb" * 32, 50, 4)], 5, 40, [0.1, 0.2]),
        "tcp://b": worker(["acme/m"], [("aa" * 32, 100, 1)], 3, 24, [0.3]),
        "tcp://c": {"host": False},
    }, polls=9)
    t = view["totals"]
    assert t["workers"] == 2 and t["weight_bytes"] == 250 and t["kv_total"] == 20 and t["kv_used"] == 6
    assert view["replicas"] == {"aa" * 32: 2, "bb" * 32: 1} and view["model_replicas"] == {"acme/m": 2}
    assert t["requests"] == 8 and t["tokens"] == 64 and t["substitutions"] == 4
    assert t["request_rate"] == pytest.approx(0.8) and t["mean_batch"] == pytest.approx(3.0)
    assert view["percentiles"]["ttft"]["0.50"] == pytest.approx(0.2)
    assert view["tenants"]["globex"]["errors"] == 2 and view["tenants"]["acme"]["requests"] == 8
    shown = {k: (v, s) for k, _, v, s in summary_values(view)}
    assert shown["workers"] == (2, "2") and shown["max-queue"][0] == 4 and shown["tenants"][0] == 2
    assert shown["ttft-p50"][1] == "200.0 ms" and shown["polls"][0] == 9
    empty = {k: v for k, _, v, _ in summary_values(None)}
    assert empty["ttft-p50"] == "" and empty["requests"] == 0


# ------------------------------------------------------------------------------ a live cluster
@pytest.fixture(scope="module")
def served(tiny_zoo):
    """A LocalCluster with block hosts and the monitor, and some requests of two tenants served."""
    import distributed

    from blockllm.auth import create_key
    from blockllm.client import Client, GenerationRequest
    from blockllm.monitoring import dashboard_url, install
    from blockllm.types import SamplingParams

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1") as cluster:
        with distributed.Client(cluster) as dask:
            dask.wait_for_workers(2, timeout=120)
            install(dask)
            clients = {t: Client(dask, api_key=create_key(tiny_zoo, t), zoo=tiny_zoo.url) for t in ("acme", "globex")}
            models = {"acme": ["acme/tiny-full", "acme/tiny-lora-b", "platform/tiny-base"], "globex": ["globex/tiny-partial-b"]}
            clients["acme"].place([m for ms in models.values() for m in ms])
            for c in clients.values():
                c.plan = clients["acme"].plan
            futures = []
            for tenant, ms in models.items():
                for m in ms:
                    futures += clients[tenant].submit([
                        GenerationRequest(model=m, prompt=p, sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))
                        for p in ("3 + 4 =", "the")
                    ])
            done = [f.result(300) for f in futures]
            monitor_totals = _wait_for(dask, lambda t: t.get("requests", 0) >= len(done))
            yield {"dask": dask, "url": dashboard_url(dask), "n": len(done), "totals": monitor_totals, "clients": clients, "zoo": tiny_zoo}


def _monitor_totals(dask_scheduler=None):
    m = dask_scheduler.extensions.get("blockllm-monitor")
    return (m.view or {}).get("totals", {}) if m else {}


def _wait_for(dask, ok, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        totals = dask.run_on_scheduler(_monitor_totals)
        if ok(totals) or time.monotonic() > deadline:
            return totals
        time.sleep(0.5)


def test_page_is_in_the_dashboard_navigation(served):
    with urllib.request.urlopen(served["url"].replace("/blockllm", "/status"), timeout=30) as r:
        status = r.read().decode()
    assert '<a href="blockllm">' in status  # top navigation bar
    assert ">BlockLLM</a>" in status  # and the "More..." menu


def test_monitor_sees_the_requests(served):
    t = served["totals"]
    assert t["workers"] == 2
    assert t["requests"] >= served["n"] and t["tokens"] >= 6 * served["n"]
    assert t["blocks"] > 0 and t["weight_bytes"] > 0


@needs_chromium
def test_dump_dom_shows_the_page_with_real_numbers(served, tmp_path):
    out = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom", served["url"]],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert '<a href="blockllm">' in dom and 'id="blockllm-summary"' in dom
    values = dict(re.findall(r'id="blockllm-([a-z0-9-]+)" data-value="([^"]*)"', dom))
    assert float(values["workers"]) == 2
    assert float(values["requests"]) >= served["n"]
    assert float(values["tokens"]) > 0 and float(values["blocks"]) > 0 and float(values["weight-bytes"]) > 0
    assert float(values["ttft-p50"]) > 0 and float(values["latency-p95"]) > 0 and float(values["tpot-p50"]) > 0
    assert float(values["tenants"]) == 2
    assert "data-root-id" in dom  # the Bokeh document's root is on the page


@needs_chromium
def test_live_page_in_headless_chromium_and_screenshot(served, tmp_path):
    page = asyncio.run(_cdp_load(served["url"], _RENDERED_JS, tmp_path))
    assert page["ready"], page
    summary = page["summary"]
    assert float(summary["workers"]) == 2 and float(summary["requests"]) >= served["n"]
    assert float(summary["kv-total"]) >= 0 and float(summary["ttft-p95"]) > 0
    cells = " ".join(page["cells"])
    zoo = served["zoo"]
    for model in ("acme/tiny-full", "globex/tiny-partial-b"):
        tenant, _, name = model.partition("/")
        assert model in cells  # models table
        assert zoo.get_manifest(tenant, name).chain[0][:12] in cells  # blocks table: short fingerprints
    assert "acme" in cells and "globex" in cells  # tenants table
    assert page["canvases"] >= 4  # memory, KV, rates, latency figures drawn
    png = base64.b64decode(page["screenshot"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    (tmp_path / "dashboard.png").write_bytes(png)
    if os.environ.get("BLOCKLLM_UPDATE_SCREENSHOT"):
        (ROOT / "docs" / "dashboard.png").write_bytes(png)


# ------------------------------------------------------------------- Chromium over DevTools
_RENDERED_JS = r"""
(() => {
  const all = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      all.push(el);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  const cells = all.filter(e => e.classList && e.classList.contains('slick-cell')).map(e => e.textContent.trim()).filter(t => t);
  const canvases = all.filter(e => e.tagName === 'CANVAS').length;
  const summary = {};
  for (const e of document.querySelectorAll('[id^="blockllm-"][data-value]')) summary[e.id.slice(9)] = e.dataset.value;
  const ready = cells.length > 0 && canvases >= 4 && Number(summary.requests || 0) > 0;
  return JSON.stringify({ready, cells, canvases, summary});
})()
"""


async def _cdp_load(url: str, probe_js: str, tmp: Path, timeout: float = 60.0) -> dict:
    """Open `url` in headless Chromium, wait until `probe_js` reports ready, screenshot it."""
    from tornado.websocket import websocket_connect

    profile = Path(tempfile.mkdtemp(dir=tmp))
    proc = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.loads(r.read())
        ws = await websocket_connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        try:
            return await _drive(ws, url, probe_js, timeout)
        finally:
            ws.close()
            try:  # read to the end: the socket is closed once the close handshake is done
                while await asyncio.wait_for(ws.read_message(), 5) is not None:
                    pass
            except Exception:
                pass
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _drive(ws, url: str, probe_js: str, timeout: float) -> dict:
    """Navigate, poll `probe_js` until it says ready, then take the screenshot."""
    ids = iter(range(1, 1_000_000))

    async def call(method: str, **params):
        i = next(ids)
        await ws.write_message(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.read_message(), 30))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    await call("Page.enable")
    await call("Page.navigate", url=url)
    result: dict = {"ready": False}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await call("Runtime.evaluate", expression=probe_js, returnByValue=True)
        value = r.get("result", {}).get("value")
        if value:
            result = json.loads(value)
            if result.get("ready"):
                break
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.5)  # one more live update, so the screenshot shows settled figures
    r = await call("Runtime.evaluate", expression=probe_js, returnByValue=True)
    result = {**result, **json.loads(r["result"]["value"]), "ready": result.get("ready", False)}
    shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    result["screenshot"] = shot["data"]
    return result
