"""Ingest and reassembly of the tiny family: byte accounting, exact logits, crashes, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from reference import reference_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer

from blockllm.chain import load_model, load_tokenizer
from blockllm.demo import members
from blockllm.exceptions import (
    BaseNotInZooError,
    CheckpointError,
    InvalidNameError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from blockllm.ingest import ingest
from zoo_store import Zoo

PROMPTS = ["3 + 4 =", "next number after 17 is ->", "reverse: a b c ->", "the cat"]


def snapshot(zoo: Zoo):
    return sorted(zoo.list_blocks(include_incomplete=True)), sorted(m.key for m in zoo.list_models())


@pytest.fixture
def zoo(tmp_path):
    return Zoo((tmp_path / "zoo").as_uri())


# ------------------------------------------------------------------------------- accounting
def test_partial_fine_tunes_store_only_their_changed_layers(zoo, tiny_family):
    base = ingest(zoo, tiny_family.base, tenant="platform", name="base", visibility="shared")
    assert zoo.stats().stored_bytes == base.model_bytes == base.new_bytes
    layer_bytes = {fp: zoo.block_spec(fp).nbytes for fp in base.manifest.chain}

    a = ingest(zoo, tiny_family.partial_a, tenant="acme", name="pa")
    changed_a = [i for i, (x, y) in enumerate(zip(base.manifest.chain, a.manifest.chain, strict=True)) if x != y]
    n = len(base.manifest.chain)
    assert changed_a == [n - 2]  # the last decoder layer only (the head is block n-1)
    assert a.new_blocks == 1
    assert a.new_bytes == layer_bytes[base.manifest.chain[n - 2]]

    b = ingest(zoo, tiny_family.partial_b, tenant="globex", name="pb")
    changed_b = [i for i, (x, y) in enumerate(zip(base.manifest.chain, b.manifest.chain, strict=True)) if x != y]
    assert changed_b == [n - 3, n - 2]
    assert b.new_bytes == layer_bytes[base.manifest.chain[n - 3]] + layer_bytes[base.manifest.chain[n - 2]]

    stats = zoo.stats()
    assert stats.stored_bytes == base.model_bytes + a.new_bytes + b.new_bytes
    assert stats.logical_bytes == 3 * base.model_bytes

    from safetensors.torch import load_file

    lora = ingest(zoo, tiny_family.lora_a, tenant="acme", name="la", base="platform/base")
    own = sum(t.numel() * t.element_size() for t in load_file(tiny_family.lora_a / "adapter_model.safetensors").values())
    assert lora.new_bytes == own
    assert lora.manifest.chain == base.manifest.chain
    assert zoo.stats().stored_bytes == stats.stored_bytes + own


def test_layers_per_block_groups_decoder_layers(zoo, tiny_family):
    report = ingest(zoo, tiny_family.base, tenant="platform", name="base2", layers_per_block=2)
    kinds = [zoo.block_spec(fp).position for fp in report.manifest.chain]
    n_layers = json.loads((tiny_family.base / "config.json").read_text())["num_hidden_layers"]
    assert kinds[0][0] == "embed" and kinds[-1][0] == "head"
    assert [k[1:] for k in kinds[1:-1]] == [(s, min(s + 2, n_layers)) for s in range(0, n_layers, 2)]
    ref = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        assert torch.equal(load_model(zoo, report.manifest)(ids).logits, ref(ids).logits)


# ------------------------------------------------------------------------------- exactness
def test_every_variant_matches_transformers_logits_and_greedy_tokens(tiny_zoo, tiny_family):
    for member in members(tiny_family):
        ref = reference_model(member, tiny_family)
        ours = load_model(tiny_zoo, member.key)
        tok = load_tokenizer(tiny_zoo, member.key)
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            diff = (ours(**batch).logits - ref(**batch).logits).abs().max().item()
        assert diff <= 1e-5, (member.key, diff)
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")
            kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            with torch.no_grad():
                assert torch.equal(ours.generate(**ids, **kw), ref.generate(**ids, **kw)), (member.key, prompt)


def test_bf16_checkpoint_is_stored_and_rebuilt_bit_exactly(zoo, tiny_family, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.bfloat16).eval()
    ref.save_pretrained(tmp_path / "bf16")
    report = ingest(zoo, tmp_path / "bf16", tenant="platform", name="bf16")
    assert {zoo.block_spec(fp).tensors[0].dtype for fp in report.manifest.chain} == {"bfloat16"}
    ours = load_model(zoo, report.manifest)
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    with torch.no_grad():
        a, b = ours(ids).logits.float(), ref(ids).logits.float()
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-2
    assert torch.equal(a, b)  # same bytes, same kernels: identical in fact


def test_tokenizer_roundtrips_through_the_zoo(tiny_zoo, tiny_family):
    ours = load_tokenizer(tiny_zoo, "platform/tiny-base")
    ref = AutoTokenizer.from_pretrained(tiny_family.base)
    text = "reverse: a b c -> c b a"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert ours.chat_template == ref.chat_template


# ------------------------------------------------------------------------------- crashes and races
_SLOW_INGEST = textwrap.dedent(
    """
    import sys, time
    from zoo_store import Zoo
    from blockllm.ingest import ingest
    real = Zoo.put_block
    def slow(self, *a, **k):
        fp = real(self, *a, **k)
        time.sleep(0.4)  # widen the window so the kill lands between blocks
        return fp
    Zoo.put_block = slow
    ingest(Zoo(sys.argv[1]), sys.argv[2], tenant="acme", name="victim")
    """
)


def test_ingest_killed_midway_leaves_no_visible_model_and_rerun_completes(tmp_path, tiny_family):
    url = (tmp_path / "zoo").as_uri()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INGEST, url, str(tiny_family.base)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            published = [p for p in (tmp_path / "zoo").glob("blocks/*/zarr.json") if '"spec"' in p.read_text(errors="ignore")]
            if len(published) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the ingest finished before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    zoo = Zoo(url)
    assert zoo.list_models() == []
    assert not zoo.has_model("acme", "victim")
    assert 2 <= len(zoo.list_blocks()) < 7
    report = ingest(zoo, tiny_family.base, tenant="acme", name="victim")
    assert report.reused_blocks >= 2
    assert [m.key for m in zoo.list_models()] == ["acme/victim"]
    assert zoo.verify() == {}


def test_four_concurrent_ingests_of_one_model_leave_one_copy(tmp_path, tiny_family):
    url = (tmp_path / "zoo").as_uri()
    code = "import sys; from zoo_store import Zoo; from blockllm.ingest import ingest; ingest(Zoo(sys.argv[1]), sys.argv[2], tenant='acme', name=sys.argv[3])"
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(tiny_family.full), f"copy{i}"]) for i in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    zoo = Zoo(url)
    manifests = zoo.list_models()
    assert len(manifests) == 4 and len({m.chain for m in manifests}) == 1
    stats = zoo.stats()
    assert stats.blocks == len(set(manifests[0].chain))
    assert stats.stored_bytes * 4 == stats.logical_bytes
    assert zoo.verify() == {}


# ------------------------------------------------------------------------------- bad inputs
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_inputs(tmp_path: Path, family) -> dict[str, tuple[Path, type[Exception], str]]:
    cases = {}
    d = _copy(family.base, tmp_path / "no_config")
    (d / "config.json").unlink()
    cases["missing config.json"] = (d, CheckpointError, "no config.json")

    d = _copy(family.base, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    cases["unsupported architecture"] = (d, UnsupportedArchitectureError, "llama")

    d = _copy(family.base, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = (d, CheckpointError, "safetensors")

    d = _copy(family.base, tmp_path / "mismatched")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    cases["mismatched safetensors"] = (d, CheckpointError, "do not fit config")

    d = _copy(family.base, tmp_path / "pickle")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle, and never opened")
    cases["pickle checkpoint"] = (d, UnsafeCheckpointError, "never unpickle")

    cases["adapter whose base is not in the zoo"] = (family.lora_a, BaseNotInZooError, "base")
    return cases


def test_bad_checkpoints_get_typed_errors_and_change_nothing(zoo, tiny_family, tmp_path):
    other = ingest(zoo, tiny_family.partial_a, tenant="acme", name="unrelated")  # not the adapters' base
    before = snapshot(zoo)
    for what, (path, error, words) in _bad_inputs(tmp_path, tiny_family).items():
        with pytest.raises(error, match=words):
            ingest(zoo, path, tenant="acme", name="bad")
        assert snapshot(zoo) == before, what
    with pytest.raises(BaseNotInZooError):
        ingest(zoo, tiny_family.lora_a, tenant="acme", name="bad", base="platform/missing")
    assert snapshot(zoo) == before
    assert other.manifest.key in before[1]


@pytest.mark.parametrize("tenant,name", [("../etc", "m"), ("acme", "../../blocks/x"), ("acme", "a/b"), ("", "m"), ("acme", "..")])
def test_names_that_try_path_traversal_are_refused(zoo, tiny_family, tenant, name):
    with pytest.raises(InvalidNameError):
        ingest(zoo, tiny_family.base, tenant=tenant, name=name)
    assert snapshot(zoo) == ([], [])


def test_adapter_base_is_found_by_fingerprints_without_naming_it(zoo, tiny_family):
    base = ingest(zoo, tiny_family.base, tenant="platform", name="base", visibility="shared")
    report = ingest(zoo, tiny_family.lora_b, tenant="globex", name="lb")  # adapter_config names the base dir
    assert report.manifest.base == base.manifest.key
