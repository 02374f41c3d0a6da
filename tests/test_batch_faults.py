"""Batch jobs under faults, on a real LocalCluster of worker processes: a worker SIGKILLed mid-job
(the only host of the job's model), two drivers resuming the same interrupted job at once, a
driver SIGKILLed mid-job whose stale lease is taken over by exactly one of two resumers, a stalled
driver whose lease was taken over, and the lease itself raced for on file:// and SeaweedFS s3://.

Rows are checked exactly once three ways: the job's committed parts (read_output), one part file
and one marker per partition, and the output folder read by dask.dataframe.read_parquet."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import dask
import dask.dataframe as dd
import pandas as pd
import pytest
from clusters import tenant_clients

from blockllm.batch import JobRunningError, cancel_job, job_status, read_output, submit_job
from blockllm.exceptions import JobCancelledError
from blockllm.types import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "acme/tiny-full"
SAMPLING = SamplingParams(max_new_tokens=8, ignore_eos=True)
TEMPLATES = ("next number after {} is ->", "{} + 3 =", "reverse: {} a b ->", "uppercase: {} c a t ->", "double {} ->")
LEASE_S = 3.0  # batch.lease-timeout in these tests (60 s by default)


@pytest.fixture(scope="module")
def acme(tiny_zoo):
    with tenant_clients(tiny_zoo, 2, tenants=("acme",)) as clients:
        client = clients["acme"]
        client.dask.wait_for_workers(2, timeout=120)
        yield client


@pytest.fixture(autouse=True)
def config(tmp_path):
    with dask.config.set({"blockllm.batch.jobs-dir": str(tmp_path / "jobs"), "blockllm.batch.lease-timeout": LEASE_S}):
        yield


def write_input(folder, parts: int, rows: int) -> str:
    folder.mkdir()
    for f in range(parts):
        ids = range(rows * f, rows * (f + 1))
        pd.DataFrame({"id": ids, "prompt": [TEMPLATES[i % len(TEMPLATES)].format(i) for i in ids]}).to_parquet(folder / f"part{f:02d}.parquet")
    return f"{folder}/*.parquet"


def completions(job: str) -> dict[int, str]:
    out = read_output(job)
    assert out["id"].is_unique
    return dict(zip(out["id"], out["completion"], strict=True))


def markers(out) -> dict[str, str]:
    return {p.name: p.read_text() for p in (out / "_parts").glob("*.json")}


def check_output(out, parts: int, rows: int) -> None:
    """One part file and one marker per partition, no temporary debris, and the folder read by
    Dask itself holds every row exactly once."""
    assert len(list(out.glob("part-*.parquet"))) == parts and len(markers(out)) == parts
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or "takeover" in p.name]
    assert not (out / "_lease").exists()  # released at the end
    assert sorted(dd.read_parquet(str(out)).compute()["id"]) == list(range(parts * rows))


def test_a_worker_killed_mid_job_loses_no_row_and_changes_no_output(acme, tmp_path, caplog):
    plan = acme.place([MODEL, "platform/tiny-base"])  # the job's model on one worker only: its loss needs a re-placement
    [victim] = plan.workers_for(MODEL)
    src = write_input(tmp_path / "in", parts=16, rows=4)
    t0 = time.monotonic()
    submit_job(src, MODEL, client=acme, sampling=SAMPLING, job_id="clean", output=str(tmp_path / "clean"))
    clean_s = time.monotonic() - t0
    reference = completions("clean")

    killed: dict[str, int] = {}
    seen: list[int] = []

    def kill_victim(i: int, rows: int) -> None:  # on a committed part: SIGKILL the victim, best while it runs parts
        seen.append(i)
        if killed:
            return
        running = [k for k in acme.dask.processing([victim]).get(victim, ()) if "blockllm-batch" in str(k)]
        if running or len(seen) >= 4:
            killed.update(pid=acme.dask.run(os.getpid, workers=[victim])[victim], running=len(running), parts_done=job_status("faulted")["parts_done"])
            os.kill(killed["pid"], signal.SIGKILL)

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="blockllm.batch.jobs"):
        state = submit_job(src, MODEL, client=acme, sampling=SAMPLING, job_id="faulted", output=str(tmp_path / "faulted"), on_part=kill_victim)
    fault_s = time.monotonic() - t0
    print(f"\nworker killed mid-job: {killed['running']} of its parts running, {killed['parts_done']}/16 committed at the kill; "
          f"{state['status']} {state['parts_done']}/16 parts in {fault_s:.1f} s vs {clean_s:.1f} s clean")
    assert 0 < killed["parts_done"] < 16
    assert state["status"] == "done" and state["parts_done"] == 16 and state["rows_done"] == 64
    assert "placing it again" in caplog.text  # the model's only host was lost: the job placed it again
    assert victim not in acme.workers and any(MODEL in models for models in acme.loaded().values())
    got = completions("faulted")
    assert sorted(got) == list(range(64))  # every row exactly once
    assert got == reference  # greedy: the same text as the run without the fault
    check_output(tmp_path / "faulted", 16, 4)


def _resume_both(resume, hold_winner: threading.Event) -> dict[str, object]:
    """Two threads resume at the same moment; returns {name: final state or the exception}."""
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        barrier.wait()
        try:
            results[name] = resume(name)
        except Exception as e:  # the loser's JobRunningError, or a real failure the test reports
            results[name] = e
            hold_winner.set()

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return results


def test_two_resumers_of_one_cancelled_job_one_runs_it_and_the_other_is_refused(acme, tmp_path):
    acme.place([MODEL])
    src = write_input(tmp_path / "in", parts=12, rows=4)
    out = tmp_path / "out"
    args = dict(client=acme, sampling=SAMPLING, job_id="twice", output=str(out))
    first: list[int] = []

    def cancel_after_first(i: int, rows: int) -> None:
        first.append(i)
        if len(first) == 1:
            cancel_job("twice")

    with pytest.raises(JobCancelledError):
        submit_job(src, MODEL, on_part=cancel_after_first, **args)
    before = markers(out)
    assert 1 <= len(before) < 12 and job_status("twice")["status"] == "cancelled"

    ran: dict[str, list[int]] = {"a": [], "b": []}
    loser_done = threading.Event()
    statuses: list[str] = []

    def on_part(name: str, i: int) -> None:
        ran[name].append(i)
        if len(ran[name]) == 1:  # the winner holds on until the other resumer has its answer: they overlap
            loser_done.wait(60)
            statuses.append(job_status("twice")["status"])

    t0 = time.monotonic()
    results = _resume_both(lambda n: submit_job(src, MODEL, on_part=lambda i, r: on_part(n, i), **args), loser_done)
    took = time.monotonic() - t0
    errors = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    states = {n: r for n, r in results.items() if not isinstance(r, BaseException)}
    print(f"\ntwo resumers: {sorted(states)} ran it ({len(before)} parts done before, {sum(map(len, ran.values()))} run now), "
          f"{sorted(errors)} refused: {errors and next(iter(errors.values()))!r}; {took:.1f} s")
    assert len(states) == 1 and len(errors) == 1
    [(winner, state)] = states.items()
    [(loser, error)] = errors.items()
    assert isinstance(error, JobRunningError) and f"pid {os.getpid()}" in str(error)
    assert ran[loser] == [] and sorted(ran[winner]) == sorted(set(range(12)) - {int(n[5:10]) for n in before})  # nothing run twice
    assert statuses == ["running"]  # while the winner ran, and after the loser was refused
    assert state["status"] == "done" and state["parts_done"] == 12 and state["rows_done"] == 48 and state["runs"] == 2  # the loser changed nothing
    after = markers(out)
    assert {k: after[k] for k in before} == before  # parts committed before the resume were not written again
    got = completions("twice")
    assert sorted(got) == list(range(48))  # every row exactly once
    ids = sorted(got)
    prompts = [TEMPLATES[i % len(TEMPLATES)].format(i) for i in ids]
    assert [got[i] for i in ids] == [c.text for c in acme.generate(prompts, MODEL, SAMPLING)]  # the online client's text
    check_output(out, 12, 4)


DRIVER = textwrap.dedent("""
    import sys, distributed
    from blockllm.client import Client
    from blockllm.batch import submit_job
    from blockllm.types import SamplingParams
    scheduler, key, zoo, src, out = sys.argv[1:]
    dask = distributed.Client(scheduler)
    client = Client(dask, api_key=key, zoo=zoo)
    submit_job(src, "acme/tiny-full", client=client, job_id="orphan", output=out, sampling=SamplingParams(max_new_tokens=16, ignore_eos=True))
    print("the driver finished before it was killed", flush=True)
