"""The block engine: chains of blocks on one device, batched per block across models."""

from .engine import Engine, EngineStats

__all__ = ["Engine", "EngineStats"]
