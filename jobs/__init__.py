"""jobs: offline work run as Dask task graphs (block equivalence), and the schedule that repeats it."""

from .compare import (
    ChainStates,
    Direction,
    PairResult,
    Settings,
    ZooRef,
    clear_caches,
    compare_blocks,
)
from .equivalence import STATE, EquivalenceReport, job_state, run_equivalence
from .probes import DEFAULT_PROMPTS, BlockRunner, ProbeSet, make_probe_set, next_token_metrics
from .schedule import ScheduleReport, parse_every, run_every

__all__ = [
    "DEFAULT_PROMPTS",
    "STATE",
    "BlockRunner",
    "ChainStates",
    "Direction",
    "EquivalenceReport",
    "PairResult",
    "ProbeSet",
    "ScheduleReport",
    "Settings",
    "ZooRef",
    "clear_caches",
    "compare_blocks",
    "job_state",
    "make_probe_set",
    "next_token_metrics",
    "parse_every",
    "run_equivalence",
    "run_every",
]
