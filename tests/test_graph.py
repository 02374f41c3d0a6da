"""The block graph: nodes and edges from manifests, equiv edges, node-link JSON, versions, the lock."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import uuid

import pytest
from synthetic_zoo import add_model, fake_fp, fake_spec, random_state, tiny_config

from graphs import (
    NEXT,
    BlockGraph,
    EquivEdge,
    GraphFormatError,
    GraphLockTimeoutError,
    GraphNotFoundError,
    GraphVersionConflictError,
    IncomparableBlocksError,
    PublishedGraph,
    ZooLock,
    current_version,
    list_versions,
    load_graph,
    load_or_build,
    prune,
    publish,
    rollback,
)
from zoo_store import Manifest, Zoo


@pytest.fixture
def zoo() -> Zoo:
    return Zoo(f"memory://graph-{uuid.uuid4().hex}")


def _manifest(tenant, name, chain, *, visibility="private", adapters=()):
    from zoo_store import AdapterRef

    return Manifest(
        tenant=tenant,
        name=name,
        family="llama",
        chain=tuple(chain),
        config={},
        visibility=visibility,
        adapters=tuple(AdapterRef(i, fp) for i, fp in adapters),
    )


SPECS = {fake_fp(i): fake_spec("layers", i % 3, i % 3 + 1) for i in range(30)}
SPECS[fake_fp(99)] = fake_spec("adapter", 1, 2)


def _graph(*manifests) -> BlockGraph:
    return BlockGraph.from_manifests(manifests, SPECS.__getitem__)


# ---------------------------------------------------------------------- nodes and chain edges
def test_tiny_family_graph_shares_untouched_blocks(tiny_zoo):
    g = BlockGraph.from_zoo(tiny_zoo)
    models = {m.key: m for m in tiny_zoo.list_models()}
    base = models["platform/tiny-base"]
    partial_a = models["acme/tiny-partial-a"]
    # partial_a trained only its last layer: every other block is the base's own node
    same = [i for i, (a, b) in enumerate(zip(base.chain, partial_a.chain, strict=True)) if a == b]
    assert same == [0, 1, 2, 3, 5]
    for fp in base.chain:
        node = g.node(fp)
        assert node["visibility"] == "shared" and "platform/tiny-base" in node["models"]
    own = g.node(partial_a.chain[4])
    assert own["models"] == ["acme/tiny-partial-a"]
    assert (own["visibility"], own["owner"], own["tenants"]) == ("private", "acme", ["acme"])
    assert (
        own["position"] == ["layers", 3, 4]
        and own["nbytes"] == tiny_zoo.block_spec(partial_a.chain[4]).nbytes
    )
    # the next edge base layer 2 -> base layer 3 is shared by every model using both
    data = g.g.edges[base.chain[3], base.chain[4], NEXT]
    assert {"platform/tiny-base", "globex/tiny-lora-a"} <= set(data["models"])
    assert "acme/tiny-partial-a" not in data["models"]
    assert g.summary()["adapter_edges"] == sum(len(m.adapters) for m in models.values())
    assert len(g) == len({fp for m in models.values() for fp in m.fingerprints()})


def test_visibility_derivation():
    a, b, c, d = (fake_fp(i) for i in range(4))
    g = _graph(
        _manifest("acme", "m1", [a, b]),
        _manifest("globex", "m2", [a, c]),
        _manifest("platform", "base", [d, c], visibility="shared"),
    )
    assert (g.node(b)["visibility"], g.node(b)["owner"]) == ("private", "acme")
    # used only by private models of two tenants: private to both, no single owner
    assert (g.node(a)["visibility"], g.node(a)["owner"], g.node(a)["tenants"]) == (
        "private",
        None,
        ["acme", "globex"],
    )
    assert g.node(c)["visibility"] == "shared"  # a shared model uses it
    assert g.visible_to(b, "acme") and not g.visible_to(b, "globex")
    assert g.visible_to(a, "globex") and not g.visible_to(a, "initech")
    assert g.visible_to(c, "initech") and not g.visible_to(fake_fp(77), "acme")


def test_adapter_nodes_and_edges():
    a, b, lora = fake_fp(0), fake_fp(1), fake_fp(99)
    g = _graph(_manifest("acme", "m", [a, b], adapters=[(1, lora)]))
    assert g.node(lora)["kind"] == "adapter"
    assert g.g.has_edge(lora, b, "adapter")
    assert dict(g.groups()).keys() == {g.node(a)["group"], g.node(b)["group"]}


# ---------------------------------------------------------------------- equivalence edges
def test_equiv_edges_add_replace_remove():
    a, b, c = fake_fp(1), fake_fp(4), fake_fp(7)  # all at layers 1-2
    g = _graph(
        _manifest("acme", "m1", [a]), _manifest("acme", "m2", [b]), _manifest("acme", "m3", [c])
    )
    g.add_equiv(EquivEdge(a, b, 0.3, "kl_ucb", {"kl": 0.2}, "probe-x", context="acme/m2"))
    g.add_equiv(EquivEdge(c, b, 0.1, "kl_ucb"))
    g.add_equiv(EquivEdge(a, b, 0.25, "kl_ucb"))  # re-measured: replaces, never duplicates
    assert [(e.substitute, e.score) for e in g.substitutes_for(b)] == [(c, 0.1), (a, 0.25)]
    assert g.summary()["equiv_edges"] == 2
    edge = g.get_equiv(a, b)
    assert edge.metric == "kl_ucb" and edge.date  # dated when added
    assert g.get_equiv(b, a) is None  # directed: a stands in for b, not the reverse
    assert g.remove_equiv(a, b) and not g.remove_equiv(a, b)
    assert [e.substitute for e in g.equiv_edges()] == [c]


def test_equiv_edges_between_incomparable_blocks_are_refused():
    a, other_pos = fake_fp(1), fake_fp(2)
    g = _graph(_manifest("acme", "m", [a, other_pos]))
    with pytest.raises(IncomparableBlocksError):
        g.add_equiv(EquivEdge(a, other_pos, 0.1, "kl"))
    with pytest.raises(KeyError):
        g.add_equiv(EquivEdge(a, fake_fp(55), 0.1, "kl"))


@pytest.mark.parametrize("score", [-0.1, math.nan, math.inf, "0.1"])
def test_equiv_scores_must_be_finite_and_non_negative(score):
    with pytest.raises(ValueError):
        EquivEdge(fake_fp(1), fake_fp(4), score, "kl")


def test_node_link_json_round_trip():
    a, b, c = fake_fp(1), fake_fp(4), fake_fp(2)
    g = _graph(
        _manifest("acme", "m1", [a, c]), _manifest("globex", "m2", [b, c], visibility="shared")
    )
    g.add_equiv(
        EquivEdge(
            b, a, 0.05, "kl_ucb", {"kl": 0.04, "agreement": 0.97}, "probe-1", context="acme/m1"
        )
    )
    data = json.loads(json.dumps(g.to_json()))  # must be plain JSON
    h = BlockGraph.from_json(data)
    assert sorted(h.g.edges(keys=True, data=True)) == sorted(g.g.edges(keys=True, data=True))
    assert dict(h.g.nodes(data=True)) == dict(g.g.nodes(data=True))
    assert h.models() == g.models()
    assert h.get_equiv(b, a).metrics == {"kl": 0.04, "agreement": 0.97}


@pytest.mark.parametrize(
    "doc", [None, [], {"nodes": []}, {"nodes": [], "edges": [], "graph": {"schema": 99}}]
)
def test_malformed_graph_documents_raise_a_typed_error(doc):
    with pytest.raises(GraphFormatError):
        BlockGraph.from_json(doc)


# ---------------------------------------------------------------------- versions in the zoo
def _small_zoo(zoo: Zoo) -> tuple[Manifest, Manifest]:
    cfg = tiny_config(layers=2)
    base = random_state(cfg, 0)
    m1 = add_model(zoo, "platform", "base", cfg, base, visibility="shared")
    from synthetic_zoo import perturb

    m2 = add_model(zoo, "acme", "tuned", cfg, perturb(base, [1], 0.1, 1))
    return m1, m2


def test_publish_load_prune_and_rollback(zoo):
    m1, m2 = _small_zoo(zoo)
    with pytest.raises(GraphNotFoundError):
        load_graph(zoo)
    assert current_version(zoo) == 0 and load_or_build(zoo).summary()["models"] == 2
    g = BlockGraph.from_zoo(zoo)
    assert publish(zoo, g, parent=0, keep=3) == 1 and g.version == 1
    g.add_equiv(EquivEdge(m1.chain[2], m2.chain[2], 0.2, "kl_ucb"))
    assert publish(zoo, g, parent=1, keep=3) == 2
    for v in range(3, 7):
        assert publish(zoo, g, parent=v - 1, keep=3) == v
    versions = list_versions(zoo)
    assert [v.version for v in versions] == [4, 5, 6] and versions[-1].current
    loaded = load_graph(zoo)
    assert loaded.version == 6 and loaded.summary()["equiv_edges"] == 1
    assert load_graph(zoo, 4).version == 4
    with pytest.raises(GraphNotFoundError):
        load_graph(zoo, 1)  # pruned
    assert rollback(zoo, 4) == 7 and load_graph(zoo).version == 7
    assert prune(zoo, keep=1) and [v.version for v in list_versions(zoo)] == [7]


def test_publish_with_a_stale_parent_is_refused(zoo):
    _small_zoo(zoo)
    g = BlockGraph.from_zoo(zoo)
    publish(zoo, g, parent=0)
    publish(zoo, g, parent=1)
    with pytest.raises(GraphVersionConflictError) as err:
        publish(zoo, g, parent=1)
    assert (err.value.expected, err.value.found) == (1, 2)
    assert current_version(zoo) == 2  # nothing written over the newer graph


def test_serving_keeps_its_graph_until_a_new_one_is_published(zoo):
    m1, m2 = _small_zoo(zoo)
    view = PublishedGraph(zoo)
    assert view.version == 0 and view.graph.summary()["models"] == 2  # none published: own chains
    g = BlockGraph.from_zoo(zoo)
    publish(zoo, g, parent=0)
    assert view.refresh() and view.version == 1
    held = view.graph
    g.add_equiv(EquivEdge(m1.chain[2], m2.chain[2], 0.2, "kl_ucb"))
    # a writer that has written its version document but not yet the pointer: readers see v1
    zoo.put_json(
        "graphs/v000002-0badc0de", {**g.to_json(), "graph": {**g.to_json()["graph"], "version": 2}}
    )
    assert not view.refresh() and view.graph is held
    publish(zoo, g, parent=1)
    assert view.refresh() and view.graph is not held and view.graph.summary()["equiv_edges"] == 1
    assert held.summary()["equiv_edges"] == 0  # an old reference stays intact


def test_file_zoo_graph_survives_reopening(tmp_path):
    url = (tmp_path / "zoo").as_uri()
    zoo = Zoo(url)
    _small_zoo(zoo)
    publish(zoo, BlockGraph.from_zoo(zoo), parent=0)
    assert load_graph(Zoo(url, read_only=True)).version == 1
    shutil.rmtree(tmp_path / "zoo")


# ---------------------------------------------------------------------- the lock
def test_zoo_lock_excludes_skips_and_times_out(zoo):
    first = ZooLock(zoo, "job", settle=0.01, poll=0.02)
    second = ZooLock(zoo, "job", settle=0.01, poll=0.02)
    assert first.acquire(wait=False)
    assert not second.acquire(wait=False)
    with pytest.raises(GraphLockTimeoutError, match="pid"):
        second.acquire(timeout=0.1)
    first.release()
    assert second.acquire(wait=False)
    second.release()
    assert ZooLock(zoo, "job").holder() is None


def test_zoo_lock_waits_for_the_holder(zoo):
    first = ZooLock(zoo, "job", settle=0.01, poll=0.02)
    first.acquire()
    got = []

    def waiter():
        with ZooLock(zoo, "job", settle=0.01, poll=0.02):
            got.append(time.monotonic())

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)
    released = time.monotonic()
    first.release()
    t.join(5)
    assert got and got[0] >= released


def test_an_expired_lease_can_be_taken_over(zoo):
    dead = ZooLock(zoo, "job", ttl=0.05, settle=0.01)
    dead.acquire()
    dead._stop.set()  # a crashed holder: no more heartbeats
    dead._beat.join()
    time.sleep(0.1)
    taker = ZooLock(zoo, "job", settle=0.01)
    assert taker.acquire(wait=False)
    taker.release()
