"""The `blockllm` command line: zoo management, the demo; more commands plug in by entry point."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from zoo_store import Zoo, ZooError

from .exceptions import BlockLLMError
from .metrics import human_bytes

app = typer.Typer(
    name="blockllm",
    help="BlockLLM: serve many fine-tuned LLM variants from one block zoo, block by block.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="Manage the block zoo: ingest, list, account, verify, remove, collect.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console()
err_console = Console(stderr=True)

ZooOpt = Annotated[str | None, typer.Option("--zoo", help="Zoo URL (file://, memory://, s3://); default from config / $BLOCKLLM_ZOO.", envvar="BLOCKLLM_ZOO")]


human = human_bytes  # the one formatter for sizes, shared with the dashboard


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar fed with (bytes done now, total bytes)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, total=total, advance=done)

        yield advance


@contextmanager
def spinner(description: str) -> Iterator[None]:
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True) as progress:
        progress.add_task(description, total=None)
        yield


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@contextmanager
def typed_errors() -> Iterator[None]:
    """Our typed errors end the command with their message, not a traceback."""
    try:
        yield
    except (BlockLLMError, ZooError) as e:
        fail(f"{type(e).__name__}: {e}")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # distributed logs every connection at INFO
        logging.getLogger("distributed").setLevel(logging.WARNING)
    # peft reads a property transformers deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


# ---------------------------------------------------------------------------------------- zoo
@zoo_app.command("ingest")
def zoo_ingest(
    path: Annotated[str, typer.Argument(help="HF model dir (config.json + safetensors), PEFT LoRA adapter dir, or .gguf file; local path or fsspec URL.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    name: Annotated[str, typer.Option(help="Model name within the tenant.")],
    base: Annotated[str | None, typer.Option(help="TENANT/NAME of the base model (LoRA adapters).")] = None,
    shared: Annotated[bool, typer.Option("--shared", help="Visible to every tenant (default: private).")] = False,
    error_budget: Annotated[float, typer.Option(help="Quality loss the owner accepts from block substitution (0 = never substitute).")] = 0.0,
    layers_per_block: Annotated[int | None, typer.Option(help="Decoder layers per block (default from config).")] = None,
    zoo: ZooOpt = None,
) -> None:
    """Cut a checkpoint into blocks and store the ones the zoo does not have yet."""
    from .ingest import ingest

    with typed_errors():
        z = Zoo(zoo)
        with byte_progress(f"ingesting {tenant}/{name}") as progress:
            report = ingest(
                z, path, tenant=tenant, name=name, base=base, visibility="shared" if shared else "private",
                error_budget=error_budget, layers_per_block=layers_per_block, progress=progress,
            )
    console.print(
        f"[green]ingested[/] {report.manifest.key}: {len(report.manifest.chain)} chain blocks, "
        f"{len(report.manifest.adapters)} adapter blocks; {report.new_blocks} new ({human(report.new_bytes)}), "
        f"{report.reused_blocks} already in the zoo; model size {human(report.model_bytes)}"
    )


@zoo_app.command("ls")
def zoo_ls(tenant: Annotated[str | None, typer.Option(help="Only this tenant's models.")] = None, zoo: ZooOpt = None) -> None:
    """List the models in the zoo."""
    with typed_errors():
        z = Zoo(zoo, read_only=True)
        stats = z.stats()
        table = Table("model", "family", "visibility", "blocks", "adapters", "size", "base")
        for m in z.list_models(tenant):
            table.add_row(m.key, m.family, m.visibility, str(len(m.chain)), str(len(m.adapters)), human(stats.per_model.get(m.key, 0)), m.base or "")
    console.print(table)


@zoo_app.command("stats")
def zoo_stats(zoo: ZooOpt = None) -> None:
    """Logical bytes (sum over models) against stored bytes (distinct blocks)."""
    with typed_errors():
        s = Zoo(zoo, read_only=True).stats()
    print_stats(s)


def print_stats(s) -> None:
    console.print(
        f"{s.models} models, {s.blocks} distinct blocks; logical {human(s.logical_bytes)}, "
        f"stored {human(s.stored_bytes)}: dedup {s.dedup_ratio:.2f}x "
        f"({human(s.logical_bytes - s.stored_bytes)} saved)"
    )


@zoo_app.command("verify")
def zoo_verify(zoo: ZooOpt = None) -> None:
    """Re-hash every block and check every manifest; exit 1 if anything is damaged."""
    with typed_errors():
        z = Zoo(zoo, read_only=True)
        n = len(z.list_blocks())
        from rich.progress import track

        done = iter(track(range(n), description="verifying blocks", console=err_console, transient=True))
        problems = z.verify(progress=lambda _: next(done, None))
    if problems:
        for what, problem in problems.items():
            console.print(f"[red]DAMAGED[/] {what}: {problem}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {n} blocks verified")


@zoo_app.command("rm")
def zoo_rm(model: Annotated[str, typer.Argument(help="TENANT/NAME")], gc: Annotated[bool, typer.Option("--gc", help="Then collect blocks no model uses.")] = False, zoo: ZooOpt = None) -> None:
    """Remove a model (its blocks stay until garbage collection)."""
    tenant, _, name = model.partition("/")
    with typed_errors():
        z = Zoo(zoo)
        z.delete_model(tenant, name)
        console.print(f"removed {model}")
        if gc:
            report = z.gc(grace_seconds=0)
            console.print(f"collected {len(report.deleted_blocks)} blocks ({human(report.freed_bytes)})")


@zoo_app.command("gc")
def zoo_gc(grace: Annotated[float, typer.Option(help="Keep unreferenced blocks younger than this many seconds (an ingest may be under way).")] = 3600.0, dry_run: bool = False, zoo: ZooOpt = None) -> None:
    """Delete blocks that no model references."""
    with typed_errors():
        report = Zoo(zoo).gc(grace_seconds=grace, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(report.deleted_blocks)} blocks ({human(report.freed_bytes)}); kept {report.kept_young} young ones")


# ---------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    zoo: ZooOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per variant.")] = 12,
) -> None:
    """Build the tiny model family, ingest it, show the dedup, serve a mixed batch of tenants on a LocalCluster."""
    from . import demo as demo_mod
    from .model_sets import build_tiny_family

    with typed_errors():
        with spinner("building the tiny model family (trained once, then cached)"):
            family = build_tiny_family()
        z = Zoo(zoo)
        console.print(f"zoo: {z.url}")
        with byte_progress("ingesting the family") as progress:
            reports = demo_mod.ingest_family(z, family, progress=progress)
        table = Table("model", "kind", "blocks", "new blocks", "bytes added", title="ingest")
        for key, r in reports.items():
            m = z.get_manifest(*key.split("/"))
            kind = "lora adapter" if m.adapters else ("base" if m.base is None else "fine-tune")
            table.add_row(key, kind, str(len(m.chain) + len(m.adapters)), "-" if r is None else str(r.new_blocks), "already there" if r is None else human(r.new_bytes))
        console.print(table)
        print_stats(z.stats())
        demo_mod.run_serving(z, family, max_new_tokens=max_new_tokens, console=console)


# ------------------------------------------------------------------------------ serving
from .monitoring.commands import keys_app, serve, status  # noqa: E402

app.command()(serve)
app.command()(status)
app.add_typer(keys_app, name="keys")

from .batch.cli import batch_app  # noqa: E402

app.add_typer(batch_app, name="batch")


def _mount_plugins() -> None:
    """Sub-commands from other packages (e.g. `jobs`), registered under the `blockllm.cli` entry point group."""
    for ep in entry_points(group="blockllm.cli"):
        try:
            app.add_typer(ep.load(), name=ep.name)
        except Exception as e:  # a broken plugin must not take the whole CLI down
            logging.getLogger(__name__).warning("could not load CLI plugin %s: %s", ep.name, e)


_mount_plugins()
