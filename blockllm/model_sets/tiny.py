"""A tiny Llama family (base, partial and full fine-tunes, LoRA adapters) trained locally in seconds,
plus the helpers it shares with `smollm2` (training loop, locked atomic cache builds)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from blockllm.config import cache_dir
from blockllm.model_sets.tasks import (
    evaluate_accuracy,
    synthetic_corpus,
    synthetic_loss,
    task_batches,
)

logger = logging.getLogger(__name__)

__all__ = [
    "VERSION",
    "TinyFamily",
    "build_tiny_family",
    "default_tiny_root",
    "train_tiny_tokenizer",
]

VERSION = 1
MARKER = ".complete.json"
TASK_FILE = "blockllm_task.json"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
# variant -> (task, trainable part, steps, lr); part is "last<k>" (last k layers), "all" or "lora".
# Steps and learning rates were tuned so the whole build fits in about a minute on 2 cores.
_PLAN: dict[str, tuple[str, str, int, float]] = {
    "partial_a": ("next_number", "last1", 400, 5e-3),
    "partial_b": ("previous_number", "last2", 300, 3e-3),
    "full": ("uppercase", "all", 200, 3e-3),
    "lora_a": ("double", "lora", 150, 1e-2),
    "lora_b": ("next_letter", "lora", 150, 1e-2),
}
# adapter -> (rank, alpha, target modules)
_LORA: dict[str, tuple[int, int, list[str]]] = {
    "lora_a": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "lora_b": (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
}
_BASE_STEPS, _BASE_ROWS, _BASE_WIDTH, _BASE_LR = 260, 12, 64, 5e-3
_TASK_BATCH = 16


@dataclass(frozen=True)
class TinyFamily:
    """Paths of a built tiny family: HF model dirs `base`, `partial_a`, `partial_b`, `full`; PEFT dirs `lora_a`, `lora_b`."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def partial_a(self) -> Path:
        return self.root / "partial_a"

    @property
    def partial_b(self) -> Path:
        return self.root / "partial_b"

    @property
    def full(self) -> Path:
        return self.root / "full"

    @property
    def lora_a(self) -> Path:
        return self.root / "lora_a"

    @property
    def lora_b(self) -> Path:
        return self.root / "lora_b"

    @property
    def tasks(self) -> dict[str, str]:
        """Fine-tuned variant or adapter name -> task name (see `tasks.TASKS`)."""
        return {name: plan[0] for name, plan in _PLAN.items()}

    def variants(self) -> dict[str, Path]:
        """Full HF model directories, base included."""
        return {n: self.root / n for n in ("base", "partial_a", "partial_b", "full")}

    def adapters(self) -> dict[str, Path]:
        """PEFT LoRA adapter directories (trained on `base`)."""
        return {n: self.root / n for n in ("lora_a", "lora_b")}


