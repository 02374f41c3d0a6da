"""Chain planning: own chain by default, substitutes within the error budget, never another tenant's private block."""

from __future__ import annotations

import dataclasses
import itertools
import math
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic_zoo import fake_fp, fake_spec

from graphs import (
    BlockGraph,
    ChainPlanner,
    CostModel,
    EquivEdge,
    InvalidErrorBudgetError,
    PlanForbiddenError,
    set_error_budget,
    validate_error_budget,
)
from zoo_store import AdapterRef, Manifest, ManifestError, Zoo

COST = CostModel(
    load_bandwidth=1e9, compute_bandwidth=1e12, queue_ms=5.0, transfer_ms=0.5, penalty_ms=1.0
)
POSITIONS = [("embed", 0, 0), ("layers", 0, 1), ("layers", 1, 2), ("head", 2, 2)]


def _spec(i: int):
    kind, start, end = POSITIONS[i % len(POSITIONS)]
    return fake_spec(kind, start, end, hidden=1024)


def _m(tenant, name, idx, *, visibility="private", budget=0.0, adapters=()):
    return Manifest(
        tenant=tenant,
        name=name,
        family="llama",
        chain=tuple(fake_fp(i) for i in idx),
        config={},
        visibility=visibility,
        error_budget=budget,
        adapters=tuple(AdapterRef(i, fake_fp(900 + i)) for i in adapters),
    )


def _graph(*manifests):
    specs = {fake_fp(i): _spec(i) for i in range(200)}
    specs.update(
        {fake_fp(900 + i): fake_spec("adapter", *POSITIONS[i][1:], hidden=1024) for i in range(4)}
    )
    return BlockGraph.from_manifests(manifests, specs.__getitem__)


# Block i sits at POSITIONS[i % 4]: base = 0..3; acme's tune = 0,1,6,3 (own layer 1-2: block 6);
# globex's tune = 0,5,10,3 (own blocks 5 and 10); acme's private 14 is another layer 1-2 block.
BASE = _m("platform", "base", [0, 1, 2, 3], visibility="shared")
ACME = _m("acme", "tune", [0, 1, 6, 3], budget=0.5)
GLOBEX = _m("globex", "tune", [0, 5, 10, 3], budget=0.5)
ACME_OTHER = _m("acme", "other", [0, 1, 14, 3])


@pytest.fixture
def graph():
    g = _graph(BASE, ACME, GLOBEX, ACME_OTHER)
    g.add_equiv(
        EquivEdge(
            fake_fp(2),
            fake_fp(6),
            0.2,
            "kl_ucb",
            {"kl": 0.15, "agreement": 0.9},
            context="acme/tune",
        )
    )
    g.add_equiv(EquivEdge(fake_fp(2), fake_fp(10), 0.3, "kl_ucb", context="globex/tune"))
    g.add_equiv(EquivEdge(fake_fp(1), fake_fp(5), 0.25, "kl_ucb", context="globex/tune"))
    g.add_equiv(
        EquivEdge(fake_fp(14), fake_fp(10), 0.0, "kl_ucb", context="globex/tune")
    )  # acme's private block
    g.add_equiv(
        EquivEdge(fake_fp(6), fake_fp(10), 0.0, "kl_ucb", context="globex/tune")
    )  # acme's private block
    return g


def test_budget_zero_is_the_own_chain(graph):
    planner = ChainPlanner(graph, COST)
    off = dataclasses.replace(ACME, error_budget=0.0)
    plan = planner.plan(off, "acme", resident=set(BASE.chain))
    assert plan.chain == ACME.chain and not plan.substitutions and plan.error == 0
    assert "substitution off" in plan.explanation


def test_substitutes_a_resident_block_within_budget(graph):
    plan = ChainPlanner(graph, COST).plan(ACME, "acme", resident=set(BASE.chain))
    assert plan.chain == (fake_fp(0), fake_fp(1), fake_fp(2), fake_fp(3))
    (s,) = plan.substitutions
    assert (s.position, s.original, s.substitute, s.score, s.metric, s.index) == (
        ("layers", 1, 2),
        fake_fp(6),
        fake_fp(2),
        0.2,
        "kl_ucb",
        2,
    )
    assert s.metrics["agreement"] == 0.9
    assert plan.cost < plan.own_cost and plan.error == pytest.approx(0.2)
    report = plan.report()
    assert report["substitutions"][0]["substitute"] == fake_fp(2) and report[
        "error"
    ] == pytest.approx(0.2)
    assert "not resident" in plan.explanation and "acme/tune" in plan.explanation
    assert plan.manifest(ACME).chain == plan.chain


def test_prefers_own_chain_when_everything_is_resident(graph):
    plan = ChainPlanner(graph, COST).plan(ACME, "acme", resident=set(ACME.chain) | set(BASE.chain))
    assert not plan.substitutions and "cheapest" in plan.explanation


