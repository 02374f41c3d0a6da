"""The periodic runner, and the `jobs` / `graph` commands."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from synthetic_zoo import synthetic_zoo
from typer.testing import CliRunner

from graphs import ZooLock, load_graph
from jobs import parse_every, run_equivalence, run_every
from jobs.cli import graph_app, jobs_app
from zoo_store import Zoo


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h", 3600), ("15m", 900), ("90s", 90), (90, 90), ("1d", 86400), ("0.5s", 0.5)],
)
def test_parse_every(text, seconds):
    assert parse_every(text) == seconds


@pytest.mark.parametrize("bad", ["0s", "-1h", "soon", 0])
def test_parse_every_rejects_bad_intervals(bad):
    with pytest.raises(ValueError):
        parse_every(bad)


def test_runs_every_interval_for_n_ticks():
    stamps = []
    report = run_every(lambda: stamps.append(time.monotonic()) or len(stamps), 0.15, times=3)
    assert (report.ticks, report.runs, report.skipped, report.failed) == (3, 3, 0, 0)
    assert report.results == [1, 2, 3] and len(report.durations) == 3
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert all(g >= 0.1 for g in gaps)


def test_a_tick_during_a_running_run_is_skipped():
    running = []

    def slow():
        running.append(1)
        assert len(running) == 1, "runs overlapped"
        time.sleep(0.7)
        running.pop()

    report = run_every(slow, 0.2, times=3)  # ticks at 0 (runs), 0.2 and 0.4 (previous still going)
    assert (report.runs, report.skipped) == (1, 2)


def test_a_failing_run_does_not_stop_the_schedule():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return "ok"

    report = run_every(flaky, 0.05, times=2)
    assert (report.runs, report.failed, report.results) == (2, 1, ["ok"])


def test_stop_event_ends_an_endless_schedule():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    report = run_every(lambda: None, 0.05, stop=stop)
    assert report.runs >= 2 and stop.is_set()


@pytest.fixture
def zoo() -> Zoo:
    z = Zoo(f"memory://sched-{uuid.uuid4().hex}")
    synthetic_zoo(z, bases=2, tunes_per_base=1, layers=2, tuned_layers=1)
    return z


def test_scheduled_equivalence_runs_incrementally_and_skips_when_locked(zoo):
    report = run_every(lambda: run_equivalence(zoo, if_locked="skip"), 1.0, times=2)
    first, second = report.results
    assert first.status == second.status == "done"
    assert first.new_blocks > 0 and second.new_blocks == 0 and second.compared == 0
    with ZooLock(zoo, "equivalence"):  # another process's run holds the job lock
        held = run_every(lambda: run_equivalence(zoo, if_locked="skip"), 0.05, times=1)
    assert held.results[0].status == "skipped"


def test_cli_equivalence_schedule_and_graph_show(zoo):
    runner = CliRunner()
    result = runner.invoke(jobs_app, ["equivalence", "--zoo", zoo.url, "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "equivalence run" in result.output and "equivalences found" in result.output
    result = runner.invoke(
        jobs_app, ["schedule", "--every", "1s", "--times", "2", "--zoo", zoo.url, "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "2 run(s), 0 tick(s) skipped" in result.output and "0 new blocks" in result.output
    result = runner.invoke(graph_app, ["show", "--zoo", zoo.url])
    assert result.exit_code == 0, result.output
    assert (
        "block graph" in result.output
        and "equivalences" in result.output
        and "v1*" in result.output
    )
    result = runner.invoke(graph_app, ["rollback", "1", "--zoo", zoo.url])
    assert result.exit_code == 0 and "as v2" in result.output
    assert load_graph(zoo).version == 2


def test_cli_equivalence_on_a_local_cluster(zoo):
    result = CliRunner().invoke(
        jobs_app, ["equivalence", "--zoo", zoo.url, "--workers", "1", "--full"]
    )
    assert result.exit_code == 0, result.output
    assert "(full)" in result.output


def test_cli_errors_are_short(tmp_path):
    runner = CliRunner()
    result = runner.invoke(graph_app, ["show", "--zoo", (tmp_path / "empty").as_uri()])
    assert result.exit_code == 1 and "blockllm jobs equivalence" in result.output
    result = runner.invoke(
        jobs_app, ["schedule", "--every", "never", "--zoo", (tmp_path / "z").as_uri()]
    )
    assert result.exit_code == 1 and "positive duration" in result.output
