r"""The record of what a hypernetwork generates, kept in its state dict and checked on load.

:class:`_Recorded` gives :class:`~torchhyper._generator._Generator` its ``get_extra_state``
(the generated names and shapes) and a ``load_state_dict`` that finds every difference (the
record, missing and unexpected keys, shapes, values) before it writes anything.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

if TYPE_CHECKING:
    from torchhyper._spec import _Generated

__all__: list[str] = []

# Where the state dict records what is generated (nn.Module's key for get_extra_state).
_EXTRA_STATE = "_extra_state"
# How many offenders an error message lists.
_SHOWN = 8


class _Recorded(nn.Module):
    """A module that generates the tensors ``names`` of shapes ``shapes``, and says so in its
    state dict."""

    generated: _Generated  # what is generated, set once at construction
    _strict_load: bool | None = None  # the strict= of a load_state_dict call in progress

    @property
    def names(self) -> list[str]:
        """The generated tensors' names, in ``downstream.named_parameters()`` order."""
        return self.generated.names

    @property
    def shapes(self) -> list[torch.Size]:
        """The generated tensors' shapes."""
        return self.generated.shapes

    @property
    def numel(self) -> int:
        """How many values are generated (per parameter set)."""
        return self.generated.numel

    def get_extra_state(self) -> Tensor:
        """What the hypernetwork generates, for its state dict: ``{"generates": {name: shape}}``
        as the UTF-8 bytes of its JSON in a ``uint8`` tensor (:func:`_read_record` reads it).

        A tensor, so that every value of the state dict stays a tensor (code that compares,
        moves or counts state dicts keeps working) and ``torch.load(weights_only=True)`` reads
        it."""
        record = {"generates": {n: list(s) for n, s in zip(self.names, self.shapes)}}
        return torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Nothing to set: :meth:`_load_from_state_dict` compares the record before loading."""

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """As :meth:`torch.nn.Module.load_state_dict`, checked before anything is written (the
        rule is :class:`~torchhyper.HyperNetwork`'s)."""
        # torch passes strict=True to every _load_from_state_dict and filters at the end; the
        # checks need the caller's (None when a parent module's load_state_dict runs them).
        self._strict_load = strict
        try:
            result: _IncompatibleKeys = super().load_state_dict(
                state_dict, strict=strict, assign=assign
            )
        finally:
            self._strict_load = None
        return result

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Runs before any of this hypernetwork's tensors (its own, then its submodules') is
        # written: every difference is found here, so that a failed load writes nothing.
        # ``state_dict`` is load_state_dict's own copy: adding to it changes nothing of the
        # caller's.
        caller: bool | None = getattr(self, "_strict_load", None)
        key = prefix + _EXTRA_STATE
        if key not in state_dict and caller is not False:
            warnings.warn(
                f"the state dict loaded into {type(self).__name__} has no record of what the "
                "hypernetwork that saved it generates (saved by an older torchhyper): loaded "
                "after checking its keys and shapes only; save it again to record the names "
                "and shapes it generates",
                UserWarning,
                stacklevel=5 if caller else 4,
            )
            state_dict[key] = self.get_extra_state()
        problems = self._load_problems(state_dict, prefix, caller)
        if problems:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__} (nothing was "
                "loaded):\n    "
                + "\n    ".join(problems)
                + "\nLoad a state dict saved by a hypernetwork built alike, on a downstream with "
                "the same parameter names and shapes (hypernetwork.load_state_dict(..., "
                "strict=False) loads the parts whose keys and shapes match, e.g. the encoder of "
                "one built for another downstream)."
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _load_problems(
        self, state_dict: dict[str, Any], prefix: str, strict: bool | None
    ) -> list[str]:
        """Every reason why ``state_dict`` cannot be loaded, as lines of an error message.

        ``strict``: the caller's (``None``: unknown, through a parent module's load). The record
        of what is generated is compared unless ``strict`` is ``False``; missing and unexpected
        keys are reported when it is ``True`` (else torch reports them, after loading); shapes
        and values always (torch refuses them whatever ``strict``)."""
        problems: list[str] = []
        if strict is not False and prefix + _EXTRA_STATE in state_dict:
            problems += _record_differences(
                state_dict[prefix + _EXTRA_STATE], self.names, self.shapes
            )
        expected = self.state_dict(prefix=prefix, keep_vars=True)
        given = [k for k in state_dict if k.startswith(prefix)]
        if strict is True:
            problems += _only_in(expected, "missing keys", given, "unexpected keys")
        wrong = []
        for k, own in expected.items():
            if not isinstance(own, Tensor) or k not in state_dict or k == prefix + _EXTRA_STATE:
                continue  # (the record is compared above, by what it records)
            value = state_dict[k]
            if not isinstance(value, Tensor):
                wrong.append(f"{k}: expected a tensor, got {type(value).__name__}")
            elif value.shape != own.shape and not (own.dim() == 0 and value.shape == (1,)):
                wrong.append(
                    f"size mismatch for {k}: saved {tuple(value.shape)}, this hypernetwork has "
                    f"{tuple(own.shape)}"
                )
            elif value.is_meta and not own.is_meta:
                wrong.append(f"{k}: saved on the meta device (no values to load)")
        return problems + _capped(wrong, "keys of wrong shape or value")


def _read_record(saved: Any) -> dict[str, list[int]] | None:
    """``{name: shape}`` from what :meth:`_Generator.get_extra_state` saved; None if it is not
    such a record."""
    if not isinstance(saved, Tensor) or saved.dtype != torch.uint8 or saved.dim() != 1:
        return None
    try:
        record = json.loads(bytes(saved.tolist()).decode())
    except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
        return None
    generates = record.get("generates") if isinstance(record, dict) else None
    return generates if isinstance(generates, dict) else None


def _record_differences(saved: Any, names: list[str], shapes: list[torch.Size]) -> list[str]:
    """How the record of what a saved hypernetwork generates differs from ``names``/``shapes``."""
    generates = _read_record(saved)
    if generates is None:
        shown = f"{saved.dtype} tensor" if isinstance(saved, Tensor) else type(saved).__name__
        return [
            f"{_EXTRA_STATE}: expected the record of what a hypernetwork generates (a uint8 "
            f"tensor of JSON, {{'generates': {{name: shape}}}}), got a {shown}"
        ]
    own = {n: list(s) for n, s in zip(names, shapes)}
    lines = _only_in(
        generates,
        "generated only by the saved hypernetwork",
        own,
        "generated only by this hypernetwork",
    )
    shapes_differ = [
        f"{n}: saved for {tuple(generates[n])}, this hypernetwork generates {tuple(own[n])}"
        for n in own
        if n in generates and list(generates[n]) != own[n]
    ]
    lines += _capped(shapes_differ, "generated shapes differ")
    if not lines and list(generates) != list(own):
        lines.append(
            f"generated in another order: saved {_few(list(generates))}, this hypernetwork "
            f"{_few(list(own))}"
        )
    if lines:
        lines.insert(0, "the state dict was saved by a hypernetwork of another downstream:")
    return lines


def _only_in(
    first: Collection[str], first_only: str, second: Collection[str], second_only: str
) -> list[str]:
    """Lines for a message: the names of ``first`` not in ``second``, led by ``first_only``,
    then those of ``second`` not in ``first``, led by ``second_only``; none for a side with
    none."""
    firsts, seconds = set(first), set(second)
    ones = [n for n in first if n not in seconds]
    others = [n for n in second if n not in firsts]
    sides = ((first_only, ones), (second_only, others))
    return [f"{label}: {_few(found)}" for label, found in sides if found]


def _capped(lines: list[str], more: str) -> list[str]:
    """The first few ``lines`` of a message, then how many ``more`` were left out."""
    if len(lines) <= _SHOWN:
        return lines
    return [*lines[:_SHOWN], f"... and {len(lines) - _SHOWN} more {more}"]


def _few(names: list[str]) -> str:
    """``names`` for a message: the first few, and how many in all."""
    if len(names) <= _SHOWN:
        return str(names)
    return f"{names[:_SHOWN]} ... ({len(names)} in all)"
