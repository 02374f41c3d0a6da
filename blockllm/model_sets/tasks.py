"""Synthetic text for base pre-training, tenant tasks for fine-tuning, and their evaluation; all of it
generated from a seeded `random.Random`, so it is deterministic and needs no download."""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "Task",
    "evaluate_accuracy",
    "get_task",
    "synthetic_corpus",
    "synthetic_loss",
    "synthetic_sentence",
    "encode_task_batch",
    "task_batches",
    "task_examples",
]

LETTERS = string.ascii_lowercase
FACTS: dict[str, str] = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
    "blood": "red", "sea": "blue", "milk": "white", "leaf": "green", "night": "dark",
    "fire": "hot", "ice": "cold", "lemon": "sour", "honey": "sweet", "rock": "hard",
    "moon": "bright", "apple": "red", "banana": "yellow", "cloud": "grey", "pillow": "soft",
    "desert": "dry", "river": "wet", "mountain": "high", "valley": "low", "feather": "light",
    "elephant": "big", "mouse": "small", "turtle": "slow", "rabbit": "fast", "owl": "wise",
}  # fmt: skip


# --------------------------------------------------------------------------- synthetic language


def _letters(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))]


def _count_sentence(rng: random.Random) -> str:
    start, step = rng.randint(0, 90), 1 if rng.random() < 0.8 else 2
    return "count: " + " ".join(str(start + step * i) for i in range(rng.randint(3, 8)))


def _arith_sentence(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.7:
        return f"{a} + {b} = {a + b}"
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b}"


def _alphabet_sentence(rng: random.Random) -> str:
    start = rng.randint(0, 20)
    seq = LETTERS[start : start + rng.randint(3, 6)]
    if rng.random() < 0.5:
        return "letters: " + " ".join(seq)
    return "LETTERS: " + " ".join(seq.upper())


def _case_sentence(rng: random.Random) -> str:
    return "case: " + " ".join(f"{c} {c.upper()}" for c in _letters(rng, 2, 4))


def _word_sentence(rng: random.Random) -> str:
    return "word: " + " ".join(_letters(rng, 2, 6))


def _fact_sentence(rng: random.Random) -> str:
    key = rng.choice(sorted(FACTS))
    return f"the {key} is {FACTS[key]}."


def _chat_sentence(rng: random.Random) -> str:
    key = rng.choice(sorted(FACTS))
    return f"user: what is the {key}?\nassistant: the {key} is {FACTS[key]}."


_SENTENCE_MAKERS: tuple[Callable[[random.Random], str], ...] = (
    _count_sentence, _arith_sentence, _alphabet_sentence, _case_sentence,
    _word_sentence, _fact_sentence, _chat_sentence,
)  # fmt: skip


def synthetic_sentence(rng: random.Random) -> str:
    """One sentence of the synthetic base language (counting, arithmetic, letters, facts, chat)."""
    return rng.choice(_SENTENCE_MAKERS)(rng)


