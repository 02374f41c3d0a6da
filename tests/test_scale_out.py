"""Scale-out on CPU: a LocalCluster of four workers, placement spreading models and replicas,
a chain split across two of them, mixed tenants' traffic; outputs against transformers."""

from __future__ import annotations

import pytest
from clusters import tenant_clients
from reference import greedy, reference_model

from blockllm.demo import members
from blockllm.types import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["3 + 4 =", "reverse: a b c ->", "the"]
N = 8
HOT, SPLIT = "acme/tiny-full", "globex/tiny-partial-b"


@pytest.fixture(scope="module")
def four(tiny_zoo):
    with tenant_clients(tiny_zoo, 4, threads_per_worker=1) as clients:
        yield clients


def test_four_workers_spread_models_replicate_the_hot_one_and_split_a_chain(four, tiny_zoo, tiny_family):
    from blockllm.chain import load_tokenizer
    from blockllm.client import GenerationRequest

    tok = load_tokenizer(tiny_zoo, "platform/tiny-base")
    client = four["platform"]
    keys = [m.key for m in members(tiny_family)]
    manifests = {m.key: m for m in tiny_zoo.list_models()}
    client.capacity_bytes = int(max(tiny_zoo.stats().per_model.values()) * 2.0)  # about two chains a worker
    traffic = {k: 1.0 for k in keys} | {HOT: 50.0}
    plan = client.place(keys, traffic=traffic, split={SPLIT: 2})

    assert len(client.workers) == 4
    assert len(plan.workers_for(HOT)) >= 2, plan.assignments  # hot: replicated
    assert SPLIT in plan.splits and plan.splits[SPLIT][0].worker != plan.splits[SPLIT][1].worker
    used = {w for w, ms in plan.assignments.items() if ms} | {seg.worker for segs in plan.splits.values() for seg in segs}
    assert len(used) >= 3, plan.assignments  # the set does not fit one worker: spread out
    for key in keys:
        assert plan.workers_for(key) or key in plan.splits, (key, plan.unplaced)
    assert plan.explain(manifests[HOT].chain[1], manifests)
    for worker, s in client.stats().items():
        assert s["engine"]["weight_bytes"] <= client.capacity_bytes, worker

    futures = {}
    for m in members(tiny_family):
        for i, p in enumerate(PROMPTS):
            req = GenerationRequest(model=m.key, prompt_token_ids=tok(p)["input_ids"], sampling=SamplingParams(max_new_tokens=N))
            futures[(m.key, i)] = four[m.tenant].submit([req])[0]
    hot_workers = set()
    for (key, i), f in futures.items():
        got = f.result(180)
        member = next(m for m in members(tiny_family) if m.key == key)
        want = greedy(reference_model(member, tiny_family), tok(PROMPTS[i])["input_ids"], N, tok.pad_token_id)
        assert list(got.token_ids) == want, (key, i)
        if key == HOT:
            hot_workers.add(got.worker)
        if key == SPLIT:
            assert got.worker == plan.splits[SPLIT][0].worker  # requests enter at the first segment
    assert len(hot_workers) >= 2  # the replicas share the hot model's requests


def test_one_burst_to_the_hot_model_is_shared_by_its_replicas(four, tiny_zoo, tiny_family):
    """Requests routed in one submit count against their worker at once, and ties go round the
    replicas: a burst of 16 to the replicated model lands evenly on every replica (before, the whole
    burst went to the first one), and every output is still transformers' own."""
    from blockllm.chain import load_tokenizer
    from blockllm.client import GenerationRequest

    tok = load_tokenizer(tiny_zoo, "platform/tiny-base")
    client = four["acme"]  # no plan of its own: it routes by what the workers hold
    replicas = [w for w, models in client.loaded().items() if HOT in models]
    assert len(replicas) >= 2, replicas  # placed by the test above
    ids = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(16)]
    reqs = [GenerationRequest(model=HOT, prompt_token_ids=x, sampling=SamplingParams(max_new_tokens=N)) for x in ids]
    served: dict[str, int] = {}
    member = next(m for m in members(tiny_family) if m.key == HOT)
    for x, f in zip(ids, client.submit(reqs), strict=True):
        got = f.result(180)
        assert list(got.token_ids) == greedy(reference_model(member, tiny_family), x, N, tok.pad_token_id)
        served[got.worker] = served.get(got.worker, 0) + 1
    assert set(served) == set(replicas) and max(served.values()) - min(served.values()) <= 1, served
