"""A corpus of malformed inputs (tests/data/malformed.json), each with the typed error it must get."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import blockllm.exceptions as bexc
import zoo_store.exceptions as zexc
from blockllm.families import get_family
from blockllm.ingest import ingest
from zoo_store import Manifest, Zoo, validate_name

CORPUS = json.loads((Path(__file__).parent / "data" / "malformed.json").read_text())


def error_class(name: str) -> type[Exception]:
    return getattr(bexc, name, None) or getattr(zexc, name)


def test_the_corpus_is_large_and_varied():
    assert len(CORPUS) >= 50
    assert {c["kind"] for c in CORPUS} >= {"manifest", "name", "url", "adapter_config", "config"}


@pytest.mark.parametrize("case", [c for c in CORPUS if c["kind"] in ("manifest", "name", "url")], ids=lambda c: f"{c['kind']}:{c['what']}")
def test_parsing_errors(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative URL must not litter the checkout
    err = error_class(case["error"])
    with pytest.raises(err):
        if case["kind"] == "manifest":
            Manifest.from_dict(case["input"])
        elif case["kind"] == "name":
            validate_name(case["input"], "tenant")
        else:
            Zoo(case["input"])


@pytest.fixture(scope="module")
def adapter_parts(tiny_zoo, tiny_family):
    base = tiny_zoo.get_manifest("platform", "tiny-base")
    chain = [(fp, tiny_zoo.block_spec(fp)) for fp in base.chain]
    state = load_file(tiny_family.lora_a / "adapter_model.safetensors")
    return base.config, chain, state


@pytest.mark.parametrize("case", [c for c in CORPUS if c["kind"] == "adapter_config"], ids=lambda c: c["what"])
def test_adapter_configs(case, adapter_parts):
    config, chain, state = adapter_parts
    with pytest.raises(error_class(case["error"])):
        get_family("llama").partition_adapter(config, case["input"], state, chain)


@pytest.mark.parametrize("case", [c for c in CORPUS if c["kind"] == "config"], ids=lambda c: c["what"])
def test_checkpoint_configs_change_nothing(case, tiny_family, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_family.base, d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in case["input"].items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    zoo = Zoo((tmp_path / "zoo").as_uri())
    with pytest.raises(error_class(case["error"])):
        ingest(zoo, d, tenant="acme", name="bad")
    assert zoo.list_blocks(include_incomplete=True) == [] and zoo.list_models() == []


@pytest.mark.parametrize("case", [c for c in CORPUS if c["kind"] in ("request", "sampling")], ids=lambda c: f"{c['kind']}:{c['what']}")
def test_wire_requests_and_sampling(case):
    """What a block host gets over the wire (serving/wire.py parse_request), each with its typed error."""
    from blockllm.serving.wire import parse_request

    raw = case["input"] if case["kind"] == "request" else {"request_id": "r", "model": "acme/m", "prompt": "hi", "sampling": case["input"]}
    with pytest.raises(error_class(case["error"])):
        parse_request(raw)
