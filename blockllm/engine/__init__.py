"""The block engine: chains of blocks on one device, batched per block across models."""

from .engine import Engine, EngineStats, LoadedModel
from .source import TensorSource

__all__ = ["Engine", "EngineStats", "LoadedModel", "TensorSource"]
