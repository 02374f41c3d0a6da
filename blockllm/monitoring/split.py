"""Prometheus series of chains split across workers: hand-offs, their bytes, speculation.

A worker whose block host drives split chains (their first segment is here) or serves a later
segment counts what crosses its segment boundaries (serving/handoff.py `HandoffCounters`) and its
driver counts its steps and speculative guesses. `split_view` reads them (cheap, no engine call),
the worker's `/metrics` exports them as `blockllm_split_*` counters, and the scheduler's as
`blockllm_cluster_split_*` gauges summed over the workers as of the monitor's last poll.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from ..metrics import ViewCollector, _families, _merge_families

log = logging.getLogger(__name__)

# per model: (series name, field of HandoffCounters, help)
_PER_MODEL = (
    ("split_handoffs_sent", "handoffs_sent", "Hand-offs sent to the next segment's worker, by model: one request's rows of one step."),
    ("split_handoffs_received", "handoffs_received", "Hand-offs received from the previous segment's worker, by model."),
    ("split_handoff_rows_sent", "rows_sent", "Rows (token positions) of hidden states sent to the next segment's worker, by model."),
    ("split_handoff_rows_received", "rows_received", "Rows of hidden states received from the previous segment's worker, by model."),
    ("split_handoff_bytes_sent", "bytes_sent", "Hidden-state bytes sent to the next segment's worker, by model."),
    ("split_handoff_bytes_received", "bytes_received", "Hidden-state bytes received from the previous segment's worker, by model."),
)
# per worker: (series name, key of split_view, help)
_PER_WORKER = (
    ("split_handoff_messages_sent", "messages_sent", "Hand-off messages sent (one per split-driver step and next worker, carrying every request's rows)."),
    ("split_handoff_messages_received", "messages_received", "Hand-off messages received from a previous segment's worker."),
    ("split_handoff_failures", "messages_failed", "Hand-off messages that got no reply (the next worker refused them or was lost)."),
    ("split_steps", "steps", "Steps of the split-chain driver (first segments run here, then the hand-off)."),
    ("split_speculation_guesses", "guesses", "Speculative first-segment runs on a guessed next token, made while the next worker computed."),
    ("split_speculation_hits", "hits", "Speculative runs whose guess was right: their rows were sent at once."),
    ("split_speculation_misses", "misses", "Speculative runs whose guess was wrong: the rows were recomputed."),
    ("split_wait_seconds", "wait_seconds", "Seconds the split-chain driver waited for the next segment's replies."),
)


def split_view(split: Any) -> dict[str, Any] | None:
    """A worker's split-chain figures (plain data) from its `handoff.SplitHost`, or None."""
    if split is None:
        return None
    driver = split.driver
    counters = split.counters.snapshot()
    return {
        **{k: counters[k] for k in ("messages_sent", "messages_received", "messages_failed")},
        "models": counters["models"],
        "steps": driver.steps,
        "guesses": driver.guesses,
        "hits": driver.hits,
        "misses": driver.misses,
        "wait_seconds": float(driver.wait_seconds),
        "speculate": bool(driver.speculate),
    }


def split_metric_families(view: Mapping[str, Any]) -> Iterator[Any]:
    """`blockllm_split_*` counters of one worker's view (nothing where it has no split part)."""
    s = view.get("split")
    if not s:
        return
    c, _, _ = _families()
    for name, key, doc in _PER_MODEL:
        fam = c(name, doc, ("model",))
        for model, counts in sorted((s.get("models") or {}).items()):
            fam.add_metric([model], counts.get(key, 0))
        yield fam
    for name, key, doc in _PER_WORKER:
        fam = c(name, doc)
        fam.add_metric([], s.get(key, 0) or 0)
        yield fam


class SplitWorkerCollector(ViewCollector):
    """The worker side: `blockllm_split_*` for the block hosts of this process, read at scrape time."""

    what = "blockllm split-chain metrics"

    def families(self, views: list[Mapping[str, Any]]) -> Iterator[Any]:
        yield from _merge_families(split_metric_families(v) for v in views)


def split_totals(workers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Split-chain figures summed over workers' views: {key: n} and per model {model: {field: n}}."""
    totals: Counter[str] = Counter()
    models: dict[str, Counter[str]] = {}
    for view in workers.values():
        s = view.get("split") if view.get("host") else None
        if not s:
            continue
        for _, key, _ in _PER_WORKER:
            totals[key] += s.get(key, 0) or 0
        for model, counts in (s.get("models") or {}).items():
            models.setdefault(model, Counter()).update({k: v for k, v in counts.items() if isinstance(v, (int, float))})
    return {**dict(totals), "models": {m: dict(c) for m, c in models.items()}}


class SplitSchedulerCollector(ViewCollector):
    """The scheduler side: `blockllm_cluster_split_*` gauges from the monitor's cluster view."""

    what = "blockllm split-chain scheduler metrics"

    def families(self, view: Mapping[str, Any]) -> Iterator[Any]:
        split = view.get("split")
        if not split:
            return
        _, g, _ = _families()
        for name, key, doc in _PER_MODEL:
            fam = g(f"cluster_{name}", f"{doc} Summed over all workers as of the monitor's last poll.", ("model",))
            for model, counts in sorted((split.get("models") or {}).items()):
                fam.add_metric([model], counts.get(key, 0))
            yield fam
        for name, key, doc in _PER_WORKER:
            fam = g(f"cluster_{name}", f"{doc} Summed over all workers as of the monitor's last poll.")
            fam.add_metric([], split.get(key, 0) or 0)
            yield fam
