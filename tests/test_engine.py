"""The block engine against transformers: alone, mixed across models, under KV pressure, sampling."""

from __future__ import annotations

import pytest
import torch
from reference import greedy, reference_model

from blockllm.demo import members
from blockllm.engine import Engine
from blockllm.exceptions import InvalidRequestError, InvalidSamplingError, PromptTooLongError, UnknownModelError
from blockllm.types import Request, SamplingParams

PROMPTS = ["3 + 4 =", "reverse: a b c d e f g ->", "next number after 17 is ->", "the", "uppercase: c a t ->"]
N = 16


@pytest.fixture(scope="module")
def tok(tiny_zoo):
    from blockllm.chain import load_tokenizer

    return load_tokenizer(tiny_zoo, "platform/tiny-base")


@pytest.fixture(scope="module")
def refs(tiny_family, tok):
    """transformers' greedy continuation of every prompt, per member."""
    out = {}
    for m in members(tiny_family):
        model = reference_model(m, tiny_family)
        for i, p in enumerate(PROMPTS):
            out[(m.key, i)] = greedy(model, tok(p)["input_ids"], N, tok.pad_token_id)
    return out


def engine_for(zoo, family, **kw) -> Engine:
    eng = Engine(zoo, device="cpu", **kw)
    for m in members(family):
        eng.load(m.key)
    return eng


def req(key, i, tok, **sampling) -> Request:
    return Request(f"{key}#{i}", key, tuple(tok(PROMPTS[i])["input_ids"]), SamplingParams(**{"max_new_tokens": N, **sampling}))


def test_each_variant_alone_matches_transformers(tiny_zoo, tiny_family, tok, refs):
    eng = engine_for(tiny_zoo, tiny_family)
    for m in members(tiny_family):
        for i in range(len(PROMPTS)):
            (out,) = eng.generate([req(m.key, i, tok)])
            assert list(out.token_ids) == refs[(m.key, i)], (m.key, PROMPTS[i])


def test_mixed_batch_of_all_variants_and_lengths_matches_transformers(tiny_zoo, tiny_family, tok, refs):
    eng = engine_for(tiny_zoo, tiny_family)
    batch = [req(m.key, i, tok) for m in members(tiny_family) for i in range(len(PROMPTS))]
    outs = eng.generate(batch)
    for r, out in zip(batch, outs):
        key, i = r.request_id.split("#")
        assert list(out.token_ids) == refs[(key, int(i))], r.request_id
        assert out.finished and out.finish_reason in ("length", "eos")
    stats = eng.stats()
    base_embed = tiny_zoo.get_manifest("platform", "tiny-base").chain[0]
    # The shared embedding ran as one block instance for every variant but the full fine-tune.
    assert stats.block_tokens[base_embed] > 0
    assert stats.kv_pages_used == 0 and stats.running == 0


def test_shared_blocks_are_loaded_once(tiny_zoo, tiny_family):
    eng = engine_for(tiny_zoo, tiny_family)
    manifests = [tiny_zoo.get_manifest(*m.key.split("/")) for m in members(tiny_family)]
    distinct = set().union(*(m.fingerprints() for m in manifests))
    assert eng.stats().weight_bytes == sum(tiny_zoo.block_spec(fp).nbytes for fp in distinct)
    logical = sum(tiny_zoo.block_spec(fp).nbytes for m in manifests for fp in m.chain)
    assert eng.stats().weight_bytes < 0.6 * logical


def test_a_request_joining_midway_is_still_exact(tiny_zoo, tiny_family, tok, refs):
    eng = engine_for(tiny_zoo, tiny_family)
    first = req("acme/tiny-partial-a", 1, tok)
    eng.add_request(first)
    done = {}
    for _ in range(3):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    late = req("globex/tiny-lora-a", 4, tok)
    eng.add_request(late)
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert list(done[first.request_id].token_ids) == refs[("acme/tiny-partial-a", 1)]
    assert list(done[late.request_id].token_ids) == refs[("globex/tiny-lora-a", 4)]


