"""Batch jobs: a Parquet or JSON-lines file of prompts completed into output parts next to it,
one part per input partition, each committed once; resumable, cancellable, with a state document.

Layout of a job's output (any fsspec URL: file://, s3://, ...)::

    <output>/part-00007.parquet      the completed rows of input partition 7 (or .jsonl)
    <output>/_parts/part-00007.json  its commit marker: a part is in the output iff this exists
    <output>/_job.json               the job's state document
    <output>/_lease                  held by the driver running the job (see "One driver at a time")
    <output>/_cancel                 present while a cancel is asked for

A part is written to a temporary name (hidden: `.part-00007.parquet.tmp-*`, which Parquet and
Dask readers skip) and renamed on file systems, or written in one PUT on object stores (atomic
there), and only then committed, so a killed job leaves no half part in the output; submitting
the same job again runs only the partitions without a marker.

Worker loss. A partition task whose worker dies is run again by Dask on another worker. A task
finds the block hosts of its model among the workers alive now (never waiting on a dead one); if
none is left it fails with NoCapacityError, and the driver places the model again on the live
workers (keeping what else is loaded) and runs those partitions again, at most RELAUNCHES times
each. Greedy outputs are the same whichever host runs them.

One driver at a time. The driver of a job (`submit_job`, `blockllm batch submit`) holds the
job's lease, `<output>/_lease`, created exclusively (a hard link of a complete temporary file on
file systems, a conditional PUT with If-None-Match on object stores) and renewed every quarter of
`batch.lease-timeout` seconds (default 60). Submitting a job whose lease is fresh (a second
resumer, or any job with the same output) raises JobRunningError at once, before anything is
changed: two drivers would run every missing partition twice over and overwrite each other's
state document, so the second one is told that the job runs, where, and since when. A lease not
renewed for `batch.lease-timeout` seconds, and still not renewed a quarter of that later, was
left by a dead driver: the next submit takes it over and resumes (when several try at once, an
exclusive `_lease.takeover-<token>` file lets exactly one win, which replaces the stale lease in one
step, so that the lease never goes missing for a newcomer to create; the others get JobRunningError).
A driver that finds its lease taken over stops its tasks and raises JobRunningError. Partition
tasks re-check the commit marker just before writing and do not commit while another driver holds
the lease, so tasks left running by a dead driver cannot write over the parts of the one that
took over. Lease ages are measured with the drivers' wall clocks: machines resuming the same
job must agree on the time to well within the timeout. Stores that ignore conditional PUTs
(some S3 look-alikes) cannot make the lease exclusive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import threading
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
    BlockLLMError,
    JobCancelledError,
    JobNotFoundError,
    NoCapacityError,
    OutputNotWritableError,
)
from ..types import SamplingParams
from .api import BatchSpec, check_prompt_column, prepare

log = logging.getLogger(__name__)

LEASE_TIMEOUT = 60.0  # seconds a lease lives without renewal (batch.lease-timeout)
RELAUNCHES = 3  # times one partition is run again after all block hosts of its model were lost


class JobRunningError(BlockLLMError, RuntimeError):
    """The job (or another job with the same output) is being run by another driver, which holds its lease."""


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

    @property
    def lease(self) -> str:
        return f"{self.root}/_lease"


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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _tmp_name(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.tmp-{uuid.uuid4().hex}"  # hidden: readers of the output skip it


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if _is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = _tmp_name(path)
        fs.pipe(tmp, data)
        os.replace(tmp, path)  # atomic on one file system
    else:
        fs.pipe(path, data)  # one PUT: an object store shows all of it or nothing


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write `path` whole unless it exists (then False), atomically against concurrent creators."""
    if _is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = _tmp_name(path)
        fs.pipe(tmp, data)
        try:
            os.link(tmp, path)  # fails if `path` exists; readers never see it half written
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")  # s3fs: a PUT with If-None-Match: *
    except FileExistsError:
        return False
    except OSError as e:
        if _precondition_failed(e):  # s3fs raises a failed If-None-Match as OSError(EINVAL)
            return False
        raise
    return True