# --------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (default: min(cpu count, 8))."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or min(os.cpu_count() or 1, 8))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' tqdm bars (loading/saving shards) for the duration."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def locked_build(root: Path, build: Callable[[Path], dict[str, Any]], *, force: bool) -> None:
    """Build into a temp dir beside `root` under a file lock, write the marker last, rename into place.

    Returns at once when `root` already holds a complete build (unless `force`). `build(tmp)` fills
    `tmp` and returns metadata stored in the marker.
    """
    marker = root / MARKER
    if marker.exists() and not force:
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if marker.exists() and not force:
            logger.info("%s was built by another process meanwhile", root)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
        try:
            t0 = time.perf_counter()
            meta = build(tmp)
            meta["build_seconds"] = round(time.perf_counter() - t0, 2)
            _honour_umask(tmp)
            (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("built %s in %.1f s", root, meta["build_seconds"])


def _honour_umask(tree: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors writes 0600 files; make the cache readable as usual."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [tree, *tree.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_task_file(path: Path, **info: Any) -> None:
    (path / TASK_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def retarget_adapter(adapter_dir: Path, base_dir: Path) -> None:
    """Point a saved adapter's `base_model_name_or_path` at `base_dir` (its final, not temp, path)."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def train_steps(
    model: Any, batches: list[dict[str, torch.Tensor]], *, lr: float, name: str, warmup: float = 0.1
) -> tuple[float, float]:
    """AdamW over the trainable params with warmup and linear decay; returns (first, last-10 mean) loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(batches)
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / n_warm, max(0.1, (steps - s) / max(1, steps - n_warm)))
    )
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    for batch in batches:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    first, last = losses[0], sum(losses[-10:]) / len(losses[-10:])
    logger.info("%s: %d steps, loss %.3f -> %.3f", name, steps, first, last)
    return first, last


def make_peft_model(model: Any, lora_config: Any) -> Any:
    """`peft.get_peft_model`, hiding the FutureWarning that peft 0.21 triggers in transformers 5."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, lora_config)


def set_trainable(model: Any, part: str) -> None:
    """Freeze everything except `part`: "all" or "last<k>" (the last k decoder layers)."""
    if part == "all":
        model.requires_grad_(True)
        return
    k = int(part.removeprefix("last"))
    model.requires_grad_(False)
    for layer in model.model.layers[-k:]:
        layer.requires_grad_(True)


# --------------------------------------------------------------------------- tiny family


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """Byte-level BPE (digits split one per token) wrapped as a `PreTrainedTokenizerFast`; adds `<s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )


def _lm_batches(
    tokenizer: Any, texts: list[str], *, steps: int, rows: int, width: int
) -> list[dict[str, torch.Tensor]]:
    """Pack `<s> sentence </s>` sequences back to back into `steps` batches of `rows` x `width` tokens."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= steps * rows * width:
            break
    if len(stream) < steps * rows * width:
        raise ValueError("not enough text to pack")
    ids = torch.tensor(stream[: steps * rows * width]).view(steps, rows, width)
    return [{"input_ids": x, "labels": x} for x in ids]


def _save_model(model: Any, tokenizer: Any, path: Path, **info: Any) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    write_task_file(path, **info)


def _build_tiny(tmp: Path, final_root: Path, seed: int = 0) -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    tokenizer = train_tiny_tokenizer(synthetic_corpus(20_000, seed=seed + 1))
    logger.info("tokenizer: %d tokens", len(tokenizer))

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    base = LlamaForCausalLM(config)
    texts = synthetic_corpus(_BASE_STEPS * _BASE_ROWS * _BASE_WIDTH // 4, seed=seed + 2)
    batches = _lm_batches(tokenizer, texts, steps=_BASE_STEPS, rows=_BASE_ROWS, width=_BASE_WIDTH)
    first, last = train_steps(base, batches, lr=_BASE_LR, name="base")
    heldout = synthetic_loss(base, tokenizer)
    logger.info(
        "base: held-out synthetic loss %.3f, trained in %.1f s", heldout, time.perf_counter() - t0
    )
    base.name_or_path = str(tmp / "base")  # peft's save looks for the base's config.json there
    _save_model(
        base, tokenizer, tmp / "base", task="synthetic", initial_loss=first, final_loss=last,
        heldout_loss=heldout,
    )  # fmt: skip

    base_acc = {plan[0]: evaluate_accuracy(base, tokenizer, plan[0]) for plan in _PLAN.values()}
    meta: dict[str, Any] = {"version": VERSION, "base_loss": [first, last, heldout], "accuracy": {}}
    for i, (name, (task, part, steps, lr)) in enumerate(_PLAN.items()):
        t1 = time.perf_counter()
        torch.manual_seed(seed + 100 + i)
        model = copy.deepcopy(base)
        if part == "lora":
            rank, alpha, targets = _LORA[name]
            lora = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                target_modules=targets,
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            )
            model = make_peft_model(model, lora)
        else:
            set_trainable(model, part)
        batches = task_batches(
            tokenizer, task, steps=steps, batch_size=_TASK_BATCH, seed=seed + 1000 + i
        )
        train_steps(model, batches, lr=lr, name=f"{name} ({part}, {task})")
        acc = evaluate_accuracy(model, tokenizer, task)
        logger.info(
            "%s on %s: accuracy %.3f (base %.3f), %.1f s",
            name, task, acc, base_acc[task], time.perf_counter() - t1,
        )  # fmt: skip
        meta["accuracy"][name] = {"task": task, "base": base_acc[task], "tuned": acc}
        info = {"task": task, "trained": part, "accuracy": acc, "base_accuracy": base_acc[task]}
        if part == "lora":
            model.save_pretrained(tmp / name, safe_serialization=True)
            retarget_adapter(tmp / name, final_root / "base")
            tokenizer.save_pretrained(tmp / name)
            write_task_file(tmp / name, base="base", **info)
        else:
            _save_model(model, tokenizer, tmp / name, base="base", **info)
    return meta


def default_tiny_root() -> Path:
    return cache_dir() / "model_sets" / f"tiny-v{VERSION}"


def build_tiny_family(root: Path | None = None, *, force: bool = False) -> TinyFamily:
    """Build (or find cached) the tiny family under `root` (default: `<cache>/model_sets/tiny-v<VERSION>`)."""
    root = Path(root) if root is not None else default_tiny_root()
    # One thread: this model's matmuls are too small to gain from more (measured slower on 2 cores).
    with torch_threads(1), quiet_progress():
        locked_build(root, lambda tmp: _build_tiny(tmp, root), force=force)
    return TinyFamily(root)
