"""Architecture families: how a model of each family is cut into blocks and put back together."""

from __future__ import annotations

from ..exceptions import UnsupportedArchitectureError
from .base import BlockParts, Family
from .llama import LlamaFamily

FAMILIES: dict[str, Family] = {"llama": LlamaFamily()}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_for_config(config_dict: dict) -> Family:
    """The family that handles a Hugging Face config (by its model_type)."""
    model_type = config_dict.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    archs = config_dict.get("architectures") or [model_type]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {archs} (model_type {model_type!r}); BlockLLM supports model "
        f"types: {', '.join(supported_model_types())}"
    )


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}"
        ) from None


__all__ = ["FAMILIES", "BlockParts", "Family", "family_for_config", "get_family", "supported_model_types"]