def _precondition_failed(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is an object store's answer 412 Precondition Failed."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            meta = response.get("ResponseMetadata") or {}
            if error.get("Code") == "PreconditionFailed" or meta.get("HTTPStatusCode") == 412:
                return True
        if "PreconditionFailed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


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
    lease_token: str | None = None  # the lease of the driver that launched this task


def _lease_lost(job: _PartJob) -> bool:
    """Whether another driver holds the job's lease now (a missing lease is nobody's: commit is fine)."""
    if job.lease_token is None:
        return False
    held = _read_lease(job.out)
    return held is not None and held.get("token") != job.lease_token


def blockllm_batch_part(df, i: int, job: _PartJob) -> int:
    """A Dask task: complete input partition `i` and commit it as one part (skipped if committed)."""
    fs = job.out.fs
    if fs.exists(job.out.marker(i)):  # committed by an earlier run or attempt: never written twice
        return -1
    if fs.exists(job.out.cancel):
        raise JobCancelledError(f"batch job {job.job_id} was cancelled")
    if _lease_lost(job):
        raise JobRunningError(f"batch job {job.job_id} is run by another driver now; this task's driver lost the lease")
    lease_checked = time.monotonic()

    def cancelled() -> bool:
        nonlocal lease_checked
        if fs.exists(job.out.cancel):
            return True
        if time.monotonic() - lease_checked > 5.0:  # a dead driver's task stops once another took over
            lease_checked = time.monotonic()
            if _lease_lost(job):
                raise JobRunningError(f"batch job {job.job_id} is run by another driver now; this task's driver lost the lease")
        return False

    from . import api

    prompts = api.check_prompts(list(df[job.prompt_column]), list(df.index))
    texts = api.run_prompts(prompts, job.spec, cancelled=cancelled) if prompts else []
    if fs.exists(job.out.marker(i)):  # another attempt committed it meanwhile: keep its part
        return -1
    if _lease_lost(job):
        raise JobRunningError(f"batch job {job.job_id} is run by another driver now; partition {i} is left to it")
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


# ------------------------------------------------------------------------------ the lease
def _lease_timeout() -> float:
    return float(_config.get("batch.lease-timeout", LEASE_TIMEOUT))


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
        if isinstance(doc, dict):
            return doc
    except ValueError:
        pass
    try:  # not a lease document (written by hand?): judged by its age alone
        modified = fs.modified(path).timestamp()
    except Exception:
        modified = time.time()
    return {"token": None, "renewed": modified}


def _read_lease(out: _Output) -> dict | None:
    return _read_json(out.fs, out.lease)


def _fresh(held: dict, timeout: float) -> bool:
    """Whether a lease (or takeover) document was renewed within its holder's timeout."""
    return time.time() - float(held.get("renewed") or 0.0) < float(held.get("timeout") or timeout)


def _holder(held: dict) -> str:
    return (
        f"driver {held.get('host', '?')} pid {held.get('pid', '?')} holds the lease of job {held.get('job_id', '?')} "
        f"(renewed {time.time() - float(held.get('renewed') or 0.0):.1f} s ago; a lease not renewed for "
        f"{float(held.get('timeout') or 0.0):.0f} s is taken over)"
    )


class _Lease:
    """One driver's lease on a job's output, renewed on a thread while the job runs."""

    def __init__(self, out: _Output, job_id: str, timeout: float) -> None:
        self.out, self.job_id, self.timeout = out, job_id, timeout
        self.token = uuid.uuid4().hex
        self.acquired = time.time()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def document(self) -> bytes:
        return json.dumps({
            "token": self.token, "job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(),
            "acquired": self.acquired, "renewed": time.time(), "timeout": self.timeout,
        }).encode()

    def start(self) -> _Lease:
        self._thread = threading.Thread(target=self._renew, name=f"blockllm-lease-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                held = _read_lease(self.out)
                if held is None or held.get("token") != self.token:
                    log.warning("batch job %s lost its lease on %s: %s", self.job_id, self.out.url, _holder(held) if held else "the lease was removed")
                    self.lost.set()
                    return
                _atomic_write(self.out.fs, self.out.lease, self.document())
            except Exception:  # the store did not answer this time: try again at the next turn
                log.warning("could not renew the lease of batch job %s", self.job_id, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost.is_set():
            return
        try:
            held = _read_lease(self.out)
            if held is not None and held.get("token") == self.token:
                self.out.fs.rm(self.out.lease)
        except Exception:  # it goes stale by itself
            log.warning("could not release the lease of batch job %s", self.job_id, exc_info=True)


def _rm_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def _acquire_lease(out: _Output, job_id: str) -> _Lease:
    """The job's lease for this driver, taking over a stale one; JobRunningError while another holds it."""
    timeout = _lease_timeout()
    lease = _Lease(out, job_id, timeout)
    fs = out.fs
    for _ in range(5):
        if _create_exclusive(fs, out.lease, lease.document()):
            return lease.start()
        held = _read_lease(out)
        if held is None:
            continue  # released meanwhile
        if _fresh(held, timeout):
            raise JobRunningError(f"batch job {job_id} cannot start: {out.url} is being written; {_holder(held)}")
        # A live holder renews every timeout/4: give it one more such turn before calling it dead, so a
        # holder that is only slow (a starved machine, a slow store) keeps its lease.
        time.sleep(timeout / 4)
        again = _read_lease(out)
        if again is None or (again.get("token"), again.get("renewed")) != (held.get("token"), held.get("renewed")):
            continue  # released, renewed or taken over meanwhile: look again
        # Its driver died. Exactly one of those who found it stale takes it over.
        takeover = f"{out.lease}.takeover-{held.get('token') or 'unreadable'}"
        if not _create_exclusive(fs, takeover, lease.document()):
            other = _read_json(fs, takeover)
            if other is not None and _fresh(other, timeout):
                raise JobRunningError(f"batch job {job_id} cannot start: another driver ({other.get('host', '?')} pid {other.get('pid', '?')}) is taking over the stale lease of {out.url}")
            _rm_quietly(fs, takeover)  # left by a taker that died midway
            continue
        try:
            current = _read_lease(out)
            if current is not None and current.get("token") == held.get("token"):
                # Replaced in one step, never removed and re-created: in that gap a newcomer's plain
                # exclusive create would win the job without seeing (or logging) the dead driver.
                _atomic_write(fs, out.lease, lease.document())
                log.warning("batch job %s: took over a stale lease on %s (%s)", job_id, out.url, _holder(held))
                return lease.start()
            if current is None:
                continue  # released meanwhile: look again
        finally:
            _rm_quietly(fs, takeover)
        held = _read_lease(out) or held
        raise JobRunningError(f"batch job {job_id} cannot start: {out.url} is being written; {_holder(held)}")
    raise JobRunningError(f"batch job {job_id} cannot start: the lease of {out.url} kept changing hands")


def _remove_debris(out: _Output) -> None:
    """Temporary files of attempts killed mid-write (never part of the output), once the job is done."""
    fs = out.fs
    for folder in (out.root, f"{out.root}/_parts"):
        try:
            names = fs.ls(folder, detail=False)
        except FileNotFoundError:
            continue
        for name in names:
            if ".tmp-" in name.rstrip("/").rsplit("/", 1)[-1]:
                _rm_quietly(fs, name)


def job_status(job: str) -> dict[str, Any]:
    """The state document of a job, with its committed parts and rows counted now."""
    job_id, out = _locate(job)
    state = _read_state(out) or {"job_id": job_id, "status": "unknown"}
    done = _committed(out)
    state.update(parts_done=len(done), rows_done=sum(m["rows"] for m in done.values()), output=out.url)
    if state.get("status") == "running":
        held = _read_lease(out)
        if held is None or not _fresh(held, _lease_timeout()):
            state["status"] = "interrupted"  # its driver is gone: submit the job again to resume it
        elif out.fs.exists(out.cancel):
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
        held = _read_lease(out)  # no live driver to stop it (its lease is stale): cancelled at once
        state["status"] = "cancelling" if held is not None and _fresh(held, _lease_timeout()) else "cancelled"
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
    Raises JobCancelledError when cancelled (`cancel_job`), with the committed parts kept, and
    JobRunningError, before changing anything, while another driver runs the job (its lease is
    fresh); a worker lost meanwhile only re-runs its partitions (see the module docstring).
    """
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

    lease = _acquire_lease(out, job_id)  # JobRunningError while another driver runs this output
    try:
        return _run(
            bl, spec, lease, out, fs, ddf, input_url=input_url, in_opts=in_opts, fmt=fmt, model=model, tenant=tenant,
            api_key=api_key, prompt_column=prompt_column, output_column=output_column, sampling=sampling,
            on_part=on_part, progress=progress,
        )
    finally:
        lease.release()


def _place_again(bl: Any, model: str, *, tenant: str | None, api_key: str | None, sampling: SamplingParams) -> BatchSpec:
    """A fresh spec after every block host of `model` the job knew was lost: the model placed again
    on the live workers if none has it, with everything else loaded now (no placement dropped)."""
    for attempt in range(3):
        try:
            loaded = bl.loaded()
            if not any(model in models for models in loaded.values()):
                keep = set().union(*loaded.values()) if loaded else set()
                if bl.plan is not None:
                    keep |= {m for models in bl.plan.assignments.values() for m in models}
                bl.place(sorted(keep | {model}))
            return prepare(bl, model, tenant=tenant, api_key=api_key, sampling=sampling)[1]
        except OSError:  # a worker that has just joined (a nanny's restart) may not answer yet
            if attempt == 2:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _run(
    bl: Any, spec: BatchSpec, lease: _Lease, out: _Output, fs: fsspec.AbstractFileSystem, ddf: Any, *, input_url: str,
    in_opts: dict, fmt: str, model: str, tenant: str | None, api_key: str | None, prompt_column: str, output_column: str,
    sampling: SamplingParams, on_part: Callable[[int, int], None] | None, progress: bool,
) -> dict[str, Any]:
    """submit_job once it holds the lease: the state document, the partition tasks, the end state."""
    import dask
    import distributed

    job_id = lease.job_id
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

    job = _PartJob(job_id, out, prompt_column, output_column, spec, lease.token)
    parts = ddf.to_delayed()
    retries = int(_config.get("batch.partition-retries", 2))
    index: dict[str, int] = {}
    pending: set = set()

    def launch(todo: list[int], job: _PartJob) -> list:
        tasks = [
            dask.delayed(blockllm_batch_part, pure=False)(parts[i], i, job, dask_key_name=f"blockllm-batch-{job_id}-{i:05d}-{uuid.uuid4().hex[:6]}")
            for i in todo
        ]
        futures = bl.dask.compute(tasks, retries=retries) if tasks else []
        index.update({f.key: i for f, i in zip(futures, todo, strict=True)})
        pending.update(futures)
        return futures

    futures = launch([i for i in range(ddf.npartitions) if i not in _committed(out)], job)
    bar = None
    if progress and futures:
        bar = threading.Thread(target=distributed.progress, args=(futures,), kwargs={"notebook": False}, daemon=True)
        bar.start()
    relaunched: dict[int, int] = {}
    error: BaseException | None = None
    try:
        while pending:
            try:
                distributed.wait(list(pending), timeout=1.0, return_when="FIRST_COMPLETED")
            except distributed.TimeoutError:
                pass
            hostless = []
            for f in [f for f in pending if f.done()]:
                pending.discard(f)
                if f.status == "finished":
                    rows = f.result()
                    if on_part is not None and rows >= 0:
                        on_part(index[f.key], rows)
                elif f.status == "error":
                    exc = f.exception()
                    if isinstance(exc, NoCapacityError) and relaunched.get(index[f.key], 0) < RELAUNCHES:
                        hostless.append(index[f.key])  # every block host it knew is gone
                    elif error is None:
                        error = exc
            if lease.lost.is_set() and error is None:
                error = JobRunningError(f"batch job {job_id} lost its lease on {out.url} to another driver; that driver runs it now")
            if hostless and error is None and not fs.exists(out.cancel):
                log.warning("batch job %s: no block host of %s left for partitions %s; placing it again", job_id, model, hostless)
                job = dataclasses.replace(job, spec=_place_again(bl, model, tenant=tenant, api_key=api_key, sampling=sampling))
                for i in hostless:
                    relaunched[i] = relaunched.get(i, 0) + 1
                launch(hostless, job)
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
    if lease.lost.is_set() or isinstance(error, JobRunningError):  # the state document is the new driver's now
        raise error if error is not None else JobRunningError(f"batch job {job_id} lost its lease on {out.url} to another driver")
    cancelled = fs.exists(out.cancel) or isinstance(error, JobCancelledError)
    done = _committed(out)
    state = _read_state(out) or state
    if cancelled:
        state["status"] = "cancelled"
    elif error is not None:
        state.update(status="failed", error=f"{type(error).__name__}: {error}")
    else:
        state["status"] = "done" if len(done) == ddf.npartitions else "incomplete"
    if state["status"] == "done":
        _remove_debris(out)
    _write_state(out, state)
    if cancelled:
        raise JobCancelledError(f"batch job {job_id} was cancelled with {len(done)}/{ddf.npartitions} parts written; submit it again to resume")
    if error is not None:
        raise error
    return job_status(job_id)

__all__ = ["JobRunningError", "cancel_job", "job_status", "list_jobs", "read_output", "submit_job"]
