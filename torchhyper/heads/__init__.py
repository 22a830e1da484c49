r"""Heads: the last stage of a hypernetwork, from an embedding to every generated tensor.

A hypernetwork generates each tensor from a *base* and an embedding ``z`` of shape ``(*, H)``.
The head decides how, through one method, :meth:`Head.assemble`, which maps ``z``, the bases,
and the per-tensor ``scale`` and learned ``gain`` to the flat generated tensors
``(*, numel_i)``. Most heads compute raw values ``h = head(z)`` of shape ``(*, N)`` (every
tensor flattened and concatenated, in the order of ``shapes``), and the default assembly is
``base_i + scale_i * gain_i * h_i``: ``gain`` sets the size of each tensor's update.

The base is chosen with ``HyperNetwork(..., base=)``:

* ``"learned"`` (the default) and ``"frozen"``: the downstream's own current values, copied
  into a trained or a fixed (``requires_grad=False``) parameter, and the head generates an
  *update*. Every built-in head then
  starts at exactly zero (:meth:`Head.zero_update_`), so the hypernetwork starts at the
  downstream's values.
* ``"none"``: full generation, every value predicted from ``z``. The base is the scalar mean of each
  tensor's default init, ``scale`` its std, and the head's raw values must have **zero mean and
  unit variance at init, given an embedding of zero mean and unit variance over its H features.**

Heads are swapped with ``head=``, which takes a name of :data:`HEADS`, ``"auto"``, or any
callable ``(in_features, shapes) -> module``, e.g. ``functools.partial(LoRAHead, rank=16)``. A
module that is not a :class:`Head` must map ``(*, H) -> (*, N)``; it is wrapped once, and its
output width is checked on a dummy embedding when the hypernetwork is built.

Trade-offs, with ``N`` generated values in ``T`` tensors of ``R`` rows in all (a tensor's rows
are its first dimension), an embedding of width ``H`` and rank ``r``; measured against training
the downstream directly in ``benchmarks/quality.py`` and ``benchmarks/heads.py``:

* dense (:class:`DenseHead`): ``(H + 1) N`` parameters, ``H N`` multiply-adds. The fastest to
  learn a conditioned update, but ``H + 1`` times the downstream's size: the ``auto`` choice
  while that fits ``2**20`` parameters.
* hybrid (:class:`HybridHead`): dense maps for the smallest tensors within a parameter budget;
  for the others ``(H + 1)`` parameters per row of a matrix (a scale per row) and, where
  scaling cannot move a tensor (vectors, a row of zeros), ``r (rows + cols + H + 1)`` for a
  rank-``r`` additive term. The ``auto`` choice on a base above the dense head's budget.
* FiLM (:class:`FiLMHead`): ``(H + 1) (R + V)`` parameters (``R`` rows of the matrices, ``V``
  values of the vectors), ``N`` multiply-adds. Scales each row of each matrix by ``1 + g(z)``
  and shifts vectors; a base of zeros never moves (the hypernetwork warns).
* LoRA (:class:`LoRAHead`): ``r (sum(rows + cols) + T (H + 1))`` parameters, ``r N``. With no
  base, a fixed random base plus conditioned rank-``r`` updates: the ``auto`` choice with
  ``base="none"`` above the dense head's budget.
* chunked: ``r (C + H + d) + d N / C`` parameters, ``r N``. The smallest heads, but its values
  have rank at most ``r + 1`` as a (chunks, C) matrix, and it fits poorly.
* low-rank: ``r (rows + cols)`` per matrix, ``r N``. Purely low-rank updates.
* none (:class:`NoUpdate`): no parameters; every tensor is its base, so a learned base trains
  exactly as the downstream trained directly.

:func:`auto_head` states the ``auto`` policy; :func:`summary` reports the choice and why.

A new head is a :class:`Head` subclass decorated with :func:`register_head`; its name is then
a choice of ``head=`` everywhere (the experiments' configs and the documentation included).
"""

from torchhyper.heads.build import auto_head, summary
from torchhyper.heads.dense import ChunkedHead, DenseHead
from torchhyper.heads.film import FiLMHead, NoUpdate
from torchhyper.heads.head import HEADS, Head, HeadFactory, head_names, register_head
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
    "register_head",
    "head_names",
    "auto_head",
    "summary",
]
