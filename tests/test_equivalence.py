"""The equivalence job on the tiny and SmolLM2 families, at scale, concurrently, and on bad inputs."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from synthetic_zoo import add_model, perturb, random_state, synthetic_zoo, tiny_config

from blockllm.chain import load_model, load_tokenizer
from blockllm.checkpoints import read_model_dir
from blockllm.model_sets.tasks import TASKS, synthetic_corpus, task_examples
from graphs import (
    BlockGraph,
    ChainPlanner,
    CostModel,
    EquivEdge,
    IncomparableBlocksError,
    PublishedGraph,
    current_version,
    load_graph,
    publish,
    set_error_budget,
)
from jobs import (
    BlockRunner,
    Settings,
    job_state,
    make_probe_set,
    next_token_metrics,
    run_equivalence,
)
from jobs.compare import ZooRef, compare_blocks, compare_pair
from jobs.quality import markdown_table, substitution_table
from zoo_store import Zoo

# Probe prompts: the synthetic language plus a few prompts of every tenant task (seeds unlike the
# held-out ones below and unlike evaluate_accuracy's).
TINY_PROBES = list(synthetic_corpus(16, seed=5)) + [
    p for t in TASKS.values() for p, _ in task_examples(t, 4, seed=123)
]
HELDOUT = list(synthetic_corpus(16, seed=777)) + [
    p + a for t in TASKS.values() for p, a in task_examples(t, 4, seed=999)
]
K = Settings().max_candidates


def _copy(zoo: Zoo, tmp_path: Path) -> Zoo:
    dst = tmp_path / "zoo"
    shutil.copytree(urlparse(zoo.url).path, dst)
    return Zoo(dst.as_uri())


def _models(zoo: Zoo) -> dict[str, object]:
    return {m.key: m for m in zoo.list_models()}


@pytest.fixture(scope="module")
def tiny_run(tiny_zoo, tmp_path_factory):
    zoo = _copy(tiny_zoo, tmp_path_factory.mktemp("tiny-equiv"))
    report = run_equivalence(zoo, probe_prompts=TINY_PROBES)
    return zoo, report


# ---------------------------------------------------------------------- the probe runner
def test_block_runner_reproduces_transformers(tiny_zoo):
    for key in ("platform/tiny-base", "globex/tiny-partial-b"):
        m = _models(tiny_zoo)[key]
        ids = make_probe_set(
            TINY_PROBES,
            tokenizer=load_tokenizer(tiny_zoo, m),
            vocab_size=m.config["vocab_size"],
            rows=4,
            tokens=24,
        ).ids
        _, logits = BlockRunner(m.config).run_chain([tiny_zoo.get_block(fp) for fp in m.chain], ids)
        with torch.no_grad():
            ref = load_model(tiny_zoo, m)(input_ids=ids).logits
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the tiny family
def test_identical_blocks_need_no_work(tiny_run):
    zoo, report = tiny_run
    models = _models(zoo)
    base, partial_a = models["platform/tiny-base"], models["acme/tiny-partial-a"]
    # partial_a's untouched layers have the base's fingerprint: the same block, nothing to compare
    assert [a == b for a, b in zip(base.chain, partial_a.chain, strict=True)] == [
        True,
        True,
        True,
        True,
        False,
        True,
    ]
    g = load_graph(zoo)
    assert report.shared_blocks == sum(1 for fp in g.blocks() if len(g.node(fp)["models"]) > 1)
    # only distinct blocks at a position are compared: every pair within each position, once
    distinct: dict[tuple, set] = {}
    for m in models.values():
        for fp in m.chain:
            distinct.setdefault(zoo.block_spec(fp).position, set()).add(fp)
    expected = {tuple(sorted(p)) for fps in distinct.values() for p in _pairs(fps)}
    assert {(p.a, p.b) for p in report.pairs} == expected
    assert report.compared == len(expected) and report.lsh_pruned == 0  # small groups: exhaustive
    assert report.skipped == {"adapter": sum(len(m.adapters) for m in models.values())}


def _pairs(fps):
    fps = sorted(fps)
    return [(a, b) for i, a in enumerate(fps) for b in fps[i + 1 :]]


def test_changed_layers_are_scored_honestly(tiny_run):
    """The recorded end-to-end numbers are what transformers itself computes for the swapped chain."""
    zoo, report = tiny_run
    models = _models(zoo)
    base, partial_a = models["platform/tiny-base"], models["acme/tiny-partial-a"]
    pair = next(p for p in report.pairs if {p.a, p.b} == {base.chain[4], partial_a.chain[4]})
    d = next(d for d in pair.directions if d.substitute == base.chain[4])
    assert d.context == "acme/tiny-partial-a"
    ids = make_probe_set(
        TINY_PROBES,
        tokenizer=load_tokenizer(zoo, partial_a),
        vocab_size=partial_a.config["vocab_size"],
        rows=Settings().probe_rows,
        tokens=Settings().probe_tokens,
    ).ids
    swapped = dataclasses.replace(
        partial_a, chain=partial_a.chain[:4] + (base.chain[4],) + partial_a.chain[5:]
    )
    with torch.no_grad():
        expected = next_token_metrics(
            load_model(zoo, partial_a)(input_ids=ids).logits,
            load_model(zoo, swapped)(input_ids=ids).logits,
        )
    assert d.metrics["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-6)
    assert d.metrics["agreement"] == pytest.approx(expected["agreement"])
    # the fine-tune changed what its last layer computes: far from free to swap back
    assert d.metrics["kl"] > 1.0 and d.metrics["agreement"] < 0.6 and not d.accepted
    # every accepted direction is an equiv edge carrying its measured numbers
    g = load_graph(zoo)
    accepted = [(p, d) for p in report.pairs for d in p.directions if d.accepted]
    assert accepted and len(accepted) == report.edges_added == g.summary()["equiv_edges"]
    for _, d in accepted:
        edge = g.get_equiv(d.substitute, d.original)
        assert edge.score == pytest.approx(d.metrics["kl_ucb"]) and edge.metric == "kl_ucb"
        assert edge.context == d.context and edge.probe_set.startswith("probe-") and edge.date
        assert 0 < edge.score <= Settings().max_score


def test_a_second_run_does_nothing(tiny_run):
    zoo, _ = tiny_run
    version = current_version(zoo)
    again = run_equivalence(zoo)
    assert (again.new_blocks, again.compared, again.considered) == (0, 0, 0)
    assert again.graph_version == version == current_version(zoo)  # nothing to publish
    assert (
        job_state(zoo)["runs"][-1]["duration_s"] == again.duration_s
    )  # every run's time is logged


def test_unrelated_blocks_are_rejected_and_mismatched_ones_never_compared(
    tiny_run, tiny_family, tmp_path
):
    zoo = _copy(tiny_run[0], tmp_path)
    models = _models(zoo)
    base = models["platform/tiny-base"]
    ckpt = read_model_dir(str(tiny_family.base))
    # same shapes, unrelated weights: layer 3 re-initialised
    fresh = random_state(base.config, seed=123)
    scrambled = {
        **ckpt.state_dict,
        **{k: v for k, v in fresh.items() if k.startswith("model.layers.3.")},
    }
    add_model(zoo, "globex", "scrambled", base.config, scrambled, tokenizer=base.tokenizer)
    # another shape at the same positions, and the same shapes in another family
    other_cfg = tiny_config(hidden=32, layers=4, vocab=base.config["vocab_size"])
    add_model(zoo, "globex", "wide", other_cfg, random_state(other_cfg, 1))
    add_model(zoo, "globex", "alien", base.config, ckpt.state_dict, family="otherfam")
    report = run_equivalence(zoo)

    new = _models(zoo)
    scr_l3 = new["globex/scrambled"].chain[4]
    assert new["globex/scrambled"].chain[:4] == base.chain[:4]  # the rest is the base's: no work
    assert report.new_blocks == 1 + 6 + 6
    scr_pairs = [p for p in report.pairs if scr_l3 in (p.a, p.b)]
    l3_blocks = {m.chain[4] for m in models.values()}
    assert len(scr_pairs) == len(l3_blocks)
    for p in scr_pairs:
        assert (
            p.stage == "prefilter" and p.weight_distance > 1.3
        )  # about sqrt(2): unrelated weights
    g = load_graph(zoo)
    assert not [e for e in g.equiv_edges() if scr_l3 in (e.substitute, e.original)]
    # other shape / other family: typed skips, counted per pair, never compared
    wide, alien = set(new["globex/wide"].chain), set(new["globex/alien"].chain)
    assert not [p for p in report.pairs if {p.a, p.b} & (wide | alien)]
    per_position = {}
    for m in new.values():
        for fp in m.chain:
            per_position.setdefault(zoo.block_spec(fp).position, set()).add(fp)
    tiny_blocks = {pos: len(fps - wide - alien) for pos, fps in per_position.items()}
    assert report.skipped["shape"] == sum(tiny_blocks.values())  # wide vs tiny
    assert report.skipped["family"] == sum(tiny_blocks.values()) + 6  # alien vs tiny, alien vs wide
    assert (
        report.skipped["unsupported-family"] == 6
    )  # no runner for "otherfam": its blocks are not probed
    with pytest.raises(IncomparableBlocksError, match="shape"):
        compare_blocks(zoo, base.chain[4], new["globex/wide"].chain[4])
    with pytest.raises(IncomparableBlocksError, match="family"):
        compare_pair(
            ZooRef(zoo.url),
            base.chain[4],
            new["globex/alien"].chain[4],
            None,
            0,
            None,
            0,
            None,
            0,
            Settings(),
        )


def test_job_on_a_local_cluster_places_tasks_where_the_blocks_are(tiny_run, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    zoo = _copy(tiny_run[0], tmp_path)
    inline = {(e.substitute, e.original): e.score for e in load_graph(zoo).equiv_edges()}
    seen = []
    import dask.config

    with (
        # Locality hints are loose (allow_other_workers): with work stealing on, an idle worker may
        # steal a task under CI load. The hints themselves are what this test checks.
        dask.config.set({"distributed.scheduler.work-stealing": False}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        first = sorted(client.scheduler_info()["workers"])[0]
        where = {fp: [first] for fp in load_graph(zoo).blocks()}
        with get_task_stream(client) as ts:
            report = run_equivalence(
                zoo,
                client,
                full=True,
                block_locations=where,
                progress=lambda stage, done, total: seen.append((stage, done, total)),
            )
    assert report.status == "done" and report.full and report.failed == 0
    assert {
        (e.substitute, e.original): e.score for e in load_graph(zoo).equiv_edges()
    } == pytest.approx(inline)
    placed = [t["worker"] for t in ts.data if "compare" in t["key"] or "sketch" in t["key"]]
    assert placed and all(w == first for w in placed)
    for stage in ("sketch", "compare", "publish"):
        done = [(d, t) for s, d, t in seen if s == stage]
        assert done[-1][0] == done[-1][1]


# ---------------------------------------------------------------------- planning with the job's graph
def test_tenant_safety_with_the_measured_graph(tiny_run):
    zoo, _ = tiny_run
    g = load_graph(zoo)
    models = _models(zoo)
    full, partial_b = models["acme/tiny-full"], models["globex/tiny-partial-b"]
    private = full.chain[3]  # acme's private layer 2, where globex's partial_b has its own block
    assert g.node(private)["tenants"] == ["acme"] and g.node(partial_b.chain[3])["tenants"] == [
        "globex"
    ]
    shared = models["platform/tiny-base"].chain[3]
    g.add_equiv(EquivEdge(private, partial_b.chain[3], 0.0, "kl_ucb"))  # whatever the score
    g.add_equiv(EquivEdge(shared, partial_b.chain[3], 0.9, "kl_ucb"))
    greedy = dataclasses.replace(partial_b, error_budget=1e9)
    plan = ChainPlanner(g, CostModel(penalty_ms=0.0)).plan(
        greedy, "globex", resident={private, shared}, load={fp: 100.0 for fp in partial_b.chain}
    )
    assert (
        private not in plan.chain and shared in plan.chain
    )  # it substitutes, never with acme's block
    assert all(g.visible_to(s.substitute, "globex") for s in plan.substitutions)


def table_models(family) -> list[tuple[str, str | None]]:
    """(model key, its task) for every variant of a family as `ingest_family` registers it."""
    from blockllm.demo import members

    return [(m.key, family.tasks.get(m.member)) for m in members(family) if m.member != "base"]


def test_results_table_quality_cost_stays_within_budget(tiny_run, tiny_family):
    """Per variant: quality with substitution off (budget 0) and on; memory saved (docs/EQUIVALENCE.md)."""
    zoo, _ = tiny_run
    g = load_graph(zoo)
    base = _models(zoo)["platform/tiny-base"]
    # memory first: the shared base is resident, a variant's own blocks are not; small penalty
    planner = ChainPlanner(g, CostModel(penalty_ms=0.1))
    rows = substitution_table(
        zoo,
        planner,
        table_models(tiny_family),
        [0.0, 0.25, 1.0],
        heldout_prompts=HELDOUT,
        resident=set(base.chain),
        n_task=64,
    )
    logging.getLogger(__name__).info("\n%s", markdown_table(rows))
    for r in rows:
        assert r.planned_error <= r.budget + 1e-9
        assert r.heldout_kl <= r.budget + 1e-6, r  # measured on held-out prompts, not the probes
        if r.budget == 0:
            assert r.substitutions == 0 and r.heldout_kl == 0 and r.accuracy_on == r.accuracy_off
        for s in r.plan.substitutions:
            assert g.visible_to(s.substitute, r.model.split("/")[0])
    assert any(r.bytes_saved > 0 for r in rows)  # substitution does save memory somewhere
    lora = [r for r in rows if "lora" in r.model]
    assert all(r.substitutions == 0 for r in lora)  # pinned: their layers carry adapters


def test_budget_set_in_the_manifest_drives_the_planner(tiny_run, tmp_path):
    """A budget written into tiny-full's manifest is what the planner spends: with none it keeps
    the own chain; with the score of the best resident base block that may stand in for one of
    tiny-full's (whatever the trained family's scores are), it substitutes within that budget."""
    zoo = _copy(tiny_run[0], tmp_path)
    g, models = load_graph(zoo), _models(zoo)
    resident = set(models["platform/tiny-base"].chain)
    scores = [e.score for fp in models["acme/tiny-full"].chain for e in g.substitutes_for(fp)
              if e.substitute in resident and g.visible_to(e.substitute, "acme")]  # fmt: skip
    assert scores, "the equivalence run found no base block to stand in for tiny-full's"
    planner = ChainPlanner(g, CostModel(penalty_ms=0.1))
    off = planner.plan(set_error_budget(zoo, "acme", "tiny-full", 0.0), "acme", resident=resident)
    assert off.budget == 0 and off.error == 0 and not off.substituted
    budget = min(scores)
    plan = planner.plan(set_error_budget(zoo, "acme", "tiny-full", budget), "acme", resident=resident)
    assert plan.budget == budget and plan.substituted and 0 < plan.error <= budget
    assert "acme/tiny-full" in plan.explanation


# ---------------------------------------------------------------------- incremental at scale
@pytest.mark.slow
def test_adding_10_blocks_costs_10_times_k_comparisons(caplog):
    zoo = Zoo(f"memory://scale-{uuid.uuid4().hex}")
    synthetic_zoo(zoo, bases=40, tunes_per_base=1, layers=8, tuned_layers=3)
    assert len(zoo.list_blocks()) >= 500
    caplog.set_level(logging.INFO, logger="jobs.equivalence")
    first = run_equivalence(zoo)
    n = first.blocks
    assert first.new_blocks == n >= 500
    assert first.compared <= n * K < n * (n - 1) / 2  # sub-quadratic even on the first run
    assert first.edges_added >= 2 * 40 * 3  # every tuned layer pairs with its base layer, both ways

    cfg = tiny_config(layers=8)
    state = random_state(cfg, 0)
    tuned = perturb(state, list(range(8)), 0.05, seed=777)
    gen = torch.Generator().manual_seed(7)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        t = tuned[key]
        tuned[key] = t + 0.05 * torch.randn(t.shape, generator=gen) * t.norm() / math.sqrt(
            t.numel()
        )
    add_model(zoo, "globex", "retune", cfg, tuned)  # 10 new blocks
    second = run_equivalence(zoo)
    assert second.new_blocks == 10 and second.blocks == n + 10
    assert 10 <= second.compared <= 10 * K  # O(10 x k), not O(n^2)
    assert (
        second.considered == sum(len(v) for v in _positions(zoo).values()) - 10
    )  # counted, not compared
    assert second.lsh_pruned == second.considered - second.compared
    new = set(_models(zoo)["globex/retune"].chain)
    found = {e.original for e in load_graph(zoo).equiv_edges() if e.substitute in new}
    assert len(found) >= 10  # each new block found the base block it was tuned from
    runs = job_state(zoo)["runs"]
    assert [r["duration_s"] for r in runs[-2:]] == [first.duration_s, second.duration_s]
    assert (
        sum("equivalence run" in r.getMessage() for r in caplog.records) == 2
    )  # each run's time is logged


def _positions(zoo: Zoo) -> dict[tuple, set]:
    out: dict[tuple, set] = {}
    for fp in zoo.list_blocks():
        out.setdefault(zoo.block_spec(fp).position, set()).add(fp)
    return out


# ---------------------------------------------------------------------- concurrency
def _small_zoo() -> Zoo:
    zoo = Zoo(f"memory://conc-{uuid.uuid4().hex}")
    synthetic_zoo(zoo, bases=2, tunes_per_base=1, layers=3, tuned_layers=1)
    return zoo


def test_overlapping_runs_leave_one_consistent_graph():
    zoo = _small_zoo()
    run_equivalence(zoo)
    before = current_version(zoo)
    view = PublishedGraph(zoo)
    assert view.version == before
    in_compare, go_on = threading.Event(), threading.Event()

    def slow(stage, done, total):
        if stage == "compare" and done == 0:
            in_compare.set()
            go_on.wait(10)

    cfg = tiny_config(layers=3)
    add_model(zoo, "globex", "a", cfg, perturb(random_state(cfg, 0), [2], 0.05, seed=1))
    reports = {}
    first = threading.Thread(
        target=lambda: reports.setdefault("first", run_equivalence(zoo, progress=slow))
    )
    first.start()
    assert in_compare.wait(10)
    # while the first run computes: a second waits, a third skips, serving keeps the old graph
    add_model(zoo, "globex", "b", cfg, perturb(random_state(cfg, 1), [2], 0.05, seed=2))
    second = threading.Thread(target=lambda: reports.setdefault("second", run_equivalence(zoo)))
    second.start()
    skipped = run_equivalence(zoo, if_locked="skip")
    assert skipped.status == "skipped"
    time.sleep(0.3)
    assert not view.refresh() and view.version == before
    assert second.is_alive()  # waiting for the lock
    go_on.set()
    first.join(30)
    second.join(30)
    a, b = reports["first"], reports["second"]
    assert (a.status, b.status) == ("done", "done")
    assert b.graph_version == a.graph_version + 1 == before + 2
    assert view.refresh() and view.version == b.graph_version
    g = load_graph(zoo)
    a_new = set(_models(zoo)["globex/a"].chain) - set(_models(zoo)["platform/base0"].chain)
    b_new = set(_models(zoo)["globex/b"].chain) - set(_models(zoo)["platform/base1"].chain)
    edges = g.equiv_edges()
    assert any(e.substitute in a_new for e in edges) and any(e.substitute in b_new for e in edges)
    assert set(job_state(zoo)["blocks"]) == set(g.blocks())  # state and graph agree


def test_a_publish_racing_the_run_is_merged_not_lost():
    zoo = _small_zoo()
    models = _models(zoo)
    marker = EquivEdge(
        models["platform/base0"].chain[0],
        models["platform/base1"].chain[0],
        0.5,
        "kl_ucb",
        context="marker",
    )

    def race(stage, done, total):
        if stage == "publish" and done == 0:  # another writer publishes just before this run does
            g = BlockGraph.from_zoo(zoo)
            g.add_equiv(marker)
            publish(zoo, g, parent=current_version(zoo))

    report = run_equivalence(zoo, progress=race)
    g = load_graph(zoo)
    assert g.version == report.graph_version == 2
    assert g.get_equiv(marker.substitute, marker.original).context == "marker"
    assert report.edges_added and g.summary()["equiv_edges"] == report.edges_added + 1


# ---------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    from blockllm.demo import ingest_family
    from blockllm.model_sets import build_smollm2_family

    zoo = Zoo((tmp_path_factory.mktemp("smol-equiv") / "zoo").as_uri())
    ingest_family(zoo, build_smollm2_family())
    report = run_equivalence(zoo, settings=Settings(probe_rows=8))
    return zoo, report


@pytest.mark.slow
def test_smollm2_finetune_layers_scored_and_untouched_layers_free(smol_run):
    zoo, report = smol_run
    models = _models(zoo)
    base, last2 = models["platform/smollm2-base"], models["acme/smollm2-last2"]
    changed = [i for i, (a, b) in enumerate(zip(base.chain, last2.chain, strict=True)) if a != b]
    assert changed == [29, 30]  # layers 28 and 29; embedding, 28 layers and the head are the base's
    assert report.new_blocks == 34 and report.compared == 2  # only the two changed layers
    for p in report.pairs:
        assert {p.a, p.b} in ({base.chain[i], last2.chain[i]} for i in changed)
        assert p.weight_distance < 0.1  # a short fine-tune: weights moved little...
        for d in p.directions:
            assert (
                d.metrics["kl"] > 0.01 and d.metrics["agreement"] < 1.0
            )  # ...but outputs did move


@pytest.mark.slow
def test_smollm2_rejects_an_unrelated_layer_and_budget_holds(smol_run, tmp_path):
    zoo, _ = smol_run
    models = _models(zoo)
    base = models["platform/smollm2-base"]
    g = load_graph(zoo)
    planner = ChainPlanner(g, CostModel(penalty_ms=0.1))
    rows = substitution_table(
        zoo,
        planner,
        [("acme/smollm2-last2", None)],
        [0.0, 0.5],
        heldout_prompts=HELDOUT[:16],
        resident=set(base.chain),
    )
    logging.getLogger(__name__).info("\n%s", markdown_table(rows))
    for r in rows:
        assert r.heldout_kl <= r.budget + 1e-6 and r.planned_error <= r.budget
    assert rows[1].substitutions >= 1 and rows[1].bytes_saved > 0
    # an unrelated layer at position 29: a fresh init of the same shapes
    from transformers import AutoModelForCausalLM

    from blockllm.families.llama import hf_config

    torch.manual_seed(0)
    layer = AutoModelForCausalLM.from_config(
        hf_config({**base.config, "num_hidden_layers": 1})
    ).model.layers[0]
    block = zoo.get_block(base.chain[30])
    tensors = {f"0.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    assert {k: v.shape for k, v in tensors.items()} == {
        k: v.shape for k, v in block.tensors.items()
    }
    fp = zoo.put_block(block.spec, tensors)
    zoo.put_manifest(
        dataclasses.replace(
            base,
            tenant="globex",
            name="smol-scrambled",
            visibility="private",
            chain=base.chain[:30] + (fp,) + base.chain[31:],
        )
    )
    report = run_equivalence(zoo, settings=Settings(probe_rows=8))
    assert report.new_blocks == 1 and report.compared == 2
    assert all(p.stage == "prefilter" for p in report.pairs)
    assert not [e for e in load_graph(zoo).equiv_edges() if fp in (e.substitute, e.original)]