def test_load_moves_requests_to_lightly_loaded_substitutes(graph):
    everything = set(ACME.chain) | set(BASE.chain)
    plan = ChainPlanner(graph, COST).plan(
        ACME, "acme", resident=everything, load={fake_fp(6): 10.0}
    )
    assert [s.substitute for s in plan.substitutions] == [fake_fp(2)]
    busy_both = ChainPlanner(graph, COST).plan(
        ACME, "acme", resident=everything, load={fake_fp(6): 10.0, fake_fp(2): 20.0}
    )
    assert not busy_both.substitutions


def test_sum_of_scores_stays_within_budget(graph):
    planner = ChainPlanner(graph, COST)
    resident = set(BASE.chain)
    both = planner.plan(dataclasses.replace(GLOBEX, error_budget=0.6), "globex", resident=resident)
    assert len(both.substitutions) == 2 and both.error == pytest.approx(0.55)
    one = planner.plan(dataclasses.replace(GLOBEX, error_budget=0.5), "globex", resident=resident)
    assert len(one.substitutions) == 1 and one.error <= 0.5
    lenient = ChainPlanner(graph, dataclasses.replace(COST, aggregate="max"))
    assert (
        len(
            lenient.plan(
                dataclasses.replace(GLOBEX, error_budget=0.3), "globex", resident=resident
            ).substitutions
        )
        == 2
    )


def test_private_block_of_another_tenant_is_never_chosen(graph):
    """acme's private blocks 6 and 14 stand in for globex's block 10 with score 0: still never used."""
    planner = ChainPlanner(graph, COST)
    huge = dataclasses.replace(GLOBEX, error_budget=1e9)
    for resident in (None, {fake_fp(6), fake_fp(14)}, set(BASE.chain) | {fake_fp(6), fake_fp(14)}):
        plan = planner.plan(
            huge, "globex", resident=resident, load={fake_fp(10): 1e6, fake_fp(2): 1e6}
        )
        assert not {fake_fp(6), fake_fp(14)} & set(plan.chain)
        assert "private to another tenant" in plan.explanation
    # acme itself may use its own private block for its other model
    acme_other = dataclasses.replace(
        _m("acme", "x", [0, 5, 10, 3], visibility="shared"), error_budget=1.0
    )
    g2 = _graph(BASE, ACME, GLOBEX, ACME_OTHER, acme_other)
    g2.add_equiv(EquivEdge(fake_fp(14), fake_fp(10), 0.0, "kl_ucb"))
    plan = ChainPlanner(g2, COST).plan(acme_other, "acme", resident={fake_fp(14)})
    assert fake_fp(14) in plan.chain
    # and a shared model asked for by another tenant still gets no private substitute of acme
    plan = ChainPlanner(g2, COST).plan(acme_other, "globex", resident={fake_fp(14)})
    assert fake_fp(14) not in plan.chain


def test_blocks_with_an_adapter_attached_are_pinned(graph):
    lora = dataclasses.replace(_m("acme", "lora", [0, 1, 6, 3], adapters=[2]), error_budget=1.0)
    g = _graph(BASE, ACME, lora)
    g.add_equiv(EquivEdge(fake_fp(2), fake_fp(6), 0.0, "kl_ucb"))
    plan = ChainPlanner(g, COST).plan(lora, "acme", resident=set(BASE.chain))
    assert plan.chain == lora.chain and "pinned" in plan.explanation


def test_other_metrics_and_positions_are_ignored(graph):
    graph.add_equiv(EquivEdge(fake_fp(2), fake_fp(6), 0.0, "agreement"))
    plan = ChainPlanner(graph, COST).plan(ACME, "acme", resident=set(BASE.chain))
    assert not plan.substitutions


def test_a_private_model_of_another_tenant_cannot_be_planned(graph):
    with pytest.raises(PlanForbiddenError):
        ChainPlanner(graph, COST).plan(ACME, "globex")
    assert ChainPlanner(graph, COST).plan(BASE, "globex").chain == BASE.chain  # shared


def test_transfers_count_where_consecutive_blocks_share_no_worker(graph):
    resident = {
        fake_fp(0): ["w1"],
        fake_fp(1): ["w1"],
        fake_fp(6): ["w2"],
        fake_fp(2): ["w1"],
        fake_fp(3): ["w1"],
    }
    plan = ChainPlanner(graph, dataclasses.replace(COST, transfer_ms=5.0, penalty_ms=1.0)).plan(
        ACME, "acme", resident=resident
    )
    assert [s.substitute for s in plan.substitutions] == [fake_fp(2)]  # stays on w1


# ---------------------------------------------------------------------- error budgets are validated
@pytest.mark.parametrize("bad", [-0.01, math.nan, math.inf, "0.1", None, True])
def test_bad_error_budgets_are_typed_errors(bad):
    with pytest.raises(InvalidErrorBudgetError) as err:
        validate_error_budget(bad)
    assert isinstance(err.value, ManifestError)  # callers catching manifest errors catch it too
    with pytest.raises(ManifestError):
        _m("acme", "m", [0, 1], budget=bad)  # registering a model checks it too


