"""Placement planning: shared blocks gravitate together, hot models get replicas, capacity holds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockllm.serving.placement import WorkerInfo, plan_placement
from zoo_store import Manifest


def fp(i: int) -> str:
    return f"{i:064x}"


def family(n_variants: int, n_layers: int = 6, own: int = 2) -> tuple[dict[str, Manifest], dict[str, int]]:
    """A base chain and variants that replace their last `own` blocks."""
    base = [fp(i) for i in range(n_layers)]
    manifests = {"p/base": Manifest("p", "base", "llama", tuple(base), {})}
    for v in range(n_variants):
        chain = base[: n_layers - own] + [fp(1000 + 10 * v + j) for j in range(own)]
        manifests[f"t{v}/v{v}"] = Manifest(f"t{v}", f"v{v}", "llama", tuple(chain), {})
    sizes = {b: 100 for m in manifests.values() for b in m.chain}
    return manifests, sizes


def test_variants_sharing_blocks_land_on_one_worker_when_it_fits():
    manifests, sizes = family(3)
    plan = plan_placement(manifests, sizes, [WorkerInfo("w1", 10_000), WorkerInfo("w2", 10_000)])
    hosts = {w for k in manifests for w in plan.workers_for(k)}
    assert len(hosts) == 1  # everything shares the base: one worker, base loaded once
    assert not plan.unplaced


def test_capacity_is_respected_and_the_rest_spills_over():
    manifests, sizes = family(4)
    one_model = 6 * 100
    plan = plan_placement(manifests, sizes, [WorkerInfo("w1", one_model + 2 * 200), WorkerInfo("w2", 10_000)])
    for worker, models in plan.assignments.items():
        held = set().union(*(manifests[m].fingerprints() for m in models)) if models else set()
        cap = one_model + 400 if worker == "w1" else 10_000
        assert sum(sizes[b] for b in held) <= cap
    assert all(plan.workers_for(k) for k in manifests)


def test_hot_model_gets_a_replica_and_cold_ones_are_left_out_when_full():
    manifests, sizes = family(3)
    traffic = {"t0/v0": 100.0, "t1/v1": 1.0, "t2/v2": 0.0, "p/base": 0.0}
    plan = plan_placement(manifests, sizes, [WorkerInfo("w1", 800), WorkerInfo("w2", 800)], traffic)
    assert sorted(plan.workers_for("t0/v0")) == ["w1", "w2"]
    assert plan.unplaced  # 800 bytes per worker cannot hold every variant beside the replica
    assert "t0/v0" not in plan.unplaced


def test_traffic_shift_moves_models_and_the_plan_explains_itself():
    manifests, sizes = family(2, own=6)  # unrelated chains
    workers = [WorkerInfo("w1", 600), WorkerInfo("w2", 600)]
    first = plan_placement({k: manifests[k] for k in ("t0/v0", "t1/v1")}, sizes, workers, {"t0/v0": 10, "t1/v1": 1})
    assert first.workers_for("t0/v0") != first.workers_for("t1/v1")
    why = first.explain(manifests["t0/v0"].chain[0], manifests)
    assert why and "traffic share" in why[0]


@settings(max_examples=60, deadline=None)
@given(
    n_variants=st.integers(0, 6),
    caps=st.lists(st.integers(300, 3000), min_size=1, max_size=4),
    rates=st.lists(st.floats(0, 100), min_size=7, max_size=7),
)
def test_plans_never_exceed_capacity(n_variants, caps, rates):
    manifests, sizes = family(n_variants)
    traffic = dict(zip(sorted(manifests), rates, strict=False))
    workers = [WorkerInfo(f"w{i}", c) for i, c in enumerate(caps)]
    plan = plan_placement(manifests, sizes, workers, traffic)
    for w in workers:
        held = set().union(set(), *(manifests[m].fingerprints() for m in plan.assignments[w.address]))
        assert sum(sizes[b] for b in held) <= w.capacity_bytes
    for key in manifests:
        assert bool(plan.workers_for(key)) != (key in plan.unplaced)
