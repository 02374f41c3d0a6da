"""Batch jobs: a Parquet or JSON-lines file of prompts completed into output parts next to it,
one part per input partition, each committed once; resumable, cancellable, with a state document.

Layout of a job's output (any fsspec URL: file://, s3://, ...)::

    <output>/part-00007.parquet      the completed rows of input partition 7 (or .jsonl)
    <output>/_parts/part-00007.json  its commit marker: a part is in the output iff this exists
    <output>/_job.json               the job's state document
    <output>/_cancel                 present while a cancel is asked for

A part is written to a temporary name and renamed on file systems, or written in one PUT on
object stores (atomic there), and only then committed, so a killed job leaves no half part in the
output; submitting the same job again runs only the partitions without a marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from .. import config as _config
from ..exceptions import (
    BatchInputError,
    JobCancelledError,
    JobNotFoundError,
    OutputNotWritableError,
)
from ..types import SamplingParams
from .api import BatchSpec, check_prompt_column, prepare

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class _Output:
    """Where a job writes, with what options (shipped to the partition tasks)."""

    url: str
    storage_options: dict
    fmt: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.url, **self.storage_options)[0]

    @property
    def root(self) -> str:
        return fsspec.core.url_to_fs(self.url, **self.storage_options)[1].rstrip("/")

    def part(self, i: int) -> str:
        return f"{self.root}/part-{i:05d}.{self.fmt}"

    def marker(self, i: int) -> str:
        return f"{self.root}/_parts/part-{i:05d}.json"

    @property
    def state(self) -> str:
        return f"{self.root}/_job.json"

    @property
    def cancel(self) -> str:
        return f"{self.root}/_cancel"


def _options(url: str, storage_options: dict | None) -> dict:
    if storage_options is not None:
        return dict(storage_options)
    if url.startswith(("s3://", "s3a://")):  # the same object store as the zoo, by default
        return dict(_config.get("zoo.storage-options", {}) or {})
    return {}


def _format_of(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix) or name.endswith(suffix + "*"):
            return fmt
    raise BatchInputError(f"cannot tell the format of {url!r}: give a .parquet or .jsonl file (or a glob of them)")


def _default_output(input_url: str, job_id: str) -> str:
    head, _, name = input_url.rstrip("/").rpartition("/")
    if any(c in name for c in "*?["):
        return f"{head}/completions-{job_id}"
    stem = name
    for suffix in FORMATS:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{head}/{stem}.completions"


def _read(url: str, fmt: str, storage_options: dict, blocksize: int | None):
    import dask.dataframe as dd

    try:
        if fmt == "parquet":
            return dd.read_parquet(url, storage_options=storage_options)
        return dd.read_json(url, lines=True, orient="records", blocksize=blocksize or 2**24, storage_options=storage_options)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise BatchInputError(f"cannot read the job input {url!r}: {e}") from e


def _fingerprint(url: str, storage_options: dict) -> list[list]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    files = sorted(fs.expand_path(path, recursive=True))
    return [[f, fs.size(f)] for f in files if fs.isfile(f)]


def _check_writable(out: _Output) -> fsspec.AbstractFileSystem:
    """OutputNotWritableError unless a probe object can be written (and removed) under the output."""
    try:
        fs = out.fs
        fs.makedirs(out.root, exist_ok=True)
        probe = f"{out.root}/_probe-{uuid.uuid4().hex}"
        fs.pipe(probe, b"")
        fs.rm(probe)
    except Exception as e:  # unknown protocol, missing backend, permissions, a file in the way, no bucket
        raise OutputNotWritableError(f"cannot write the job output {out.url!r}: {type(e).__name__}: {e}") from e
    return fs


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe(tmp, data)
        os.replace(tmp, path)  # atomic on one file system
    else:
        fs.pipe(path, data)  # one PUT: an object store shows all of it or nothing


def _committed(out: _Output) -> dict[int, dict]:
    fs = out.fs
    try:
        names = fs.ls(f"{out.root}/_parts", detail=False)
    except FileNotFoundError:
        return {}
    done = {}
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".json"):
            done[int(base[5:-5])] = json.loads(fs.cat_file(name))
    return done


@dataclass(frozen=True)
class _PartJob:
    """What one partition task needs to complete and commit its part."""

    job_id: str
    out: _Output
    prompt_column: str
    output_column: str
    spec: BatchSpec


def blockllm_batch_part(df, i: int, job: _PartJob) -> int:
    """A Dask task: complete input partition `i` and commit it as one part (skipped if committed)."""
    fs = job.out.fs
    if fs.exists(job.out.marker(i)):  # committed by an earlier run or attempt: never written twice
        return -1
    if fs.exists(job.out.cancel):
        raise JobCancelledError(f"batch job {job.job_id} was cancelled")

    def cancelled() -> bool:
        return fs.exists(job.out.cancel)

    from . import api

    prompts = api.check_prompts(list(df[job.prompt_column]), list(df.index))
    texts = api.run_prompts(prompts, job.spec, cancelled=cancelled) if prompts else []
    result = df.assign(**{job.output_column: texts})
    buf = io.BytesIO()
    if job.out.fmt == "parquet":
        result.to_parquet(buf, index=False)
    else:
        result.to_json(buf, orient="records", lines=True, force_ascii=False)
    _atomic_write(fs, job.out.part(i), buf.getvalue())
    marker = {"part": i, "rows": len(result), "file": job.out.part(i).rsplit("/", 1)[-1], "attempt": uuid.uuid4().hex, "written": time.time()}
    _atomic_write(fs, job.out.marker(i), json.dumps(marker).encode())
    return len(result)


# ------------------------------------------------------------------------------ the job record
def jobs_dir() -> Path:
    configured = _config.get("batch.jobs-dir", None)
    path = Path(configured) if configured else _config.cache_dir() / "batch-jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _register(job_id: str, out: _Output) -> None:
    """Remember where a job's output is, so `blockllm batch status/cancel JOB` can find it."""
    path = jobs_dir() / f"{job_id}.json"
    path.write_text(json.dumps({"job_id": job_id, "output": out.url, "format": out.fmt, "storage_options": out.storage_options}))
    path.chmod(0o600)  # storage options may carry object-store keys


