"""Adaptive chains in serving: within its owner's budget a model may be served with equivalent
blocks, the response reports each substitution with its score, and no tenant gets another
tenant's private block."""

from __future__ import annotations

import pytest

from blockllm.auth import create_key
from blockllm.client import Client
from blockllm.demo import ingest_family
from blockllm.engine import Engine
from blockllm.types import Request, SamplingParams
from graphs import BlockGraph, set_error_budget
from jobs.equivalence import run_equivalence
from zoo_store import Zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sub_zoo(tmp_path_factory, tiny_family):
    zoo = Zoo((tmp_path_factory.mktemp("subzoo") / "zoo").as_uri())
    ingest_family(zoo, tiny_family)
    run_equivalence(zoo)
    set_error_budget(zoo, "acme", "tiny-full", 1.0)
    return zoo


def test_the_host_serves_a_budgeted_model_with_resident_equivalents(sub_zoo):
    """The model's own blocks are not loaded, the base's are: within budget, the planner picks them."""
    import dask.config

    from blockllm.serving.host import BlockHost

    host = BlockHost(sub_zoo.url)
    host.engine = Engine(sub_zoo, device="cpu")
    host._call = lambda fn, *args: _done(fn(host.engine, *args))  # no stepping thread needed here
    for key in ("platform/tiny-base", "globex/tiny-partial-b"):
        host.engine.load(key)
        host.loaded.add(key)
    own = sub_zoo.get_manifest("acme", "tiny-full")
    with dask.config.set({"blockllm.planner.penalty-ms": 0.1}):  # memory first: substitute when allowed
        serve_as, subs = host._plan_chain(own, "acme")
    assert subs and serve_as != own.key
    graph = BlockGraph.from_zoo(sub_zoo)
    assert sum(s["score"] for s in subs) <= own.error_budget
    for sub in subs:
        assert sub["original"] in own.chain and graph.visible_to(sub["substitute"], "acme")
    tok = host.tokenizer(own.key)
    (out,) = host.engine.generate([Request("r", serve_as, tuple(tok("uppercase: c a t ->")["input_ids"]), SamplingParams(max_new_tokens=6))])
    assert {s["substitute"] for s in subs} <= set(out.blocks)
    # globex may not be served acme's private blocks, whatever the scores
    set_error_budget(sub_zoo, "globex", "tiny-partial-b", 10.0)
    with dask.config.set({"blockllm.planner.penalty-ms": 0.0}):
        _, globex_subs = host._plan_chain(sub_zoo.get_manifest("globex", "tiny-partial-b"), "globex")
    assert all(graph.visible_to(s["substitute"], "globex") for s in globex_subs)
    set_error_budget(sub_zoo, "globex", "tiny-partial-b", 0.0)


def _done(value):
    from concurrent.futures import Future

    f = Future()
    f.set_result(value)
    return f


@pytest.fixture(scope="module")
def served(sub_zoo):
    from distributed import LocalCluster

    keys = {t: create_key(sub_zoo, t) for t in ("acme", "globex")}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        acme = Client(cluster, api_key=keys["acme"], zoo=sub_zoo.url)
        yield acme
        acme.close()


def test_responses_carry_their_substitutions_and_budget_zero_means_none(served, sub_zoo):
    out = served.generate(["uppercase: c a t ->"], "acme/tiny-full", SamplingParams(max_new_tokens=4))[0]
    for sub in out.substitutions:  # with everything resident the own chain is cheapest: usually none
        assert sub["substitute"] in out.blocks
    (base,) = served.generate(["3 + 4 ="], "platform/tiny-base", SamplingParams(max_new_tokens=4))
    assert base.substitutions == ()
    assert set(base.blocks) == set(sub_zoo.get_manifest("platform", "tiny-base").chain)
