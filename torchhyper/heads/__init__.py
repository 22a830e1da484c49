r"""Heads: the last stage of a hypernetwork, from an embedding to every generated tensor.

A hypernetwork generates each tensor from a *base*, chosen with ``base=`` (see
:class:`~torchhyper.HyperNetwork`), and an embedding ``z`` of shape ``(*, H)``. The head decides
how, through one method, :meth:`Head.assemble`, which maps ``z``, the bases, each tensor's
``spread`` (the unit of its update) and learned ``gain`` to the flat generated tensors
``(*, numel_i)``. Most heads compute raw values ``h = head(z)`` of shape ``(*, N)`` (every
tensor flattened and concatenated, in the order of ``shapes``), and the default assembly is
``base_i + spread_i * gain_i * h_i``.

A head keeps one of two contracts, by the base:

* On a base (``base="learned"`` or ``"frozen"``) it generates an *update* that starts at exactly
  zero (:meth:`Head.zero_update_`), so the hypernetwork starts at the downstream's values.
* With ``base="none"`` (full generation) each base is a scalar, and the head's raw values must
  have **zero mean and unit variance at init, given an embedding of zero mean and unit variance
  over its H features.** A head that ``needs_base`` is refused there.

Heads are swapped with ``head=``, which takes a name of :data:`HEADS`, ``"auto"``, or any
callable ``(in_features, shapes) -> module``, e.g. ``functools.partial(LoRAHead, rank=16)``. A
module that is not a :class:`Head` must map ``(*, H) -> (*, N)``; it is wrapped once, and its
output width is checked on a dummy embedding when the hypernetwork is built.

The heads (each states its parameters and cost):

* :class:`DenseHead`: one linear map to every value; ``head="auto"`` takes it while it fits
  :data:`AUTO_BUDGET`.
* :class:`HybridHead`: dense maps for the smallest tensors within a budget; row scales and,
  where scaling cannot move a tensor, a low-rank additive term for the others. ``"auto"``
  takes it on a base above the budget.
* :class:`FiLMHead`: row scales and vector shifts only; a row of zeros in the base never moves
  (the hypernetwork warns).
* :class:`LoRAHead`: fixed noise plus conditioned rank-``r`` updates. ``"auto"`` takes it with
  ``base="none"`` above the budget.
* :class:`ChunkedHead`: a shared generator, one chunk of values at a time: the fewest
  parameters, values of low rank.
* :class:`LowRankHead`: purely low-rank matrices.
* :class:`NoUpdate`: no parameters; every tensor is its base, so a learned base trains exactly
  as the downstream trained directly.

:func:`auto_head` states the ``auto`` policy; :func:`summary` reports the choice and why.

A new head is a :class:`Head` subclass decorated with :func:`register_head`; its name is then
a choice of ``head=`` everywhere (the experiments' configs and the documentation included).
"""

from torchhyper.heads.build import auto_head, summary
from torchhyper.heads.dense import ChunkedHead, DenseHead
from torchhyper.heads.film import FiLMHead, NoUpdate
from torchhyper.heads.head import AUTO_BUDGET, HEADS, Head, HeadFactory, head_names, register_head
from torchhyper.heads.hybrid import HybridHead
from torchhyper.heads.lowrank import LoRAHead, LowRankHead

__all__ = [
    "Head",
    "HybridHead",
    "FiLMHead",
    "NoUpdate",
    "DenseHead",
    "ChunkedHead",
    "LowRankHead",
    "LoRAHead",
    "HeadFactory",
    "HEADS",
    "AUTO_BUDGET",
    "register_head",
    "head_names",
    "auto_head",
    "summary",
]
