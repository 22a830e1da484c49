r"""Registries of named choices (``head=``, ``pool=``): one decorator behind each."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

__all__: list[str] = []

T = TypeVar("T", bound=type)


def registrar(
    table: dict[str, T], base: type, kind: str, name: str, *, reserved: Collection[str] = ()
) -> Callable[[T], T]:
    """A class decorator that files a ``base`` subclass in ``table`` under ``name``.

    A name is an identifier, not in ``reserved`` and not taken by another class (the same class
    again, as when its module is reloaded, is fine)."""
    if not isinstance(name, str) or not name.isidentifier() or name in reserved:
        others = "".join(f" other than {r!r}" for r in reserved)
        raise ValueError(f"a {kind} name must be an identifier{others}, got {name!r}")

    def register(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(
                f"register_{kind}({name!r}) decorates {base.__name__} subclasses, got {cls!r}"
            )
        taken = table.get(name)
        if taken is not None and _qualified(taken) != _qualified(cls):
            raise ValueError(f"{kind} name {name!r} is taken by {_qualified(taken)}")
        table[name] = cls
        return cls

    return register


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
