"""What substitution costs and saves: per model and error budget, quality on held-out prompts with the
planner's chain against the model's own chain, measured through `transformers` (the reference).

Quality: next-token KL(own || planned) and top-1 agreement on held-out prompts (not the probe set),
and, when the model has a task, its task accuracy with the own and the planned chain. Memory saved:
bytes of the model's own blocks that the planned chain no longer needs loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blockllm.chain import load_model, load_tokenizer
from graphs import ChainPlan, ChainPlanner
from zoo_store import Fingerprint, Manifest, Zoo

from .probes import make_probe_set, next_token_metrics


@dataclass(frozen=True)
class QualityRow:
    model: str
    budget: float
    substitutions: int
    planned_error: float  # the plan's aggregated equivalence score (what the budget bounds)
    heldout_kl: float  # measured: mean next-token KL(own || planned) on held-out prompts, nats
    heldout_agreement: float
    accuracy_off: float | None  # task accuracy with the own chain
    accuracy_on: float | None  # task accuracy with the planned chain
    bytes_saved: int
    model_bytes: int
    plan: ChainPlan

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["plan"] = self.plan.report()
        return d


@torch.no_grad()
def evaluate_plan(
    zoo: Zoo,
    manifest: Manifest,
    plan: ChainPlan,
    *,
    heldout_prompts: Sequence[str],
    resident: Collection[Fingerprint] = (),
    task: str | None = None,
    n_task: int = 64,
    rows: int = 16,
    tokens: int = 32,
    own_accuracy: float | None = None,
) -> QualityRow:
    from blockllm.model_sets.tasks import evaluate_accuracy

    tokenizer = load_tokenizer(zoo, manifest)
    ids = make_probe_set(
        heldout_prompts,
        tokenizer=tokenizer,
        vocab_size=int(manifest.config["vocab_size"]),
        rows=rows,
        tokens=tokens,
    ).ids
    own = load_model(zoo, manifest)
    planned = load_model(zoo, plan.manifest(manifest)) if plan.substituted else own
    metrics = next_token_metrics(own(input_ids=ids).logits, planned(input_ids=ids).logits)
    acc_off = acc_on = None
    if task is not None:
        acc_off = (
            own_accuracy
            if own_accuracy is not None
            else evaluate_accuracy(own, tokenizer, task, n=n_task)
        )
        acc_on = (
            evaluate_accuracy(planned, tokenizer, task, n=n_task) if plan.substituted else acc_off
        )
    sizes = {fp: zoo.block_spec(fp).nbytes for fp in manifest.fingerprints()}
    saved = sum(sizes[s.original] for s in plan.substitutions if s.original not in resident)
    return QualityRow(
        model=manifest.key,
        budget=plan.budget,
        substitutions=len(plan.substitutions),
        planned_error=plan.error,
        heldout_kl=metrics["kl"],
        heldout_agreement=metrics["agreement"],
        accuracy_off=acc_off,
        accuracy_on=acc_on,
        bytes_saved=saved,
        model_bytes=sum(sizes.values()),
        plan=plan,
    )


def substitution_table(
    zoo: Zoo,
    planner: ChainPlanner,
    models: Sequence[tuple[str, str | None]],
    budgets: Sequence[float],
    *,
    heldout_prompts: Sequence[str],
    resident: Collection[Fingerprint],
    n_task: int = 64,
) -> list[QualityRow]:
    """Rows for every (model key, task) and budget: the model's own tenant asks, `resident` blocks are loaded."""
    rows = []
    for key, task in models:
        tenant, name = key.split("/", 1)
        manifest = zoo.get_manifest(tenant, name)
        own_acc = None
        for budget in budgets:
            m = dataclasses.replace(manifest, error_budget=float(budget))
            plan = planner.plan(m, tenant, resident=resident)
            row = evaluate_plan(
                zoo,
                m,
                plan,
                heldout_prompts=heldout_prompts,
                resident=resident,
                task=task,
                n_task=n_task,
                own_accuracy=own_acc,
            )
            own_acc = row.accuracy_off
            rows.append(row)
    return rows


def markdown_table(rows: Sequence[QualityRow]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    out = [
        "| model | budget | substitutions | planned score | held-out KL | held-out agreement | task acc. off | task acc. on | memory saved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        saved = f"{r.bytes_saved / 1e6:.2f} MB ({100 * r.bytes_saved / max(1, r.model_bytes):.0f}%)"
        out.append(
            f"| {r.model} | {r.budget:g} | {r.substitutions} | {r.planned_error:.3f} | {r.heldout_kl:.3f} | "
            f"{100 * r.heldout_agreement:.1f}% | {pct(r.accuracy_off)} | {pct(r.accuracy_on)} | {saved} |"
        )
    return "\n".join(out)


__all__ = ["QualityRow", "evaluate_plan", "markdown_table", "substitution_table"]