""")


def test_a_killed_drivers_stale_lease_is_taken_over_by_exactly_one_of_two_resumers(acme, tmp_path, caplog):
    acme.place([MODEL])
    sampling = SamplingParams(max_new_tokens=16, ignore_eos=True)
    src = write_input(tmp_path / "in", parts=24, rows=4)
    out = tmp_path / "out"
    env = dict(os.environ, DASK_BLOCKLLM__BATCH__LEASE_TIMEOUT=str(LEASE_S), DASK_BLOCKLLM__BATCH__JOBS_DIR=str(tmp_path / "jobs"))
    log_file = open(tmp_path / "driver.log", "w")  # noqa: SIM115 (closed below)
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, acme.dask.scheduler.address, acme.api_key, acme.zoo_url, src, str(out)],
        env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and driver.poll() is None and not list((out / "_parts").glob("*.json")):
            time.sleep(0.01)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)  # the driver dies holding the lease; its tasks may run on
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
        log_file.close()
    lease = json.loads((out / "_lease").read_text())
    assert lease["pid"] == driver.pid

    with pytest.raises(JobRunningError, match=f"pid {driver.pid}"):  # fresh: its driver may be alive, for all we know
        submit_job(src, MODEL, client=acme, sampling=sampling, job_id="orphan", output=str(out))
    assert job_status("orphan")["status"] == "running"
    deadline = time.monotonic() + 30
    while job_status("orphan")["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_status("orphan")["status"] == "interrupted"  # the lease went stale: the driver is gone
    assert cancel_job("orphan")["status"] == "cancelled"  # no driver to wait for; a resume clears it
    before = markers(out)
    assert 1 <= len(before) < 24

    ran: dict[str, list[int]] = {"a": [], "b": []}
    loser_done = threading.Event()

    def on_part(name: str, i: int) -> None:
        ran[name].append(i)
        if len(ran[name]) == 1:
            loser_done.wait(60)

    with caplog.at_level(logging.WARNING, logger="blockllm.batch.jobs"):
        results = _resume_both(lambda n: submit_job(src, MODEL, client=acme, sampling=sampling, job_id="orphan", output=str(out), on_part=lambda i, r: on_part(n, i)), loser_done)
    errors = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    states = {n: r for n, r in results.items() if not isinstance(r, BaseException)}
    print(f"\nstale lease: {len(before)}/24 parts committed by the killed driver; {sorted(states)} took over, {sorted(errors)} refused: {errors and next(iter(errors.values()))!r}")
    assert len(states) == 1 and len(errors) == 1 and isinstance(next(iter(errors.values())), JobRunningError)
    assert "took over a stale lease" in caplog.text and f"pid {driver.pid}" in caplog.text
    [(winner, state)] = states.items()
    assert not set(ran[winner]) & {int(n[5:10]) for n in before}  # nothing committed before was run again
    assert state["status"] == "done" and state["parts_done"] == 24 and state["rows_done"] == 96
    after = markers(out)
    assert {k: after[k] for k in before} == before
    got = completions("orphan")
    assert sorted(got) == list(range(96))  # every row exactly once
    check_output(out, 24, 4)
    reference = submit_job(src, MODEL, client=acme, sampling=sampling, job_id="orphan-clean", output=str(tmp_path / "clean"))
    assert reference["status"] == "done" and completions("orphan-clean") == got  # greedy: as a run never interrupted


@pytest.mark.parametrize("store", ["file", "s3"])
def test_eight_drivers_racing_for_a_free_or_a_stale_lease_exactly_one_wins(store, tmp_path, request):
    """The lease itself, on a local file system and on a real S3 server (SeaweedFS honours
    If-None-Match): 8 threads acquire at once, first a free lease, then one a dead driver left."""
    from blockllm.batch.jobs import _acquire_lease, _atomic_write, _Output

    if store == "s3":
        seaweed, bucket = request.getfixturevalue("seaweed"), request.getfixturevalue("s3_bucket")
        out = _Output(f"s3://{bucket}/lease-race-{os.getpid()}-{time.monotonic_ns()}", seaweed.storage_options, "parquet")
    else:
        out = _Output((tmp_path / "out").as_uri(), {}, "parquet")
    out.fs.makedirs(out.root, exist_ok=True)
    for round_ in ("free", "stale"):
        if round_ == "stale":
            dead = {"token": "dead", "job_id": "race", "host": "gone", "pid": 1, "renewed": time.time() - 10 * LEASE_S, "timeout": LEASE_S}
            _atomic_write(out.fs, out.lease, json.dumps(dead).encode())
        barrier = threading.Barrier(8)
        got: list[object] = []

        def acquire(barrier: threading.Barrier = barrier, got: list[object] = got) -> None:
            barrier.wait()
            try:
                got.append(_acquire_lease(out, "race"))
            except JobRunningError as e:
                got.append(e)

        threads = [threading.Thread(target=acquire) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [g for g in got if not isinstance(g, BaseException)]
        assert len(got) == 8 and len(winners) == 1, (round_, got)
        assert json.loads(out.fs.cat_file(out.lease))["token"] == winners[0].token
        winners[0].release()
        assert not out.fs.exists(out.lease)
        assert not [p for p in out.fs.ls(out.root, detail=False) if "takeover" in p or ".tmp-" in p]


def test_a_slow_holder_that_renews_within_one_more_turn_keeps_its_lease(tmp_path):
    """A lease seen past its timeout is taken over only if it stays unrenewed for one more renewal
    turn (timeout/4): a live holder that was merely slow (seen on a starved CI box) keeps it."""
    from blockllm.batch.jobs import _acquire_lease, _atomic_write, _Output

    out = _Output((tmp_path / "out").as_uri(), {}, "parquet")
    out.fs.makedirs(out.root, exist_ok=True)

    def lease(renewed: float) -> bytes:
        return json.dumps({"token": "slow", "job_id": "j", "host": "h", "pid": 1, "renewed": renewed, "timeout": LEASE_S}).encode()

    _atomic_write(out.fs, out.lease, lease(time.time() - 1.5 * LEASE_S))  # looks dead
    renewer = threading.Timer(LEASE_S / 10, lambda: _atomic_write(out.fs, out.lease, lease(time.time())))  # but renews
    renewer.start()
    with pytest.raises(JobRunningError, match="being written"):
        _acquire_lease(out, "j")
    renewer.join()
    assert json.loads(out.fs.cat_file(out.lease))["token"] == "slow"

    _atomic_write(out.fs, out.lease, lease(time.time() - 1.5 * LEASE_S))  # dead for real: taken over
    taker = _acquire_lease(out, "j")
    assert json.loads(out.fs.cat_file(out.lease))["token"] == taker.token
    taker.release()


def test_a_takeover_never_leaves_the_lease_missing_for_a_newcomer(tmp_path, caplog):
    """A driver arriving at any moment of a takeover finds a lease it cannot create. Were the stale
    lease removed and then created again, a newcomer's plain create could win in that gap, taking
    the job without the takeover's warning while the taker is refused (a CI run failed so)."""
    from blockllm.batch.jobs import _acquire_lease, _atomic_write, _create_exclusive, _Output

    url = (tmp_path / "out").as_uri()
    real_fs = _Output(url, {}, "parquet").fs
    lease_path = _Output(url, {}, "parquet").lease
    real_fs.makedirs(lease_path.rsplit("/", 1)[0], exist_ok=True)
    dead = {"token": "dead", "job_id": "j", "host": "gone", "pid": 4242, "renewed": time.time() - 10 * LEASE_S, "timeout": LEASE_S}
    _atomic_write(real_fs, lease_path, json.dumps(dead).encode())
    watching = threading.Event()
    watching.set()
    newcomers: list[str] = []

    class Watched:
        """The taker's file system: after each call it makes, a newcomer tries to create the lease."""

        def __getattr__(self, name: str):
            attr = getattr(real_fs, name)
            if not callable(attr):
                return attr

            def call(*args, **kwargs):
                try:
                    return attr(*args, **kwargs)
                finally:
                    if watching.is_set() and _create_exclusive(real_fs, lease_path, b'{"token": "newcomer"}'):
                        newcomers.append(name)

            return call

    class WatchedOutput(_Output):
        @property
        def fs(self):
            return Watched()

    with caplog.at_level(logging.WARNING, logger="blockllm.batch.jobs"):
        taker = _acquire_lease(WatchedOutput(url, {}, "parquet"), "j")
    watching.clear()
    try:
        assert newcomers == []  # the lease was there whenever a newcomer looked
        assert json.loads(real_fs.cat_file(lease_path))["token"] == taker.token
        assert "took over a stale lease" in caplog.text and "pid 4242" in caplog.text
    finally:
        taker.release()
    assert not real_fs.exists(lease_path)


