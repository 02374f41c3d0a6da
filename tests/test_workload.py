"""The benchmark workload generator: seeded, Zipf-skewed, Poisson-timed, heavy-tailed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.workload import WorkloadConfig, generate, zipf_weights


def test_same_seed_same_trace_and_different_seed_differs():
    cfg = WorkloadConfig(models=("a", "b", "c"), rate=50, duration=10, seed=3)
    assert generate(cfg) == generate(cfg)
    assert generate(cfg) != generate(WorkloadConfig(models=("a", "b", "c"), rate=50, duration=10, seed=4))


def test_rate_popularity_and_tails():
    models = tuple(f"m{i}" for i in range(8))
    trace = generate(WorkloadConfig(models=models, rate=200, duration=60, zipf_alpha=1.2, seed=1))
    assert abs(len(trace) - 200 * 60) < 4 * np.sqrt(200 * 60)  # Poisson count within 4 sigma
    counts = np.array([sum(a.model == m for a in trace) for m in models]) / len(trace)
    assert np.allclose(counts, zipf_weights(8, 1.2), atol=0.02)
    outputs = np.array([a.output_len for a in trace])
    assert np.mean(outputs) > np.median(outputs)  # right-skewed
    assert all(0 <= a.time < 60 for a in trace) and all(b.time >= a.time for a, b in itertools.pairwise(trace))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError):
        generate(WorkloadConfig(models=(), rate=1, duration=1))
    with pytest.raises(ValueError):
        generate(WorkloadConfig(models=("a",), rate=0, duration=1))
