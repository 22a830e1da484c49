r"""How :func:`~torchhyper.per_sample_call` treats a model's keyword inputs.

transformers' models take ``use_cache`` (a per-call cache that ``vmap`` cannot batch) and build
their attention masks with code that branches on values. :func:`_takes_use_cache` finds the
forwards that take ``use_cache``, so that the call can turn it off, and
:func:`_explain_vmap_error` turns what ``vmap`` raises on masks and caches into our own error,
with the cause and the fix.
"""

from __future__ import annotations

import inspect
import re
import weakref
from typing import Any

from torch import nn

__all__: list[str] = []

_USE_CACHE: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def _takes_use_cache(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes ``use_cache``: a transformers model's does, and so does
    a wrapper's (PEFT's) that passes ``**kwargs`` on to a model configured with a cache."""
    kind = type(module)
    if kind not in _USE_CACHE:
        try:
            parameters = dict(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            parameters = {}
        kinds = {p.kind for p in parameters.values()}
        named = "use_cache" in parameters
        _USE_CACHE[kind] = "named" if named else "kwargs" if _VAR_KEYWORD in kinds else ""
    how = _USE_CACHE[kind]
    return how == "named" or (
        how == "kwargs" and getattr(getattr(module, "config", None), "use_cache", None) is not None
    )


_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD


def _explain_vmap_error(module: nn.Module, err: Exception, kwargs: dict[str, Any]) -> None:
    """Raises a ``ValueError`` with the cause and the fix for what ``vmap`` cannot batch;
    returns for any other error."""
    name = type(module).__name__
    text = str(err)
    if "data-dependent control flow" in text or ".item()" in text:
        hint = (
            " transformers builds its attention mask with such code: pass a mask that every "
            "sample uses as shared={'attention_mask': mask} (N, L), or per-sample masks as a "
            "4-D float mask (B, N, 1, L, L) (0 to attend, -inf not, the causal part included), "
            "which transformers uses as given."
            if "attention_mask" in kwargs
            else ""
        )
        raise ValueError(
            f"per_sample_call runs {name} under torch.func.vmap, and its forward decides what "
            "to run from the values of a batched (per-sample) input, which vmap cannot batch "
            f"(vmap: {text.splitlines()[0]}).{hint} Inputs that all samples share go in "
            "shared= (not batched); otherwise loop over the samples with functional_call."
        ) from err
    if "must only return Tensors" in text:
        got = re.search(r"got type <class '([\w.]+)'>", text)
        what = got.group(1).rpartition(".")[2] if got else "an object that is not a tensor"
        raise ValueError(
            f"per_sample_call batches tensors only, and {name} returned {what}. A cache "
            "(transformers' DynamicCache) is per-call state that vmap cannot batch: call "
            "without past_key_values and with use_cache=False (the default here)."
        ) from err
