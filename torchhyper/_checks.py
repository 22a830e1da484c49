r"""Argument checks shared by the public constructors: one wording for every message."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__: list[str] = []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (``True`` is not an int here), else a ``ValueError``."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def positive_ints(name: str, values: Any, *, empty: bool = False) -> list[int]:
    """``values`` as a list if it is a list or tuple of ints >= 1 (non-empty unless ``empty``)."""
    sizes = list(values) if isinstance(values, (list, tuple)) else None
    if sizes is None or (not sizes and not empty) or not all(_is_int(h) and h > 0 for h in sizes):
        what = "a list" if empty else "a non-empty list"
        raise ValueError(f"{name} must be {what} of positive ints, got {values!r}")
    return sizes


def module(name: str, value: Any) -> nn.Module:
    """``value`` if it is an ``nn.Module``, else a ``TypeError``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value