def test_a_task_of_a_driver_that_lost_its_lease_commits_nothing(tmp_path):
    """A partition task left running by a driver whose lease another driver took over raises
    JobRunningError instead of writing its part; a task of the holder (or with no lease) would run."""
    from blockllm.batch.api import BatchSpec
    from blockllm.batch.jobs import _acquire_lease, _Output, _PartJob, blockllm_batch_part

    out = _Output((tmp_path / "out").as_uri(), {}, "parquet")
    lease = _acquire_lease(out, "zombie")
    try:
        spec = BatchSpec(MODEL, None, SAMPLING, (), 4)
        df = pd.DataFrame({"prompt": ["3 + 4 ="]})
        with pytest.raises(JobRunningError, match="another driver"):
            blockllm_batch_part(df, 0, _PartJob("zombie", out, "prompt", "completion", spec, lease_token="an-old-lease"))
        assert not list((tmp_path / "out").glob("part-*")) and not (tmp_path / "out" / "_parts").exists()
    finally:
        lease.release()


def test_a_driver_whose_lease_is_taken_over_stops_and_leaves_the_job_to_the_new_holder(acme, tmp_path):
    """A driver stalled past its lease (a long GC pause, a suspended laptop) finds it taken over:
    it stops its tasks, raises JobRunningError and leaves the state and the lease to the new holder."""
    acme.place([MODEL])
    src = write_input(tmp_path / "in", parts=16, rows=4)
    out = tmp_path / "out"
    args = dict(client=acme, sampling=SAMPLING, job_id="stolen", output=str(out))
    other = {"token": "another-driver", "job_id": "stolen", "host": "elsewhere", "pid": 4242, "timeout": 600.0}

    def take_over(i: int, rows: int) -> None:
        if (out / "_lease").read_text().find("another-driver") < 0:
            (out / "_lease").write_text(json.dumps(dict(other, renewed=time.time())))  # as a taker would
            time.sleep(LEASE_S / 2)  # the driver's renewal (every LEASE_S / 4) sees it meanwhile

    with pytest.raises(JobRunningError, match="lost its lease|another driver"):
        submit_job(src, MODEL, on_part=take_over, **args)
    assert json.loads((out / "_lease").read_text())["token"] == "another-driver"  # left alone
    assert json.loads((out / "_job.json").read_text())["status"] == "running"  # the new holder's to write
    with pytest.raises(JobRunningError, match="pid 4242"):
        submit_job(src, MODEL, **args)

    (out / "_lease").write_text(json.dumps(dict(other, renewed=time.time() - 1000)))  # that driver died too
    state = submit_job(src, MODEL, **args)
    assert state["status"] == "done" and state["rows_done"] == 64
    assert sorted(completions("stolen")) == list(range(64))
    check_output(out, 16, 4)
