"""CLI of the offline jobs (`blockllm jobs ...`) and of the block graph (`blockllm graph ...`).

Mount with `app.add_typer(jobs_app, name="jobs")` and `app.add_typer(graph_app, name="graph")`, or
through the `blockllm.cli` entry point group.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphs import GraphError, list_versions, load_graph, rollback
from zoo_store import Zoo, ZooError

from .equivalence import EquivalenceReport, run_equivalence
from .schedule import parse_every, run_every

jobs_app = typer.Typer(
    help="Offline jobs as Dask task graphs: equivalence (re)computation and its schedule.",
    no_args_is_help=True,
)
graph_app = typer.Typer(
    help="The block graph published in the zoo: show, roll back.", no_args_is_help=True
)
console = Console()
err_console = Console(stderr=True)

ZooOpt = Annotated[
    str | None,
    typer.Option(
        "--zoo",
        help="Zoo URL (file://, memory://, s3://); default from config / $BLOCKLLM_ZOO.",
        envvar="BLOCKLLM_ZOO",
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="Dask scheduler address; default: a LocalCluster for the run.",
        envvar="DASK_SCHEDULER_ADDRESS",
    ),
]
WorkersOpt = Annotated[
    int,
    typer.Option("--workers", min=0, help="Workers of the local cluster (0: run inline, no Dask)."),
]
FullOpt = Annotated[
    bool,
    typer.Option(
        "--full", help="Compare everything again, not only what changed since the last run."
    ),
]
ProbeOpt = Annotated[
    Path | None,
    typer.Option(
        "--probe-file",
        exists=True,
        dir_okay=False,
        help="Probe prompts, one per line (stored; later runs reuse them).",
    ),
]


def _fail(e: Exception) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {e}", soft_wrap=True)
    return typer.Exit(1)


@contextlib.contextmanager
def _client(scheduler: str | None, workers: int) -> Iterator[Any]:
    if scheduler is None and workers == 0:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    with Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _print_report(r: EquivalenceReport) -> None:
    if r.status != "done":
        console.print(f"run {r.run_id}: skipped (another equivalence run holds the lock)")
        return
    t = Table(
        "blocks",
        "new",
        "considered",
        "skipped",
        "compared",
        "prefiltered",
        "rejected",
        "edges +/-",
        "graph",
        "seconds",
        title=f"equivalence run {r.run_id}" + (" (full)" if r.full else ""),
    )
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(r.skipped.items())) or "0"
    t.add_row(
        str(r.blocks),
        str(r.new_blocks),
        str(r.considered),
        skipped,
        str(r.compared),
        str(r.prefiltered),
        str(r.rejected),
        f"+{r.edges_added}/-{r.edges_removed}",
        f"v{r.graph_version}",
        f"{r.duration_s:.2f}",
    )
    console.print(t)
    accepted = [(p, d) for p in r.pairs for d in p.directions if d.accepted]
    if accepted:
        e = Table(
            "position",
            "substitute",
            "stands in for",
            "kl",
            "agreement",
            "context",
            title="equivalences found",
        )
        for p, d in accepted:
            e.add_row(
                f"{p.position[0]} {p.position[1]}-{p.position[2]}",
                d.substitute[:12],
                d.original[:12],
                f"{d.metrics.get('kl', float('nan')):.4f}",
                f"{d.metrics.get('agreement', float('nan')):.3f}",
                d.context,
            )
        console.print(e)
    if r.failed:
        err_console.print(
            f"[yellow]{r.failed} task(s) failed; their blocks are retried next run (see the log)[/yellow]"
        )


def _prompts(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    lines = [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise typer.BadParameter(f"{path} holds no prompts")
    return lines


@jobs_app.command("equivalence")
def equivalence_cmd(
    zoo: ZooOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = 2,
    full: FullOpt = False,
    probe_file: ProbeOpt = None,
    skip_if_running: Annotated[
        bool,
        typer.Option(
            "--skip-if-running", help="Exit at once if another run holds the lock (default: wait)."
        ),
    ] = False,
) -> None:
    """Find which blocks can stand in for which (only what changed since the last run) and publish the graph."""
    try:
        z = Zoo(zoo)
        with _client(scheduler, workers) as client, _progress() as progress:
            report = run_equivalence(
                z,
                client,
                full=full,
                progress=progress,
                probe_prompts=_prompts(probe_file),
                if_locked="skip" if skip_if_running else "wait",
            )
    except (ZooError, GraphError, ValueError) as e:
        raise _fail(e) from e
    _print_report(report)


@jobs_app.command("schedule")
def schedule_cmd(
    every: Annotated[str, typer.Option("--every", help="Interval: 90s, 15m, 1h, 1d.")] = "1h",
    times: Annotated[
        int | None,
        typer.Option(
            "--times", min=1, help="Stop after this many ticks (default: run until interrupted)."
        ),
    ] = None,
    zoo: ZooOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = 2,
) -> None:
    """Run the equivalence job periodically; a run that would overlap a running one is skipped."""
    try:
        interval = parse_every(every)
        z = Zoo(zoo)
    except (ZooError, ValueError) as e:
        raise _fail(e) from e
    logging.getLogger("jobs").setLevel(logging.INFO)
    with _client(scheduler, workers) as client:

        def job() -> EquivalenceReport:
            return run_equivalence(z, client, if_locked="skip")

        def done(report: EquivalenceReport, took: float) -> None:
            if report.status == "done":
                console.print(
                    f"run {report.run_id}: {report.new_blocks} new blocks, {report.compared} compared, "
                    f"+{report.edges_added}/-{report.edges_removed} edges, graph v{report.graph_version}, {took:.2f} s"
                )
            else:
                console.print(f"run {report.run_id}: skipped (another run holds the lock)")

        console.print(
            f"equivalence every {interval:g} s"
            + (f", {times} tick(s)" if times else " (Ctrl-C to stop)")
        )
        try:
            result = run_every(job, interval, times=times, on_result=done)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    console.print(
        f"{result.runs} run(s), {result.skipped} tick(s) skipped (previous run still going), {result.failed} failed"
    )
    if result.failed:
        raise typer.Exit(1)


@graph_app.command("show")
def graph_show(
    zoo: ZooOpt = None,
    version: Annotated[
        int | None, typer.Option("--version", help="A stored version (default: the published one).")
    ] = None,
    edges: Annotated[
        int, typer.Option("--edges", min=0, help="How many equiv edges to list (best first).")
    ] = 20,
) -> None:
    """Summary of the published block graph, its stored versions and its best equivalences."""
    try:
        z = Zoo(zoo)
        g = load_graph(z, version)
        versions = list_versions(z)
    except (ZooError, GraphError) as e:
        raise _fail(e) from e
    s = g.summary()
    t = Table(*s.keys(), title="block graph")
    t.add_row(*(str(v) for v in s.values()))
    console.print(t)
    console.print(
        "versions: " + ", ".join(f"v{v.version}{'*' if v.current else ''}" for v in versions)
    )
    eq = sorted(g.equiv_edges(), key=lambda e: e.score)[:edges]
    if eq:
        e = Table(
            "position",
            "substitute",
            "owner",
            "stands in for",
            "score",
            "metric",
            "agreement",
            "context",
            "date",
            title="equivalences",
        )
        for edge in eq:
            node = g.node(edge.substitute)
            kind, start, end = g.position(edge.original)
            owner = "shared" if node["visibility"] == "shared" else ",".join(node["tenants"])
            e.add_row(
                f"{kind} {start}-{end}",
                edge.substitute[:12],
                owner,
                edge.original[:12],
                f"{edge.score:.4f}",
                edge.metric,
                f"{edge.metrics.get('agreement', float('nan')):.3f}",
                edge.context,
                edge.date,
            )
        console.print(e)


@graph_app.command("rollback")
def graph_rollback(
    version: Annotated[int, typer.Argument(help="The stored version to publish again.")],
    zoo: ZooOpt = None,
) -> None:
    """Publish a copy of an older graph version as the newest one."""
    try:
        new = rollback(Zoo(zoo), version)
    except (ZooError, GraphError) as e:
        raise _fail(e) from e
    console.print(f"published v{version} again as v{new}")


__all__ = ["graph_app", "jobs_app"]
