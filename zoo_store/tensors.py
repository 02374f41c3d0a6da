"""Bit-exact conversion of torch tensors to numpy arrays for zarr (bf16 as a uint16 view)."""

from __future__ import annotations

import numpy as np
import torch

# torch dtypes numpy lacks are stored as a same-width unsigned view and restored bit-exactly.
_VIEWS: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "bfloat16": (torch.bfloat16, torch.uint16),
    "float8_e4m3fn": (torch.float8_e4m3fn, torch.uint8),
    "float8_e5m2": (torch.float8_e5m2, torch.uint8),
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dt


def dtype_itemsize(name: str) -> int:
    return torch_dtype(name).itemsize


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array holding exactly the tensor's bytes (a view where possible)."""
    t = t.detach().to("cpu").contiguous()
    view = _VIEWS.get(dtype_name(t.dtype))
    if view is not None:
        t = t.view(view[1])
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    view = _VIEWS.get(dtype)
    if view is not None:
        t = t.view(view[0])
    if dtype_name(t.dtype) != dtype:
        raise ValueError(f"stored array has dtype {t.dtype}, spec says {dtype}")
    return t


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, for hashing (no copy when already contiguous on CPU)."""
    return memoryview(to_numpy(t).reshape(-1).view(np.uint8))
