"""Serving on a real Dask LocalCluster: block hosts, placement as Dask tasks, the client, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from blockllm.auth import create_key
from blockllm.client import Client, GenerationRequest
from blockllm.demo import members
from blockllm.exceptions import AuthenticationError, ForbiddenError, OverloadedError
from blockllm.types import SamplingParams
from zoo_store import ModelNotFoundError

pytestmark = pytest.mark.slow

PROMPTS = ["3 + 4 =", "reverse: a b c ->", "next number after 17 is ->", "the"]


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def keys(tiny_zoo):
    return {t: create_key(tiny_zoo, t) for t in ("acme", "globex", "platform")}


@pytest.fixture(scope="module")
def clients(cluster, tiny_zoo, keys):
    import distributed

    dask = distributed.Client(cluster)
    out = {t: Client(dask, api_key=k, zoo=tiny_zoo.url) for t, k in keys.items()}
    yield out
    dask.close()


def reference_greedy(member, family, prompt: str, n: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family.base)
    if member.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family.base), member.path)
    else:
        model = AutoModelForCausalLM.from_pretrained(member.path)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_mixed_batches_of_several_tenants_match_transformers(clients, tiny_family):
    n = 8
    sampling = SamplingParams(max_new_tokens=n)
    futures = {}
    for m in members(tiny_family):
        for prompt in PROMPTS[:2]:
            futures[(m, prompt)] = clients[m.tenant].submit([GenerationRequest(model=m.key, prompt=prompt, sampling=sampling)])[0]
    for (m, prompt), f in futures.items():
        got = f.result(300)
        assert list(got.token_ids) == reference_greedy(m, tiny_family, prompt, n), (m.key, prompt)
        assert got.blocks  # the response says which blocks it passed through


def test_scheduler_task_count_does_not_grow_with_tokens(clients):
    client = clients["acme"]
    client.generate(["warm up"], "acme/tiny-full", SamplingParams(max_new_tokens=2))  # placement done

    def transitions(dask_scheduler):
        return dask_scheduler.transition_counter

    before = client.dask.run_on_scheduler(transitions)
    client.generate(PROMPTS, "acme/tiny-full", SamplingParams(max_new_tokens=4, ignore_eos=True))
    short = client.dask.run_on_scheduler(transitions) - before
    before = client.dask.run_on_scheduler(transitions)
    client.generate(PROMPTS, "acme/tiny-full", SamplingParams(max_new_tokens=32, ignore_eos=True))
    long = client.dask.run_on_scheduler(transitions) - before
    assert long == short  # 8x the tokens, not one more task


def test_bad_inputs_get_typed_errors_and_the_cluster_keeps_serving(clients, keys, tiny_zoo, cluster):
    acme = clients["acme"]
    with pytest.raises(ModelNotFoundError):
        acme.generate(["x"], "acme/no-such-model")
    with pytest.raises(ForbiddenError):
        acme.generate(["x"], "globex/tiny-partial-b")
    stranger = Client(acme.dask, api_key="not-a-key", zoo=tiny_zoo.url)
    with pytest.raises(AuthenticationError):
        stranger.generate(["x"], "platform/tiny-base")
    with pytest.raises(ValueError):
        acme.submit([])
    with pytest.raises(OverloadedError):
        acme.submit([GenerationRequest(model="platform/tiny-base", prompt="x")] * 100_000)
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError):  # PromptTooLongError is a ValueError
        acme.generate(["a b c " * 2000], "platform/tiny-base")
    ok = acme.generate(["3 + 4 ="], "platform/tiny-base", SamplingParams(max_new_tokens=3))
    assert len(ok[0].token_ids) == 3


def test_placement_follows_traffic(clients, tiny_zoo):
    client = clients["platform"]
    manifests = {m.key: m for m in tiny_zoo.list_models()}
    one_model = max(tiny_zoo.stats().per_model.values())
    client.capacity_bytes = int(one_model * 1.3)  # a worker holds about one full model
    hot_a = {"acme/tiny-full": 100.0, "globex/tiny-partial-b": 1.0}
    plan = client.place(sorted(hot_a), traffic=hot_a)
    assert len(plan.workers_for("acme/tiny-full")) == 2  # hot: a replica on each worker
    hot_b = {"acme/tiny-full": 1.0, "globex/tiny-partial-b": 100.0}
    plan = client.place(sorted(hot_b), traffic=hot_b)
    assert len(plan.workers_for("globex/tiny-partial-b")) == 2
    stats = client.stats()
    for s in stats.values():
        assert "globex/tiny-partial-b" in s["models"]
        assert s["engine"]["weight_bytes"] <= client.capacity_bytes
    assert plan.explain(manifests["globex/tiny-partial-b"].chain[-2], manifests)
