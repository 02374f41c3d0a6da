"""Run a job periodically (`blockllm jobs schedule --every 1h`): a tick whose previous run is still going is skipped.

The schedule is one process's loop. Runs of the same job from other processes (another schedule, a
cron entry, a manual `blockllm jobs equivalence`) are kept apart by the job's own lock in the zoo.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_timedelta

log = logging.getLogger(__name__)


def parse_every(every: float | str) -> float:
    """Seconds from 90, "90s", "15m", "1h", "1d" (Dask's timedelta syntax); must be > 0."""
    try:
        seconds = parse_timedelta(every, default="seconds")
    except (KeyError, ValueError, TypeError):
        seconds = None
    if seconds is None or not seconds > 0:
        raise ValueError(
            f"a schedule interval must be a positive duration such as '1h', not {every!r}"
        )
    return float(seconds)


@dataclass
class ScheduleReport:
    ticks: int = 0
    runs: int = 0  # runs started
    skipped: int = 0  # ticks that found the previous run still going
    failed: int = 0  # runs that raised (logged; the schedule goes on)
    durations: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)


def run_every(
    job: Callable[[], Any],
    every: float | str,
    *,
    times: int | None = None,
    stop: threading.Event | None = None,
    on_result: Callable[[Any, float], None] | None = None,
) -> ScheduleReport:
    """Call `job()` at once and then every `every` seconds, for `times` ticks (None: until `stop`).

    Each run goes in a thread; a tick that finds the previous run still going is skipped (counted,
    logged), so runs never overlap and a slow run delays nothing but itself. Returns when the last
    tick's run has finished.
    """
    interval = parse_every(every)
    if times is not None and times < 1:
        raise ValueError(f"times must be >= 1 (or None for ever), not {times}")
    stop = stop or threading.Event()
    report = ScheduleReport()
    lock = threading.Lock()
    current: threading.Thread | None = None

    def one_run() -> None:
        t0 = time.perf_counter()
        try:
            result = job()
        except Exception:
            log.exception("scheduled run failed")
            with lock:
                report.failed += 1
            return
        took = time.perf_counter() - t0
        log.info("scheduled run finished in %.2f s", took)
        with lock:
            report.durations.append(took)
            report.results.append(result)
        if on_result is not None:
            on_result(result, took)

    start = time.monotonic()
    while not stop.is_set() and (times is None or report.ticks < times):
        if current is not None and current.is_alive():
            report.skipped += 1
            log.warning("tick %d skipped: the previous run is still going", report.ticks)
        else:
            current = threading.Thread(
                target=one_run, name=f"scheduled-run-{report.ticks}", daemon=True
            )
            current.start()
            report.runs += 1
        report.ticks += 1
        if times is not None and report.ticks >= times:
            break
        next_tick = start + report.ticks * interval
        stop.wait(max(0.0, next_tick - time.monotonic()))
    if current is not None:
        current.join()
    return report


__all__ = ["ScheduleReport", "parse_every", "run_every"]
