"""`blockllm serve` (a cluster, its dashboard page and the HTTP API), `blockllm status`, `blockllm keys`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

STATE_FILE = "serve.json"  # under the cache dir: where `blockllm status` finds a local `serve`

ZooOpt = Annotated[str | None, typer.Option("--zoo", help="Zoo URL (file://, memory://, s3://); default from config / $BLOCKLLM_ZOO.", envvar="BLOCKLLM_ZOO")]
SchedulerOpt = Annotated[str | None, typer.Option("--scheduler", help="Address of a running Dask scheduler (tcp://HOST:PORT).", envvar="BLOCKLLM_SCHEDULER")]


def _state_path() -> Path:
    from ..config import cache_dir

    return cache_dir() / STATE_FILE


def serve(
    scheduler: SchedulerOpt = None,
    workers: Annotated[int, typer.Option(help="Workers of the LocalCluster started when no --scheduler is given.")] = 2,
    threads_per_worker: Annotated[int, typer.Option(help="Threads per worker of that LocalCluster.")] = 2,
    dashboard: Annotated[str, typer.Option(help="HOST:PORT of that LocalCluster's Dask dashboard (port 0: any free port).")] = "127.0.0.1:8787",
    http: Annotated[str | None, typer.Option("--http", help="Also serve the OpenAI-compatible API on HOST:PORT, e.g. 127.0.0.1:8000.")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Place only these models (TENANT/NAME; repeatable). Default: every model in the zoo.")] = None,
    max_inflight_per_tenant: Annotated[int, typer.Option(help="HTTP: requests in flight per tenant before answering 429.")] = 256,
    zoo: ZooOpt = None,
) -> None:
    """Start serving: a Dask cluster with block hosts, the BlockLLM dashboard page, optionally the HTTP API.

    Runs until Ctrl-C. Without --scheduler it starts a LocalCluster on 127.0.0.1.
    """
    import logging

    import distributed

    from ..cli import console, err_console, fail, spinner, typed_errors
    from ..client import Client
    from . import dashboard_url, install

    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # not --verbose: distributed's INFO chatter off
        logging.getLogger("distributed").setLevel(logging.WARNING)
    bind = None
    if http:
        from ..http import parse_bind

        try:
            bind = parse_bind(http)
        except ValueError as e:
            fail(str(e))
    cluster = None
    stack: list[Any] = []
    with typed_errors():
        try:
            if scheduler is None:
                dhost, _, dport = dashboard.rpartition(":")
                with spinner(f"starting a LocalCluster of {workers} workers"):
                    cluster = distributed.LocalCluster(
                        n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                        host="127.0.0.1", dashboard_address=f"{dhost or '127.0.0.1'}:{dport or 0}", silence_logs=logging.WARNING,
                    )
                stack.append(cluster)
                address: Any = cluster
            else:
                address = scheduler
            with spinner(f"connecting to {scheduler or 'the local scheduler'}"):
                dask = distributed.Client(address, timeout="30s")
            stack.append(dask)
            with spinner("installing block hosts and monitoring on the workers"):
                install(dask)
                client = Client(dask, zoo=zoo)
            with spinner("placing models (loading their blocks on the workers)"):
                plan = client.place(model or None)
            http_server = None
            if bind is not None:
                from ..http import HTTPServer, create_app

                with spinner(f"starting the HTTP API on {bind[0]}:{bind[1]}"):
                    http_server = HTTPServer(create_app(client, max_inflight_per_tenant=max_inflight_per_tenant), *bind).start()
                stack.append(http_server)
        except (OSError, TimeoutError) as e:
            _close(stack)
            fail(f"could not start serving: {e}")
        except BaseException:
            _close(stack)
            raise
    placed = sorted({m for ms in plan.assignments.values() for m in ms})
    console.print(f"[green]serving[/] {len(placed)} model{'s' * (len(placed) != 1)} on {len(plan.assignments)} worker{'s' * (len(plan.assignments) != 1)}")
    console.print(f"scheduler:  {dask.scheduler.address}")
    console.print(f"dashboard:  {dask.dashboard_link}")
    console.print(f"BlockLLM:   {dashboard_url(dask)}")
    if http_server is not None:
        console.print(f"HTTP API:   {http_server.url}/v1  (Authorization: Bearer <key>)")
    if plan.unplaced:
        for m, why in plan.unplaced.items():
            err_console.print(f"[yellow]not placed[/] {m}: {why}")
    console.print("press Ctrl-C to stop", style="dim")
    state = _state_path()
    try:
        state.write_text(json.dumps({"pid": os.getpid(), "scheduler": dask.scheduler.address, "dashboard": dask.dashboard_link, "http": http_server.url if http_server else None}))
    except OSError:
        pass
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a service manager's stop
        signal.signal(sig, lambda *_: stopped.set())
    try:
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping...", style="dim")
        try:
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        except (OSError, ValueError):
            pass
        _close(stack)
    console.print("stopped")


def _close(stack: list[Any]) -> None:
    for thing in reversed(stack):
        try:
            (thing.stop if hasattr(thing, "stop") and not hasattr(thing, "close") else thing.close)()
        except Exception:
            pass
    stack.clear()


def _view_on_scheduler(dask_scheduler=None) -> dict[str, Any] | None:
    """Run on the scheduler: the monitor's cluster view in plain data (or None without a monitor)."""
    monitor = dask_scheduler.extensions.get("blockllm-monitor")
    if monitor is None or monitor.view is None:
        return None
    view = dict(monitor.view)
    view["finished"] = [[m, t, n] for (m, t), n in view.get("finished", {}).items()]
    return view


