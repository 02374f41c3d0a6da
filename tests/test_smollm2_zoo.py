"""The real pretrained family (SmolLM2-135M-Instruct from GGUF) through the zoo: exact reassembly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from blockllm.chain import load_model, load_tokenizer
from blockllm.demo import ingest_family, members
from blockllm.ingest import ingest
from zoo_store import Zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_family():
    from blockllm.model_sets import build_smollm2_family

    return build_smollm2_family()


@pytest.fixture(scope="module")
def smol_zoo(tmp_path_factory, smol_family):
    zoo = Zoo((tmp_path_factory.mktemp("smolzoo") / "zoo").as_uri())
    ingest_family(zoo, smol_family)
    return zoo


def _reference(member, family):
    if member.is_adapter:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
        return PeftModel.from_pretrained(base, member.path).eval()
    return AutoModelForCausalLM.from_pretrained(member.path, dtype=torch.float32).eval()


def test_gguf_ingest_reproduces_the_gguf_model(tmp_path):
    from blockllm.model_sets import fetch_smollm2_gguf

    gguf = fetch_smollm2_gguf()
    zoo = Zoo((tmp_path / "zoo").as_uri())
    report = ingest(zoo, gguf, tenant="platform", name="smol-gguf", visibility="shared")
    assert len(report.manifest.chain) == 32  # embed + 30 layers + head (tied: norm only)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = load_model(zoo, report.manifest)
    tok = load_tokenizer(zoo, report.manifest)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert (ours(**ids).logits - ref(**ids).logits).abs().max().item() <= 1e-5
        out = ours.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_smollm2_variants_share_blocks_and_match_transformers(smol_zoo, smol_family):
    stats = smol_zoo.stats()
    base = smol_zoo.get_manifest("platform", "smollm2-base")
    last2 = smol_zoo.get_manifest("acme", "smollm2-last2")
    assert sum(a != b for a, b in zip(base.chain, last2.chain, strict=True)) == 2
    assert stats.stored_bytes < 1.2 * stats.per_model["platform/smollm2-base"]
    prompts = ["The capital of France is", "def add(a, b):"]
    for member in members(smol_family):
        ref = _reference(member, smol_family)
        ours = load_model(smol_zoo, member.key)
        tok = load_tokenizer(smol_zoo, member.key)
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                assert (ours(**ids).logits - ref(**ids).logits).abs().max().item() <= 1e-5, member.key
                kw = dict(max_new_tokens=16, do_sample=False)
                assert torch.equal(ours.generate(**ids, **kw), ref.generate(**ids, **kw)), member.key
