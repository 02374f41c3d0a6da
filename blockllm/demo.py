"""The demo and test layout of a model family in the zoo: which tenant owns which variant."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo_store import Zoo

from .ingest import IngestReport, Progress, ingest

log = logging.getLogger(__name__)

PLATFORM = "platform"  # owns the shared base models
# family member -> tenant; members not listed go to the first tenant.
OWNERS = {
    "partial_a": "acme",
    "partial_b": "globex",
    "full": "acme",
    "lora_a": "globex",
    "lora_b": "acme",
    "last2": "acme",
    "lora": "globex",
}


@dataclass(frozen=True)
class Member:
    """One family member as it is registered in the zoo."""

    member: str  # name inside the family (base, partial_a, lora_a, ...)
    tenant: str
    name: str  # model name in the zoo
    path: Path
    is_adapter: bool

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.name}"


def family_prefix(family: Any) -> str:
    return "smollm2" if type(family).__name__.lower().startswith("smol") else "tiny"


def members(family: Any) -> list[Member]:
    """Base first, then full variants, then adapters."""
    prefix = family_prefix(family)
    out = []
    for is_adapter, group in ((False, family.variants()), (True, family.adapters())):
        for member, path in group.items():
            tenant = PLATFORM if member == "base" else OWNERS.get(member, "acme")
            out.append(Member(member, tenant, f"{prefix}-{member.replace('_', '-')}", Path(path), is_adapter))
    return sorted(out, key=lambda m: (m.member != "base", m.is_adapter))


def ingest_family(zoo: Zoo, family: Any, *, progress: Progress | None = None) -> dict[str, IngestReport | None]:
    """Ingest every member (skipping ones already there); {model key: report or None if present}."""
    reports: dict[str, IngestReport | None] = {}
    base_key = None
    for m in members(family):
        if zoo.has_model(m.tenant, m.name):
            reports[m.key] = None
        else:
            reports[m.key] = ingest(
                zoo,
                m.path,
                tenant=m.tenant,
                name=m.name,
                base=base_key if m.member != "base" else None,
                visibility="shared" if m.member == "base" else "private",
                progress=progress,
            )
        if m.member == "base":
            base_key = m.key
    return reports


def demo_prompt(family: Any, member: str, seed: int = 7) -> str:
    """A held-out prompt of the member's own task (the base gets a synthetic sentence start)."""
    from .model_sets.tasks import get_task, task_examples

    task = family.tasks.get(member)
    if task is None:
        return "3 + 4 ="
    return task_examples(get_task(task), 1, seed)[0][0]


def run_serving(zoo: Zoo, family: Any, *, max_new_tokens: int, console: Any, n_workers: int = 2) -> None:
    """Serve a mixed batch from several tenants through a LocalCluster of block hosts."""
    from rich.table import Table

    from .auth import create_key
    from .client import Client, GenerationRequest
    from .types import SamplingParams

    keys = {m.tenant: create_key(zoo, m.tenant) for m in members(family)}
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    with Client(zoo=zoo.url, n_workers=n_workers, api_key=keys["platform"]) as platform:
        console.print(f"Dask dashboard: {platform.dashboard_link}")
        clients = {t: Client(platform.dask, zoo=zoo.url, api_key=k) for t, k in keys.items()}
        plan = platform.place([m.key for m in members(family)])
        futures = []
        for seed in (7, 8):
            for m in members(family):
                prompt = demo_prompt(family, m.member, seed)
                futures.append((m, prompt, clients[m.tenant].submit([GenerationRequest(model=m.key, prompt=prompt, sampling=sampling)])[0]))
        table = Table("tenant", "model", "prompt", "completion", "worker", "blocks passed through (first 8 hex)", title="served as one mixed batch")
        for m, prompt, fut in futures:
            out = fut.result(600)
            adapters = set(zoo.get_manifest(m.tenant, m.name).fingerprints()) - set(zoo.get_manifest(m.tenant, m.name).chain)
            blocks = " ".join(fp[:8] + ("*" if fp in adapters else "") for fp in out.blocks)
            table.add_row(m.tenant, m.key, prompt, out.text.split("\n")[0], out.worker.rsplit(":", 1)[-1], blocks)
        console.print(table)
        console.print("* = a LoRA adapter block. Placement:")
        for worker, models in plan.assignments.items():
            console.print(f"  {worker}: {', '.join(models) or '(nothing)'}")