def status(
    scheduler: SchedulerOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw cluster view as JSON.")] = False,
) -> None:
    """Print the cluster: workers, the models and blocks placed on each, and the load.

    Without --scheduler it reads the address a local `blockllm serve` left behind.
    """
    import distributed

    from ..cli import console, fail, human, spinner
    from . import install

    if scheduler is None:
        try:
            scheduler = json.loads(_state_path().read_text())["scheduler"]
        except (OSError, ValueError, KeyError):
            fail("no --scheduler given and no local `blockllm serve` found")
    try:
        with spinner(f"asking {scheduler}"):
            with distributed.Client(scheduler, timeout="10s") as dask:
                view = dask.run_on_scheduler(_view_on_scheduler)
                if view is None:  # a cluster started without the monitor: add it (idempotent)
                    install(dask)
                    deadline = time.monotonic() + 10
                    while view is None and time.monotonic() < deadline:
                        time.sleep(0.5)
                        view = dask.run_on_scheduler(_view_on_scheduler)
                info = dask.scheduler_info(n_workers=-1)
    except (OSError, TimeoutError) as e:
        fail(f"cannot reach the scheduler at {scheduler}: {e}")
    view = view or {}
    if as_json:
        console.print_json(json.dumps(view, default=str))
        return
    t = view.get("totals") or {}
    console.print(f"scheduler {info.get('address', scheduler)}: {len(info.get('workers', {}))} workers, {t.get('workers', 0)} with a block host")
    table = Table("worker", "models", "blocks", "weights", "KV pages", "running", "waiting", "requests", "tokens", title="workers")
    for addr, w in sorted((view.get("workers") or {}).items()):
        if not w.get("host"):
            table.add_row(addr, "-", "-", "-", "-", "-", "-", "-", "-")
            continue
        e = w.get("engine") or {}
        m = w.get("metrics") or {}
        requests = sum(n for _, _, o, n in m.get("requests", []) if o == "finished")
        tokens = sum(n for _, _, n in m.get("tokens", []))
        kv = f"{e.get('kv_used', 0)}/{e.get('kv_total', 0)}" if e.get("kv_total") else "-"
        table.add_row(addr, str(len(w.get("models") or [])), str(len(w.get("blocks") or [])), human(e.get("weight_bytes", 0)), kv, str(w.get("running", 0)), str(w.get("waiting", 0)), str(requests), str(tokens))
    console.print(table)
    placed = Table("model", "workers", "blocks", title="placed models")
    by_model: dict[str, list[str]] = {}
    blocks_of: dict[str, set[str]] = {}
    for addr, w in (view.get("workers") or {}).items():
        for mdl in w.get("models") or []:
            by_model.setdefault(mdl, []).append(addr)
        for b in w.get("blocks") or []:
            for mdl in b.get("models") or []:
                blocks_of.setdefault(mdl, set()).add(b["fingerprint"])
    for mdl, addrs in sorted(by_model.items()):
        placed.add_row(mdl, ", ".join(sorted(addrs)), str(len(blocks_of.get(mdl, ()))))
    console.print(placed)
    p = view.get("percentiles") or {}

    def ms(kind: str, q: str) -> str:
        v = (p.get(kind) or {}).get(q)
        return "-" if v is None else f"{v * 1000:.1f} ms"

    console.print(
        f"load: {t.get('request_rate', 0.0):.2f} requests/s, {t.get('token_rate', 0.0):.1f} tokens/s over the last minute; "
        f"{t.get('running', 0)} running, {t.get('waiting', 0)} waiting; {t.get('requests', 0)} requests and {t.get('tokens', 0)} tokens served; "
        f"{t.get('blocks', 0)} distinct blocks ({t.get('block_instances', 0)} with replicas), {human(t.get('weight_bytes', 0))} of weights; "
        f"{t.get('substitutions', 0)} substituted blocks"
    )
    console.print(f"latency (last minute): TTFT p50 {ms('ttft', '0.50')} p95 {ms('ttft', '0.95')}; per token p50 {ms('tpot', '0.50')}; end to end p50 {ms('latency', '0.50')} p95 {ms('latency', '0.95')}")
    tenants = view.get("tenants") or {}
    if tenants:
        console.print("tenants: " + "; ".join(f"{k} {d['requests']} requests, {d['tokens']} tokens" for k, d in tenants.items()))


keys_app = typer.Typer(help="API keys of tenants (for the HTTP API and blockllm.Client): create, revoke.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Argument(help="The tenant the key acts for.")], zoo: ZooOpt = None) -> None:
    """Make a new API key for TENANT and print it (only its hash is stored, in the zoo)."""
    from zoo_store import Zoo

    from ..auth import create_key
    from ..cli import console, typed_errors

    with typed_errors():
        key = create_key(Zoo(zoo), tenant)
    console.print(key, soft_wrap=True)


@keys_app.command("revoke")
def keys_revoke(tenant: Annotated[str, typer.Argument(help="Every key of this tenant stops working.")], zoo: ZooOpt = None) -> None:
    """Revoke every API key of TENANT."""
    from zoo_store import Zoo

    from ..auth import revoke_tenant
    from ..cli import console, typed_errors

    with typed_errors():
        n = revoke_tenant(Zoo(zoo), tenant)
    console.print(f"revoked {n} keys of {tenant}")