def synthetic_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` synthetic sentences, deterministic in `seed`."""
    rng = random.Random(seed)
    return [synthetic_sentence(rng) for _ in range(n)]


# --------------------------------------------------------------------------- tenant tasks


@dataclass(frozen=True)
class Task:
    """A tenant task: `make_example(rng)` returns `(prompt, answer)`; answers start with a space."""

    name: str
    make_example: Callable[[random.Random], tuple[str, str]]
    description: str = ""


def _next_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 98)
    return f"next number after {n} is", f" {n + 1}"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"sum: {a} {b} ->", f" {a + b}"


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 2, 4)
    return "uppercase: " + " ".join(word) + " ->", " " + " ".join(word).upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 2, 4)
    return "reverse: " + " ".join(word) + " ->", " " + " ".join(reversed(word))


def _next_letter(rng: random.Random) -> tuple[str, str]:
    c = rng.choice(LETTERS[:-1])
    return f"letter after {c} is", f" {LETTERS[LETTERS.index(c) + 1]}"


def _previous_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 99)
    return f"number before {n} is", f" {n - 1}"


def _double(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 9)
    return f"double {n} ->", f" {2 * n}"


# The tiny family trains on the first five; "add" and "reverse" are harder extras for demos.
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("next_number", _next_number, "next number after 17 is -> 18"),
        Task("previous_number", _previous_number, "number before 17 is -> 16"),
        Task("uppercase", _uppercase, "uppercase: c a t -> C A T"),
        Task("double", _double, "double 4 -> 8"),
        Task("next_letter", _next_letter, "letter after c is -> d"),
        Task("add", _add, "sum: 3 4 -> 7"),
        Task("reverse", _reverse, "reverse: a b c -> c b a"),
    )
}


def get_task(name: str) -> Task:
    """The task called `name` (KeyError listing the known names otherwise)."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


def task_examples(task: Task, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` examples of `task` drawn with `random.Random(seed)`."""
    rng = random.Random(seed)
    return [task.make_example(rng) for _ in range(n)]


# --------------------------------------------------------------------------- training batches


def encode_task_batch(tokenizer: Any, examples: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt+answer+eos; the loss covers the answer and eos only."""
    rows = []
    for prompt, answer in examples:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    return _pad(rows, tokenizer.pad_token_id)


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = [r + [pad_id] * (width - len(r)) for r, _ in rows]
    labels = [lab + [-100] * (width - len(lab)) for _, lab in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r, _ in rows]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def task_batches(
    tokenizer: Any, task_name: str, *, steps: int, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """`steps` training batches of `batch_size` examples of the task, drawn with `seed`."""
    examples = task_examples(get_task(task_name), steps * batch_size, seed)
    return [
        encode_task_batch(tokenizer, examples[i : i + batch_size])
        for i in range(0, len(examples), batch_size)
    ]


# --------------------------------------------------------------------------- evaluation


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip() if text.strip() else ""


def _groups_by_length(ids: Sequence[list[int]]) -> Iterator[list[int]]:
    by_len: dict[int, list[int]] = {}
    for i, seq in enumerate(ids):
        by_len.setdefault(len(seq), []).append(i)
    for length in sorted(by_len):
        yield by_len[length]


@torch.no_grad()
def evaluate_accuracy(
    model: Any,
    tokenizer: Any,
    task: Task | str,
    n: int = 64,
    seed: int = 10_000,
    *,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
) -> float:
    """Fraction of `n` examples whose greedy continuation's first non-empty line equals the answer's.

    The examples are drawn with `seed`, which the builds never train with (they use seeds < 2000);
    small tasks (e.g. "double") still share examples with training. Works with any transformers
    causal LM; prompts are batched by token length, so no padding is needed and batched results
    equal unbatched ones.
    """
    task = get_task(task) if isinstance(task, str) else task
    examples = task_examples(task, n, seed)
    prompts = [tokenizer(p)["input_ids"] for p, _ in examples]
    answer_lens = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in examples]
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for group in _groups_by_length(prompts):
            for start in range(0, len(group), batch_size):
                idx = group[start : start + batch_size]
                input_ids = torch.tensor([prompts[i] for i in idx], device=device)
                new = max_new_tokens or max(answer_lens[i] for i in idx) + 3
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=new,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
                texts = tokenizer.batch_decode(
                    out[:, input_ids.shape[1] :], skip_special_tokens=True
                )
                for i, text in zip(idx, texts, strict=True):
                    correct += _first_line(text) == _first_line(examples[i][1])
    finally:
        model.train(was_training)
    return correct / n


@torch.no_grad()
def synthetic_loss(model: Any, tokenizer: Any, n: int = 128, seed: int = 20_000) -> float:
    """Mean next-token cross-entropy of `model` on `n` held-out synthetic sentences."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for sentence in synthetic_corpus(n, seed):
            ids = tokenizer(sentence)["input_ids"] + [tokenizer.eos_token_id]
            x = torch.tensor([ids], device=device)
            loss = model(input_ids=x, labels=x).loss
            total += float(loss) * (len(ids) - 1)
            count += len(ids) - 1
    finally:
        model.train(was_training)
    return total / count
