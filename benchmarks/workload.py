"""Multi-tenant workload generator: Zipf model popularity, Poisson arrivals, heavy-tailed lengths.

Lengths are lognormal, with defaults in the range reported for public chat traces (ShareGPT-like:
prompt median ~ 100 tokens, output median ~ 200, long right tails), clipped to the model context.
Everything is seeded: the same config gives the same trace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class WorkloadConfig:
    models: tuple[str, ...]
    rate: float  # requests per second (Poisson)
    duration: float  # seconds of arrivals
    zipf_alpha: float = 1.1
    prompt_median: float = 100.0
    prompt_sigma: float = 1.0
    output_median: float = 200.0
    output_sigma: float = 0.8
    max_prompt: int = 2048
    max_output: int = 1024
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Arrival:
    time: float  # seconds from the start
    model: str
    prompt_len: int
    output_len: int


def zipf_weights(n: int, alpha: float) -> np.ndarray:
    ranks = np.arange(1, n + 1, dtype=np.float64)
    w = ranks**-alpha
    return w / w.sum()


def generate(cfg: WorkloadConfig) -> list[Arrival]:
    if not cfg.models:
        raise ValueError("a workload needs at least one model")
    if cfg.rate <= 0 or cfg.duration <= 0:
        raise ValueError("rate and duration must be positive")
    rng = np.random.default_rng(cfg.seed)
    times, t = [], rng.exponential(1.0 / cfg.rate)
    while t < cfg.duration:
        times.append(t)
        t += rng.exponential(1.0 / cfg.rate)
    n = len(times)
    models = rng.choice(len(cfg.models), size=n, p=zipf_weights(len(cfg.models), cfg.zipf_alpha))
    prompts = np.clip(rng.lognormal(np.log(cfg.prompt_median), cfg.prompt_sigma, n), 1, cfg.max_prompt).astype(int)
    outputs = np.clip(rng.lognormal(np.log(cfg.output_median), cfg.output_sigma, n), 1, cfg.max_output).astype(int)
    return [Arrival(float(t), cfg.models[m], int(p), int(o)) for t, m, p, o in zip(times, models, prompts, outputs, strict=True)]
