"""`blockllm batch submit | status | cancel`: batch jobs over Parquet / JSON-lines files."""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated

import typer
from rich.table import Table

batch_app = typer.Typer(help="Batch inference jobs over Parquet / JSON-lines files, at low priority.", no_args_is_help=True)

ZooOpt = Annotated[str | None, typer.Option("--zoo", help="Zoo URL (file://, memory://, s3://); default from config / $BLOCKLLM_ZOO.", envvar="BLOCKLLM_ZOO")]
SchedulerOpt = Annotated[str | None, typer.Option("--scheduler", help="Address of a running Dask scheduler (default: a local `blockllm serve`, else a new LocalCluster).", envvar="BLOCKLLM_SCHEDULER")]


def _scheduler(given: str | None) -> str | None:
    if given:
        return given
    from ..monitoring.commands import _state_path

    try:
        return json.loads(_state_path().read_text())["scheduler"]
    except (OSError, ValueError, KeyError):
        return None


@batch_app.command("submit")
def submit(
    input: Annotated[str, typer.Argument(help="A .parquet or .jsonl file (or a glob of them), local path or fsspec URL.")],
    model: Annotated[str, typer.Option("--model", "-m", help="TENANT/NAME of the model.")],
    api_key: Annotated[str, typer.Option("--api-key", envvar="BLOCKLLM_API_KEY", help="The tenant's API key.")],
    tenant: Annotated[str | None, typer.Option(help="Check that the key belongs to this tenant.")] = None,
    output: Annotated[str | None, typer.Option(help="Output URL (default: next to the input, <name>.completions).")] = None,
    prompt_column: Annotated[str, typer.Option(help="Column of prompts.")] = "prompt",
    output_column: Annotated[str, typer.Option(help="Column of completions added to each row.")] = "completion",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per row at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    job_id: Annotated[str | None, typer.Option(help="Job id (default: derived from the arguments, so resubmitting resumes).")] = None,
    storage_options: Annotated[str | None, typer.Option(help="fsspec storage options as JSON (default for s3://: the zoo's).")] = None,
    scheduler: SchedulerOpt = None,
    workers: Annotated[int, typer.Option(help="Workers of the LocalCluster started when there is no scheduler.")] = 2,
    zoo: ZooOpt = None,
) -> None:
    """Complete every row of INPUT into parts next to it; resubmitting resumes an interrupted job."""
    import distributed

    from ..cli import console, err_console, fail, typed_errors
    from ..client import Client
    from ..types import SamplingParams
    from .jobs import submit_job

    options = None
    if storage_options:
        try:
            options = json.loads(storage_options)
        except ValueError as e:
            fail(f"--storage-options is not JSON: {e}")
    address = _scheduler(scheduler)
    with typed_errors():
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        if address is None:
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING)
            dask = distributed.Client(cluster)
        else:
            cluster, dask = None, distributed.Client(address, timeout="30s")
        try:
            client = Client(dask, api_key=api_key, zoo=zoo)
            err_console.print(f"dashboard: {dask.dashboard_link}")
            started = time.monotonic()
            state = submit_job(
                input, model, client=client, api_key=api_key, tenant=tenant, output=output, prompt_column=prompt_column,
                output_column=output_column, sampling=sampling, job_id=job_id, storage_options=options, progress=True,
            )
        finally:
            dask.close()
            if cluster is not None:
                cluster.close()
    console.print(
        f"\n[green]{state['status']}[/] job {state['job_id']}: {state['parts_done']}/{state['npartitions']} parts, "
        f"{state['rows_done']} rows in {time.monotonic() - started:.1f} s -> {state['output']}"
    )


@batch_app.command("status")
def status(
    job: Annotated[str | None, typer.Argument(help="Job id (default: every job recorded here).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state documents as JSON.")] = False,
) -> None:
    """The state of batch jobs: status, parts and rows written, output URL."""
    from ..cli import console, typed_errors
    from .jobs import job_status, list_jobs

    with typed_errors():
        states = [job_status(job)] if job else list_jobs()
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in s.items() if k != "input_files"} for s in states], indent=1))
        return
    table = Table("job", "status", "model", "parts", "rows", "output")
    for s in states:
        table.add_row(s.get("job_id", "?"), s.get("status", "?"), s.get("model") or "", f"{s.get('parts_done', 0)}/{s.get('npartitions', '?')}", str(s.get("rows_done", "")), s.get("output", ""))
    console.print(table)


@batch_app.command("cancel")
def cancel(job: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Stop a running job: its requests are aborted, the parts already written stay (resubmit to resume)."""
    from ..cli import console, typed_errors
    from .jobs import cancel_job

    with typed_errors():
        s = cancel_job(job)
    console.print(f"job {s['job_id']}: {s['status']} ({s['parts_done']}/{s.get('npartitions', '?')} parts written)")
