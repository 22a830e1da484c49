r"""Argument checks shared by the public constructors: one wording for every message."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import torch
from torch import Tensor, nn

__all__: list[str] = []

P = ParamSpec("P")
R = TypeVar("R")


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


def renamed(**new_names: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Refuses keywords renamed since the last release: ``@renamed(heads="num_heads")`` on a
    function (or ``__init__``) makes ``heads=`` a ``TypeError`` that names ``num_heads``. The
    signature is the function's own (``functools.wraps``)."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        owner = function.__qualname__.removesuffix(".__init__")

        @functools.wraps(function)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            old = [k for k in kwargs if k in new_names]
            if old:
                raise TypeError(
                    "; ".join(
                        f"{owner}() takes {new_names[k]}= in place of {k}=: pass "
                        f"{new_names[k]}={kwargs[k]!r}"
                        for k in old
                    )
                )
            return function(*args, **kwargs)

        return checked

    return decorate


def module(name: str, value: Any) -> nn.Module:
    """``value`` if it is an ``nn.Module``, else a ``TypeError``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def activation(name: str, value: Any) -> Callable[[], nn.Module]:
    """``value`` if it is an ``nn.Module`` class (``nn.ReLU``) or a factory that builds one with
    no arguments (``functools.partial(nn.LeakyReLU, 0.2)``), else a ``TypeError`` that says what
    to pass instead: the class, not an instance (``nn.ReLU()``) or a name (``"relu"``)."""
    if isinstance(value, type):
        if issubclass(value, nn.Module):
            return value
        raise TypeError(
            f"{name} must be an nn.Module class such as nn.ReLU, got the class {value.__name__}, "
            "which is not an nn.Module"
        )
    if isinstance(value, nn.Module):
        cls = type(value).__name__
        raise TypeError(
            f"{name} must be an nn.Module class such as nn.ReLU, not an instance: pass "
            f"{name}={cls}, not {name}={cls}() (one instance is built per layer)"
        )
    if isinstance(value, str):
        known = {
            n.lower(): n
            for n, c in vars(nn).items()
            if isinstance(c, type) and issubclass(c, nn.Module)
        }
        hint = f"nn.{known[value.lower()]}" if value.lower() in known else "nn.ReLU"
        raise TypeError(
            f"{name} must be an nn.Module class such as nn.ReLU, got the string {value!r}: "
            f"pass the class, e.g. {name}={hint}"
        )
    built: Any = None
    if callable(value):
        try:
            built = value()
        except Exception:  # noqa: BLE001 - reported below: what was passed, what is needed
            built = None
    if not isinstance(built, nn.Module):
        shown = getattr(value, "__name__", None) or type(value).__name__
        raise TypeError(
            f"{name} must be an nn.Module class such as nn.ReLU (or a factory that builds one "
            f"with no arguments), got {shown}: for a function like torch.relu pass its module, "
            "e.g. nn.ReLU"
        )
    return cast(Callable[[], nn.Module], value)


def output_shape(
    module: Callable[[Tensor], Any], dummy: Tensor, expected: tuple[int | None, ...], what: str
) -> torch.Size:
    """Calls ``module`` once on ``dummy`` and checks that it returns a tensor of shape
    ``expected`` (``None`` matches any size), else a ``ValueError`` that starts with ``what`` (a
    ``TypeError`` if the call raises); returns the shape. The call runs in eval mode (so that
    nothing is updated, and a pool over several processes stays local) without gradients;
    training modes are restored in ``finally``."""
    modules = list(module.modules()) if isinstance(module, nn.Module) else []
    modes = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        with torch.no_grad():
            out = module(dummy)
    except Exception as error:
        raise TypeError(
            f"{what}; calling it on a dummy input of shape {tuple(dummy.shape)} raised "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
    if not (
        isinstance(out, Tensor)
        and out.dim() == len(expected)
        and all(e is None or e == n for e, n in zip(expected, out.shape))
    ):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{what}, got {got} from a dummy input of shape {tuple(dummy.shape)}")
    return out.shape
