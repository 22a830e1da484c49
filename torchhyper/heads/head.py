r"""The head contract (:class:`Head`), the registry of named heads (:data:`HEADS`) and the budget
of ``head="auto"`` (:data:`AUTO_BUDGET`, here so that every head module can read it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from torchhyper._registry import registrar

__all__ = ["Head", "HeadFactory", "HEADS", "AUTO_BUDGET", "register_head", "head_names"]

AUTO_BUDGET = 2**20
r"""The most parameters ``head="auto"`` gives dense maps (4 MB in float32, 12 MB with Adam's
state): :class:`~torchhyper.heads.DenseHead` within it, :class:`~torchhyper.heads.HybridHead`
with this budget above it (see :func:`~torchhyper.heads.auto_head`)."""


class Head(nn.Module):
    r"""Base class of heads: embeddings ``(*, in_features)`` to raw values ``(*, N)``, with
    ``N = sum(prod(shape))`` over the generated tensors.

    A subclass implements :meth:`forward` (or :meth:`assemble`, for a head that modulates a
    base rather than adding to it) and :meth:`zero_update_`; registered with
    :func:`register_head`, it can be chosen by name with ``HyperNetwork(..., head=NAME)``.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors, in output order.
    """

    #: Whether the head only modulates a base (it cannot generate tensors from scratch): the
    #: hypernetwork then refuses ``base="none"``.
    needs_base: bool = False
    #: Whether its update to a matrix is proportional to the base's rows, so that a zero base
    #: (or a zero row) never moves (:class:`~torchhyper.heads.FiLMHead`).
    scales_base: bool = False
    #: Why this head was chosen, when ``head="auto"`` chose it (see :func:`auto_head`).
    reason: str = ""

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.in_features = in_features
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        self.numel = sum(self.numels)

    def forward(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], spread: Tensor, gain: Tensor
    ) -> list[Tensor]:
        r"""The generated values ``base_i + spread_i * gain_i * h_i``, tensor by tensor.

        Args:
            z: Embeddings, ``(*, H)``.
            bases: Per tensor, a scalar (``base="none"``) or the flat ``(numel_i,)`` base.
            spread: Per-tensor spreads, ``(T,)``, the unit of each tensor's update: the std of
                its default init (``base="none"``) or the root mean square of its base.
            gain: Per-tensor learned gains, ``(T,)``.

        Returns:
            Flat values ``(*, numel_i)`` per tensor.
        """
        return _assemble(self(z), spread * gain, bases, self.numels)

    def zero_update_(self) -> bool:
        r"""Makes the head's raw values exactly zero for every embedding, in place, keeping it
        trainable: the start of an update to a base. Returns whether the head can (the base
        class cannot; the hypernetwork then starts that head's per-tensor gains at zero)."""
        return False

    def load_hint(self, state_dict: Mapping[str, Any], prefix: str, names: list[str]) -> str:
        r"""A line for the error of a state dict that does not load, when this head's own
        structure (not the downstream's) explains it; ``""`` when it does not.

        Args:
            state_dict: The state dict being loaded.
            prefix: This head's prefix in it, e.g. ``"head."``.
            names: The generated tensors' names, in the order of ``shapes``.
        """
        return ""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, tensors={len(self.shapes)}, numel={self.numel}"


HeadFactory = Callable[[int, Sequence[Sequence[int]]], nn.Module]
r"""What ``head=`` takes besides a name: ``(in_features, shapes) -> module``."""

HEADS: dict[str, type[Head]] = {}
r"""The named heads: ``head=NAME`` builds ``HEADS[NAME](in_features, shapes)``.

Filled by :func:`register_head`. Validation, error messages, the experiments' configs, the tests
and the documentation all read it.
"""

# Names of earlier releases, refused with the new name (not accepted silently): old -> new.
_RENAMED = {"none": "no_update"}

H = TypeVar("H", bound=type[Head])


def register_head(name: str) -> Callable[[H], H]:
    r"""Registers a :class:`Head` subclass under ``name``, so that ``head=name`` builds it.

    Example:
        >>> @register_head("shift")
        ... class Shift(Head):
        ...     '''One conditioned shift, shared by every generated value.'''
        ...     def __init__(self, in_features, shapes):
        ...         super().__init__(in_features, shapes)
        ...         self.linear = nn.Linear(in_features, 1)
        ...     def forward(self, z):
        ...         return self.linear(z).expand(*z.shape[:-1], self.numel)
        ...     def zero_update_(self):
        ...         return _zero(self.linear.weight, self.linear.bias)
        >>> HEADS["shift"] is Shift
        True
        >>> del HEADS["shift"]  # (leave the registry as it was)

    Raises:
        ValueError: ``name`` is ``"auto"`` or taken by another class.
        TypeError: The decorated object is not a :class:`Head` subclass.
    """
    return cast(Callable[[H], H], registrar(HEADS, Head, "head", name, reserved=("auto",)))


def head_names() -> list[str]:
    r"""Every name ``head=`` takes: ``"auto"`` and the keys of :data:`HEADS`, in that order."""
    return ["auto", *HEADS]


class _ModuleHead(Head):
    """Any module ``(*, H) -> (*, N)`` that a head factory returned, as a :class:`Head`."""

    def __init__(
        self, module: nn.Module, in_features: int, shapes: Sequence[Sequence[int]]
    ) -> None:
        super().__init__(in_features, shapes)
        self.module = module

    def forward(self, z: Tensor) -> Tensor:
        out: Tensor = self.module(z)
        return out


def _assemble(
    raw: Tensor, coef: Tensor, bases: Sequence[Tensor], numels: list[int]
) -> list[Tensor]:
    # Tensor by tensor, with scalar coefficients: no N-sized copies of them, whose backward
    # would be an index_add over N values.
    parts = raw.split(numels, dim=-1)
    return [torch.addcmul(b, h, c) for h, c, b in zip(parts, coef.unbind(), bases)]


def _scale_rows(base: Tensor, scale: Tensor) -> Tensor:
    """``base (rows, cols) * scale[..., None]`` for row scales ``(*, rows)``: each row of the base
    scaled, one matrix per set of scales."""
    if scale.dim() == 1 and not torch.compiler.is_compiling():
        return cast(Tensor, _ScaleRows.apply(base, scale))  # type: ignore[no-untyped-call]
    return base * scale.unsqueeze(-1)


class _ScaleRows(torch.autograd.Function):
    """``base * scale[:, None]`` with a backward that reads the gradient once per input: the
    scales' gradient is a row-wise dot product (no temporary of the matrix's size). Written
    for ``torch.func`` too: a generated vmap rule, and forward-mode derivatives."""

    generate_vmap_rule = True

    @staticmethod
    def forward(base: Tensor, scale: Tensor) -> Tensor:
        return base * scale.unsqueeze(-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        base, scale = inputs
        ctx.save_for_backward(base, scale)
        ctx.save_for_forward(base, scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        base, scale = ctx.saved_tensors
        grad_base = grad * scale.unsqueeze(-1) if ctx.needs_input_grad[0] else None
        grad_scale = torch.linalg.vecdot(grad, base) if ctx.needs_input_grad[1] else None
        return grad_base, grad_scale

    @staticmethod
    def jvp(ctx: Any, base_t: Tensor | None, scale_t: Tensor | None) -> Tensor:
        base, scale = ctx.saved_tensors
        out = torch.zeros_like(base) if base_t is None else base_t * scale.unsqueeze(-1)
        return out if scale_t is None else out + base * scale_t.unsqueeze(-1)


def _require_bases(head: Head, bases: Sequence[Tensor]) -> None:
    """Refuses the scalar offsets that ``base="none"`` passes, in a head that needs a base."""
    if bases and bases[0].dim() == 0:
        raise ValueError(
            f"{type(head).__name__} needs a base: build the hypernetwork with base='learned' "
            "or 'frozen'"
        )


def _has_zero_row(value: Tensor) -> bool:
    """Whether the matrix ``value`` (a row per entry of its first dimension, ``dim() >= 2``) has
    a row of zeros: a row that scaling cannot move."""
    return value.numel() > 0 and bool((value.reshape(value.shape[0], -1) == 0).all(1).any())


def _zero(*params: Tensor) -> bool:
    """Zeroes ``params`` in place (the output layer of an update that starts at zero)."""
    with torch.no_grad():
        for p in params:
            p.zero_()
    return True


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The shape of a tensor viewed as a matrix: its rows (first dimension) by the product of
    the rest; a vector ``(n,)`` is ``(n, 1)``, a scalar ``(1, 1)``."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], shape[1:].numel()