def _locate(job: str) -> tuple[str, _Output]:
    path = jobs_dir() / f"{job}.json"
    if not path.exists():
        raise JobNotFoundError(f"no batch job {job!r} (known: {[p.stem for p in sorted(jobs_dir().glob('*.json'))]})")
    rec = json.loads(path.read_text())
    return rec["job_id"], _Output(rec["output"], rec.get("storage_options") or {}, rec["format"])


def _read_state(out: _Output) -> dict | None:
    fs = out.fs
    try:
        return json.loads(fs.cat_file(out.state))
    except FileNotFoundError:
        return None


def _write_state(out: _Output, state: dict) -> None:
    state["updated"] = time.time()
    _atomic_write(out.fs, out.state, json.dumps(state, indent=1).encode())


def job_status(job: str) -> dict[str, Any]:
    """The state document of a job, with its committed parts and rows counted now."""
    job_id, out = _locate(job)
    state = _read_state(out) or {"job_id": job_id, "status": "unknown"}
    done = _committed(out)
    state.update(parts_done=len(done), rows_done=sum(m["rows"] for m in done.values()), output=out.url)
    if state.get("status") == "running" and out.fs.exists(out.cancel):
        state["status"] = "cancelling"
    return state


def list_jobs() -> list[dict[str, Any]]:
    out = []
    for path in sorted(jobs_dir().glob("*.json")):
        try:
            out.append(job_status(path.stem))
        except Exception as e:  # an output that is gone or unreachable: say so, list the rest
            out.append({"job_id": path.stem, "status": f"unreadable ({type(e).__name__})"})
    return out


def cancel_job(job: str) -> dict[str, Any]:
    """Ask a running job to stop: its tasks abort their requests; committed parts stay."""
    _, out = _locate(job)
    _atomic_write(out.fs, out.cancel, str(time.time()).encode())
    state = _read_state(out)
    if state is not None and state.get("status") == "running":
        state["status"] = "cancelling"
        _write_state(out, state)
    return job_status(job)


