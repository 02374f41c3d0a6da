"""The small protocol every architecture family implements: partition, adapters, assembly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from zoo_store import Block, BlockSpec


@dataclass(frozen=True)
class BlockParts:
    """One block cut from a checkpoint, before it is stored: spec and tensors."""

    spec: BlockSpec
    tensors: dict[str, torch.Tensor]


class Family(Protocol):
    name: str
    model_types: tuple[str, ...]

    def partition(
        self, config: dict[str, Any], state_dict: dict[str, torch.Tensor], layers_per_block: int
    ) -> list[BlockParts]:
        """Cut a full checkpoint into chain blocks: embed, layer runs, head."""
        ...

    def partition_adapter(
        self,
        config: dict[str, Any],
        adapter_config: dict[str, Any],
        adapter_state: dict[str, torch.Tensor],
        chain: list[tuple[str, BlockSpec]],
    ) -> list[tuple[int, BlockParts]]:
        """Cut a LoRA adapter into adapter blocks, each attached to a chain block by index."""
        ...

    def assemble(
        self,
        config: dict[str, Any],
        blocks: list[Block],
        adapters: list[tuple[int, Block]] = (),
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> PreTrainedModel:
        """Put a chain back together as a runnable transformers model (with LoRA if given)."""
        ...