def test_error_budget_is_the_owners_policy_in_the_manifest():
    from synthetic_zoo import add_model, random_state, tiny_config

    zoo = Zoo(f"memory://budget-{uuid.uuid4().hex}")
    cfg = tiny_config(layers=1)
    add_model(zoo, "acme", "m", cfg, random_state(cfg, 0))
    assert zoo.get_manifest("acme", "m").error_budget == 0.0  # off by default
    assert set_error_budget(zoo, "acme", "m", 0.25).error_budget == 0.25
    assert zoo.get_manifest("acme", "m").error_budget == 0.25
    with pytest.raises(InvalidErrorBudgetError):
        set_error_budget(zoo, "acme", "m", -1)
    assert zoo.get_manifest("acme", "m").error_budget == 0.25


def test_ingest_refuses_a_bad_budget_before_writing_anything(tiny_family, tmp_path):
    from blockllm.ingest import ingest

    zoo = Zoo((tmp_path / "zoo").as_uri())
    for bad in (-1.0, math.nan, "lots"):
        with pytest.raises(ManifestError):
            ingest(zoo, tiny_family.base, tenant="acme", name="base", error_budget=bad)
    assert zoo.list_models() == [] and zoo.list_blocks() == []


# ---------------------------------------------------------------------- properties
TENANTS = ["acme", "globex", "initech"]


@st.composite
def planning_problems(draw):
    n_pos = draw(st.integers(1, 4))
    n_alt = draw(st.integers(1, 3))
    # block (p, j) = fake_fp(p + 4 * j): position POSITIONS[p]; j = 0 is the requested model's own
    owners = {}
    manifests = []
    for j in range(n_alt + 1):
        tenant = draw(st.sampled_from(TENANTS))
        vis = draw(st.sampled_from(["private", "shared"]))
        manifests.append(_m(tenant, f"m{j}", [p + 4 * j for p in range(n_pos)], visibility=vis))
        owners[j] = (tenant, vis)
    budget = draw(st.sampled_from([0.0, 0.1, 0.3, 1.0, 5.0]))
    target = dataclasses.replace(manifests[0], error_budget=budget)
    manifests[0] = target
    g = _graph(*manifests)
    for p in range(n_pos):
        for j in range(1, n_alt + 1):
            if draw(st.booleans()):
                score = draw(st.floats(0.0, 2.0))
                g.add_equiv(EquivEdge(fake_fp(p + 4 * j), fake_fp(p), score, "kl_ucb"))
    tenant = (
        target.tenant
        if draw(st.booleans()) or target.visibility == "private"
        else draw(st.sampled_from(TENANTS))
    )
    blocks = [fake_fp(p + 4 * j) for p in range(n_pos) for j in range(n_alt + 1)]
    resident = set(draw(st.lists(st.sampled_from(blocks), unique=True)))
    load = {
        fp: draw(st.floats(0, 10)) for fp in draw(st.lists(st.sampled_from(blocks), unique=True))
    }
    aggregate = draw(st.sampled_from(["sum", "max"]))
    return g, target, tenant, resident, load, aggregate


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_problems())
def test_property_never_another_tenants_private_block_and_budget_respected(problem):
    g, manifest, tenant, resident, load, aggregate = problem
    cost = dataclasses.replace(COST, aggregate=aggregate)
    plan = ChainPlanner(g, cost).plan(manifest, tenant, resident=resident, load=load)
    own = set(manifest.chain)
    for fp in plan.chain:
        if fp not in own:
            node = g.node(fp)
            assert node["visibility"] == "shared" or tenant in node["tenants"]
    scores = [s.score for s in plan.substitutions]
    total = sum(scores) if aggregate == "sum" else max(scores, default=0.0)
    assert total <= manifest.error_budget + 1e-9 and plan.error == pytest.approx(total)
    if manifest.error_budget == 0:
        assert plan.chain == manifest.chain
    assert plan.cost <= plan.own_cost + 1e-9
    # optimal: no allowed chain within budget is cheaper (brute force)
    planner = ChainPlanner(g, cost)
    options = []
    for fp in manifest.chain:
        opts = [(fp, 0.0, 0.0)]
        for e in g.substitutes_for(fp):
            if (
                g.visible_to(e.substitute, tenant)
                and e.score <= manifest.error_budget
                and manifest.error_budget > 0
            ):
                opts.append((e.substitute, e.score, cost.penalty_ms * e.score))
        options.append(opts)
    best = math.inf
    for combo in itertools.product(*options):
        s = [c[1] for c, fp in zip(combo, manifest.chain, strict=True) if c[0] != fp]
        err = sum(s) if aggregate == "sum" else max(s, default=0.0)
        if err <= manifest.error_budget + 1e-12:
            c = sum(planner.block_cost(fp, resident, load) + pen for fp, _, pen in combo)
            best = min(best, c)
    assert plan.cost == pytest.approx(best)