def read_output(job_or_url: str, storage_options: dict | None = None):
    """The committed parts of a job's output as one pandas DataFrame (rows in partition order)."""
    import pandas as pd

    try:
        _, out = _locate(job_or_url)
    except JobNotFoundError:
        if "://" not in job_or_url:
            raise
        out = _Output(job_or_url, _options(job_or_url, storage_options), (_read_state(_Output(job_or_url, _options(job_or_url, storage_options), "")) or {}).get("format", "parquet"))
    fs = out.fs
    frames = []
    for i in sorted(_committed(out)):
        data = fs.cat_file(out.part(i))
        frames.append(pd.read_parquet(io.BytesIO(data)) if out.fmt == "parquet" else pd.read_json(io.BytesIO(data), lines=True, orient="records"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------ submit / resume
def submit_job(
    input_url: str,
    model: str,
    *,
    client: Any = None,
    api_key: str | None = None,
    tenant: str | None = None,
    output: str | None = None,
    prompt_column: str = "prompt",
    output_column: str = "completion",
    sampling: SamplingParams | dict | None = None,
    job_id: str | None = None,
    storage_options: dict | None = None,
    blocksize: int | None = None,
    on_part: Callable[[int, int], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a batch job to the end; returns its final status.

    Everything is checked before any generation: the input's format and prompt column, the
    output's writability, the key, tenant and model. The same arguments give the same job id, so
    submitting again after a cancel, a crash or a lost cluster resumes from the committed parts.
    Raises JobCancelledError when cancelled (`cancel_job`), with the committed parts kept.
    """
    import dask
    import distributed

    if "://" not in input_url:  # a local path (maybe a glob: no as_uri(), it would escape the *)
        input_url = "file://" + os.path.abspath(input_url)
    fmt = _format_of(input_url)
    in_opts = _options(input_url, storage_options)
    if isinstance(sampling, dict):
        sampling = SamplingParams(**sampling)
    sampling = sampling or SamplingParams()
    ident = json.dumps([input_url, model, tenant, prompt_column, output_column, dataclasses.asdict(sampling), output], sort_keys=True)
    job_id = job_id or hashlib.sha256(ident.encode()).hexdigest()[:12]
    output = output or _default_output(input_url, job_id)
    if "://" not in output:
        output = "file://" + os.path.abspath(output)
    out = _Output(output, _options(output, storage_options), fmt)
    ddf = _read(input_url, fmt, in_opts, blocksize)
    check_prompt_column(ddf._meta, prompt_column)
    if output_column == prompt_column:
        raise BatchInputError(f"output_column {output_column!r} would overwrite the prompts; pick another name")
    fs = _check_writable(out)
    bl, spec = prepare(client, model, tenant=tenant, api_key=api_key, sampling=sampling)

    fingerprint = _fingerprint(input_url, in_opts)
    state = _read_state(out)
    if state is not None and (state.get("input_files") != fingerprint or state.get("npartitions") != ddf.npartitions or state.get("job_id") != job_id):
        raise BatchInputError(
            f"{out.url} holds job {state.get('job_id')} over different input or partitions; "
            "pass another --output (or remove it) to start afresh"
        )
    state = state or {
        "job_id": job_id, "input": input_url, "output": out.url, "format": fmt, "model": model,
        "tenant": tenant, "prompt_column": prompt_column, "output_column": output_column,
        "sampling": dataclasses.asdict(sampling), "npartitions": ddf.npartitions, "input_files": fingerprint,
        "created": time.time(), "runs": 0,
    }
    if fs.exists(out.cancel):
        fs.rm(out.cancel)  # submitting again resumes a cancelled job
    state.update(status="running", runs=state.get("runs", 0) + 1, error=None)
    _write_state(out, state)
    _register(job_id, out)

    job = _PartJob(job_id, out, prompt_column, output_column, spec)
    todo = [i for i in range(ddf.npartitions) if i not in _committed(out)]
    parts = ddf.to_delayed()
    tasks = [
        dask.delayed(blockllm_batch_part, pure=False)(parts[i], i, job, dask_key_name=f"blockllm-batch-{job_id}-{i:05d}-{uuid.uuid4().hex[:6]}")
        for i in todo
    ]
    futures = bl.dask.compute(tasks, retries=int(_config.get("batch.partition-retries", 2))) if tasks else []
    index = {f.key: i for f, i in zip(futures, todo, strict=True)}
    bar = None
    if progress and futures:
        import threading

        bar = threading.Thread(target=distributed.progress, args=(futures,), kwargs={"notebook": False}, daemon=True)
        bar.start()
    pending = set(futures)
    error: BaseException | None = None
    try:
        while pending:
            try:
                distributed.wait(list(pending), timeout=1.0, return_when="FIRST_COMPLETED")
            except distributed.TimeoutError:
                pass
            for f in [f for f in pending if f.done()]:
                pending.discard(f)
                if f.status == "finished":
                    rows = f.result()
                    if on_part is not None and rows >= 0:
                        on_part(index[f.key], rows)
                elif f.status == "error" and error is None:
                    error = f.exception()
            if error is not None or fs.exists(out.cancel):
                break
        if pending and error is not None and not isinstance(error, JobCancelledError):
            bl.dask.cancel(list(pending))  # a real failure: stop the rest
        elif pending:  # cancelled: every task stops at the marker within a second; wait, so the state is final
            try:
                distributed.wait(list(pending), timeout=60)
            except distributed.TimeoutError:
                bl.dask.cancel(list(pending))
    except BaseException as e:  # interrupted here (Ctrl-C): stop the tasks, keep what is committed
        bl.dask.cancel(list(pending))
        error = error or e
    if bar is not None:  # its last redraw belongs to this job's output, not to whatever prints next
        bar.join(timeout=5.0)
    cancelled = fs.exists(out.cancel) or isinstance(error, JobCancelledError)
    done = _committed(out)
    state = _read_state(out) or state
    if cancelled:
        state["status"] = "cancelled"
    elif error is not None:
        state.update(status="failed", error=f"{type(error).__name__}: {error}")
    else:
        state["status"] = "done" if len(done) == ddf.npartitions else "incomplete"
    _write_state(out, state)
    if cancelled:
        raise JobCancelledError(f"batch job {job_id} was cancelled with {len(done)}/{ddf.npartitions} parts written; submit it again to resume")
    if error is not None:
        raise error
    return job_status(job_id)


__all__ = ["cancel_job", "job_status", "list_jobs", "read_output", "submit_job"]