def test_per_block_batch_limit_is_respected(tiny_zoo, tiny_family, tok, refs):
    eng = engine_for(tiny_zoo, tiny_family)
    shared = tiny_zoo.get_manifest("platform", "tiny-base").chain[1]
    eng.set_block_batch_limit(shared, 2)
    batch = [req("platform/tiny-base", i, tok, ignore_eos=True) for i in range(len(PROMPTS))]
    for r in batch:
        eng.add_request(r)
    seen = []
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        seen.append(eng.stats().last_batch.get(shared, 0))
    assert max(seen) == 2
    for r in batch:
        i = int(r.request_id.split("#")[1])
        assert list(outs[r.request_id].token_ids)[: len(refs[("platform/tiny-base", i)])] == refs[("platform/tiny-base", i)]


def test_a_small_kv_pool_makes_admission_wait_and_preempts_by_recompute(tiny_zoo, tiny_family, tok, refs):
    eng = engine_for(tiny_zoo, tiny_family, kv_pages=48, page_size=4)  # 4 layers: about 2 requests at once
    batch = [req(m.key, i, tok) for m in members(tiny_family) for i in (1, 2)]
    outs = eng.generate(batch)
    for r, out in zip(batch, outs):
        key, i = r.request_id.split("#")
        assert list(out.token_ids) == refs[(key, int(i))], r.request_id
    stats = eng.stats()
    assert stats.kv_pages_used == 0
    assert stats.preemptions > 0 or stats.steps > 2 * N  # it had to wait or recompute


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_zoo, tiny_family, tok):
    eng = engine_for(tiny_zoo, tiny_family)
    params = dict(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    (alone,) = eng.generate([req("acme/tiny-full", 0, tok, **params)])
    mates = [req(m.key, 3, tok, temperature=1.0, seed=7) for m in members(tiny_family)]
    prompt = req("acme/tiny-full", 0, tok).prompt_token_ids
    outs = eng.generate([Request("again", "acme/tiny-full", prompt, SamplingParams(max_new_tokens=N, **params)), *mates])
    assert outs[0].token_ids == alone.token_ids
    (other,) = eng.generate([Request("other-seed", "acme/tiny-full", prompt, SamplingParams(max_new_tokens=N, **{**params, "seed": 99}))])
    assert other.token_ids != alone.token_ids or len(alone.token_ids) < 3


def test_top_k_one_is_greedy_and_logprobs_are_reported(tiny_zoo, tiny_family, tok, refs):
    eng = engine_for(tiny_zoo, tiny_family)
    (out,) = eng.generate([req("globex/tiny-partial-b", 2, tok, temperature=0.7, top_k=1, logprobs=True)])
    assert list(out.token_ids) == refs[("globex/tiny-partial-b", 2)]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    assert all(lp <= 0 for lp in out.logprobs)


def test_stop_ids_stop_strings_and_eos(tiny_zoo, tiny_family, tok, refs):
    eng = engine_for(tiny_zoo, tiny_family)
    ref = refs[("platform/tiny-base", 0)]
    (out,) = eng.generate([req("platform/tiny-base", 0, tok, stop_token_ids=(ref[2],), ignore_eos=True)])
    assert out.finish_reason == "stop" and list(out.token_ids) == ref[: ref.index(ref[2]) + 1]
    full_text = tok.decode(ref, skip_special_tokens=True)
    needle = full_text.strip()[:2]
    (out,) = eng.generate([req("platform/tiny-base", 0, tok, stop=(needle,))])
    assert out.finish_reason == "stop" and needle not in out.text
    eos = tok.eos_token_id
    (out,) = eng.generate([Request("eos", "platform/tiny-base", tuple(tok("the")["input_ids"]), SamplingParams(max_new_tokens=200))])
    assert out.finish_reason in ("eos", "length")
    if out.finish_reason == "eos":
        assert out.token_ids[-1] == eos


def test_bad_requests_get_typed_errors_and_the_engine_keeps_serving(tiny_zoo, tiny_family, tok, refs):
    eng = engine_for(tiny_zoo, tiny_family)
    good = req("acme/tiny-full", 0, tok)
    eng.add_request(good)
    eng.step()
    with pytest.raises(UnknownModelError):
        eng.add_request(Request("x1", "acme/nope", (1, 2), SamplingParams()))
    with pytest.raises(PromptTooLongError):
        eng.add_request(Request("x2", "acme/tiny-full", tuple([5] * 600), SamplingParams()))
    with pytest.raises(InvalidRequestError):
        eng.add_request(Request("x3", "acme/tiny-full", (), SamplingParams()))
    with pytest.raises(InvalidRequestError):
        eng.add_request(Request("x4", "acme/tiny-full", (10**7,), SamplingParams()))
    with pytest.raises(InvalidRequestError):
        eng.add_request(good)  # duplicate id while running
    for bad in (dict(max_new_tokens=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=float("nan")), dict(top_k=-1)):
        with pytest.raises(InvalidSamplingError):
            SamplingParams(**bad)
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert list(done[good.request_id].token_ids) == refs[("acme/tiny-full", 0)]


def test_abort_frees_pages(tiny_zoo, tiny_family, tok):
    eng = engine_for(tiny_zoo, tiny_family)
    eng.add_request(req("acme/tiny-full", 1, tok))
    eng.step()
    assert eng.stats().kv_pages_used > 0
    eng.abort("acme/tiny-full#1")
    (out,) = eng.step()
    assert out.finish_reason == "abort" and eng.stats().kv_pages_used == 0


@pytest.mark.slow
def test_smollm2_variants_alone_and_mixed_match_transformers(tmp_path_factory):
    from blockllm.chain import load_tokenizer
    from blockllm.demo import ingest_family
    from blockllm.model_sets import build_smollm2_family
    from zoo_store import Zoo

    family = build_smollm2_family()
    zoo = Zoo((tmp_path_factory.mktemp("smol-engine") / "zoo").as_uri())
    ingest_family(zoo, family)
    eng = engine_for(zoo, family)
    tk = load_tokenizer(zoo, "platform/smollm2-base")
    prompts = ["The capital of France is", "def fibonacci(n):"]
    batch, expected = [], {}
    for m in members(family):
        model = reference_model(m, family)
        for i, p in enumerate(prompts):
            ids = tk(p)["input_ids"]
            rid = f"{m.key}#{i}"
            expected[rid] = greedy(model, ids, 12)
            batch.append(Request(rid, m.key, tuple(ids), SamplingParams(max_new_tokens=12)))
    mixed = eng.generate(batch)
    for r, out in zip(batch, mixed):
        assert list(out.token_ids) == expected[r.request_id], r.request_id
    (alone,) = eng.generate([Request("alone", batch[-1].model, batch[-1].prompt_token_ids, batch[-1].sampling)])
    assert list(alone.token_ids) == expected[batch[-1].request_id]


@pytest.mark.gpu
def test_bf16_on_cuda_agrees_with_transformers_bf16(tiny_zoo, tiny_family, tok):
    from transformers import AutoModelForCausalLM

    from blockllm.model_sets.tasks import get_task, task_examples

    eng = Engine(tiny_zoo, device="cuda", dtype=torch.bfloat16)
    eng.load("platform/tiny-base")
    ref = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.bfloat16).cuda().eval()
    prompts = [p for t in ("next_number", "uppercase", "double", "next_letter") for p, _ in task_examples(get_task(t), 8, 5)]
    assert len(prompts) == 32
    reqs = [Request(str(i), "platform/tiny-base", tuple(tok(p)["input_ids"]), SamplingParams(max_new_tokens=16, ignore_eos=True)) for i, p in enumerate(prompts)]
    same = total = 0
    for r, out in zip(reqs, eng.generate(reqs)):
        expect = greedy(ref, list(r.prompt_token_ids), 16)
        n = min(len(expect), len(out.token_ids))
        total += n
        # count agreement up to the first divergence, then everything after as disagreement
        k = next((j for j in range(n) if expect[j] != out.token_ids[j]), n)
        same += k
    assert same / total >= 0.99, same / total
