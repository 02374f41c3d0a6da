"""The results table of docs/EQUIVALENCE.md: per variant, quality and memory with substitution off and on.

    python -m benchmarks.equivalence_table [--smollm2] [--out benchmarks/results/equivalence.json]

Builds the tiny family (and SmolLM2 with --smollm2) into a temporary zoo, runs the equivalence job
(timed), then for every variant and error budget plans a chain with the shared base resident and
measures it through transformers on held-out prompts (see jobs/quality.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from blockllm.demo import ingest_family, members
from blockllm.model_sets import build_smollm2_family, build_tiny_family
from blockllm.model_sets.tasks import TASKS, synthetic_corpus, task_examples
from graphs import ChainPlanner, CostModel, load_graph
from jobs import Settings, run_equivalence
from jobs.quality import markdown_table, substitution_table
from zoo_store import Zoo

TINY_PROBES = list(synthetic_corpus(16, seed=5)) + [p for t in TASKS.values() for p, _ in task_examples(t, 4, seed=123)]
HELDOUT = list(synthetic_corpus(16, seed=777)) + [p + a for t in TASKS.values() for p, a in task_examples(t, 4, seed=999)]


def family_table(family, zoo: Zoo, budgets: list[float], *, probes, settings: Settings, n_task: int) -> dict:
    t0 = time.perf_counter()
    ingest_family(zoo, family)
    ingest_s = time.perf_counter() - t0
    first = run_equivalence(zoo, probe_prompts=probes, settings=settings)
    second = run_equivalence(zoo, settings=settings)
    base = next(m for m in members(family) if m.member == "base")
    resident = set(zoo.get_manifest(base.tenant, base.name).chain)
    models = [(m.key, family.tasks.get(m.member)) for m in members(family) if m.member != "base"]
    planner = ChainPlanner(load_graph(zoo), CostModel(penalty_ms=0.1))
    rows = substitution_table(zoo, planner, models, budgets, heldout_prompts=HELDOUT, resident=resident, n_task=n_task)
    return {
        "ingest_s": round(ingest_s, 2),
        "first_run": first.summary(),
        "second_run": second.summary(),
        "rows": [r.to_dict() for r in rows],
        "markdown": markdown_table(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M family (slower)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/equivalence.json"))
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["tiny"] = family_table(build_tiny_family(), Zoo((Path(tmp) / "tiny").as_uri()), [0.0, 0.25, 1.0],
                                   probes=TINY_PROBES, settings=Settings(), n_task=64)
        print(out["tiny"]["markdown"])
        if args.smollm2:
            out["smollm2"] = family_table(build_smollm2_family(), Zoo((Path(tmp) / "smol").as_uri()), [0.0, 0.25, 0.5],
                                          probes=None, settings=Settings(probe_rows=8), n_task=32)
            print(out["smollm2"]["markdown"])
    for name, r in out.items():
        print(f"{name}: first run {r['first_run']['duration_s']:.2f} s ({r['first_run']['compared']} pairs), "
              f"second run {r['second_run']['duration_s']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
