r"""Generated adapters in the formats PEFT and diffusers load: export, and read back.

A hypernetwork that generates a model's LoRA tensors (``include="*lora_*"``) yields one adapter
per condition. :func:`save_adapter` writes one as the model's own library would, without
copying the model: the generated tensors are bound into the model's slots
(:func:`~torchhyper.bind`) while the library's own writer runs.

* A PEFT ``PeftModel``: a PEFT adapter folder (``adapter_config.json``,
  ``adapter_model.safetensors``), loaded by ``PeftModel.from_pretrained(base, path)``.
* A diffusers model with PEFT LoRA layers (``model.add_adapter(LoraConfig(...))``): diffusers'
  LoRA file (``pytorch_lora_weights.safetensors``), loaded by
  ``model.load_lora_adapter(path, prefix=None)``.

:func:`save_adapters` writes one folder per row of a batch of conditions, and
:func:`load_adapter` reads a saved adapter back as tensors keyed like the model's
``named_parameters()``, for ``functional_call``, :func:`~torchhyper.per_sample_call` or
:func:`~torchhyper.load_params`. PEFT and diffusers are imported only when used.

To run a batch in which every example has its own adapter (the frozen base shared), pass the
batched tensors (``hypernetwork.per_set(...)``, ``EmbeddingHyperNetwork(ids)``) to
:func:`~torchhyper.per_sample_call`.

Example:
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from torchhyper import HyperNetwork
    >>> config = GPT2Config(vocab_size=16, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    >>> lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    >>> model = get_peft_model(GPT2LMHeadModel(config), lora)
    >>> hypernetwork = HyperNetwork(4, [8], model, include="*lora_*", base="frozen")
    >>> import tempfile
    >>> folder = save_adapter(model, hypernetwork(torch.randn(3, 4)), tempfile.mkdtemp() + "/a")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    >>> list(load_adapter(model, folder))[0]
    'base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight'
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from torchhyper._per_sample_index import _batch_of
from torchhyper._record import _few
from torchhyper.params import bind

__all__ = ["save_adapter", "save_adapters", "load_adapter"]

# The files each library writes its adapter weights to.
_PEFT_WEIGHTS = "adapter_model.safetensors"
_DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


def save_adapter(
    model: nn.Module,
    params: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    r"""Writes the adapter ``params`` of ``model`` (one condition) in its library's format.

    The folder is written whole or not at all: into a temporary folder beside ``path``, then
    renamed. It holds the adapter alone (the LoRA tensors and the library's config), not the
    model.

    Args:
        model: A PEFT ``PeftModel``, or a diffusers model with PEFT LoRA layers.
        params: Generated tensors of one condition, keyed like ``model.named_parameters()``:
            the adapter's (names with ``.{adapter_name}.``); adapter tensors left out keep the
            model's own values.
        path: The folder to write.
        adapter_name: Which of the model's adapters the tensors belong to.
        overwrite: Replace an existing folder at ``path``.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``model`` is neither kind, or a value of ``params`` is not a tensor.
        ValueError: ``params`` holds tensors that are not the adapter's, or a batch of
            conditions (save those with :func:`save_adapters`).
        FileExistsError: ``path`` exists and ``overwrite`` is ``False``.
    """
    writer = _writer(model, adapter_name)
    _check_adapter_params(model, params, adapter_name)
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"path {str(target)!r} exists: pass overwrite=True to replace it, or another path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with bind(model, params):
            writer(scratch)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(scratch, target)
            shutil.rmtree(old)
        else:
            os.replace(scratch, target)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return target


def save_adapters(
    model: nn.Module,
    params: Mapping[str, Tensor],
    folder: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> list[Path]:
    r"""Writes one adapter folder per condition of a batch, ``folder / names[i]``.

    Args:
        model: As for :func:`save_adapter`.
        params: Generated tensors of ``B`` conditions, each ``(B, *shape)`` (``per_set``,
            ``per_sample`` or ``EmbeddingHyperNetwork(ids)``).
        folder: Where to write the folders.
        names: One folder name per condition; default ``"0"``, ``"1"``, ...
        adapter_name: As for :func:`save_adapter`.
        overwrite: As for :func:`save_adapter`.

    Returns:
        The folders written, in order.
    """
    batch = _batch_of(params, dict(model.named_parameters()))
    if batch is None:
        raise ValueError(
            "params must be a batch of conditions of the model's tensors, (B, *shape) with one "
            "B >= 1 for all; save a single condition with save_adapter"
        )
    names = [str(i) for i in range(batch)] if names is None else list(names)
    if len(names) != batch or len(set(names)) != batch:
        raise ValueError(f"names must hold {batch} distinct folder names, got {names!r}")
    base = Path(folder)
    return [
        save_adapter(
            model,
            {k: v[i] for k, v in params.items()},
            base / name,
            adapter_name=adapter_name,
            overwrite=overwrite,
        )
        for i, name in enumerate(names)
    ]


def load_adapter(
    model: nn.Module, path: str | os.PathLike[str], *, adapter_name: str = "default"
) -> dict[str, Tensor]:
    r"""Reads a saved adapter back as tensors keyed like ``model.named_parameters()``.

    Args:
        model: The model the adapter is for (a PEFT ``PeftModel`` or a diffusers model with
            LoRA layers), whose adapter ``adapter_name`` names the tensors.
        path: A folder written by :func:`save_adapter`, PEFT's ``save_pretrained`` or
            diffusers' ``save_lora_adapter``.
        adapter_name: The adapter whose parameter names the tensors take.

    Returns:
        ``{name: tensor}`` for every tensor of the file, on the CPU.

    Raises:
        FileNotFoundError: ``path`` holds no adapter file.
        ValueError: The file's tensors do not match the model's adapter (names or shapes).
    """
    from safetensors.torch import load_file

    _writer(model, adapter_name)  # the same check of the model
    folder = Path(path)
    files = [folder / n for n in (_PEFT_WEIGHTS, _DIFFUSERS_WEIGHTS) if (folder / n).is_file()]
    if not files:
        raise FileNotFoundError(
            f"no adapter in {str(folder)!r}: expected {_PEFT_WEIGHTS} (PEFT) or "
            f"{_DIFFUSERS_WEIGHTS} (diffusers)"
        )
    saved = load_file(str(files[0]))
    marker = f".{adapter_name}."
    names = {n.replace(marker, "."): n for n, _ in model.named_parameters() if marker in n}
    own = dict(model.named_parameters())
    unknown = [k for k in saved if k not in names]
    wrong = [
        f"{k}: saved {tuple(v.shape)}, the model has {tuple(own[names[k]].shape)}"
        for k, v in saved.items()
        if k in names and v.shape != own[names[k]].shape
    ]
    if unknown or wrong:
        raise ValueError(
            f"the adapter in {str(folder)!r} does not fit the model's adapter {adapter_name!r}: "
            + "; ".join(([f"unknown tensors {_few(unknown)}"] if unknown else []) + wrong[:8])
        )
    return {names[k]: v for k, v in saved.items()}


def _writer(model: nn.Module, adapter_name: str) -> Any:
    """The library's own writer of ``model``'s adapter ``adapter_name``: ``writer(folder)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        have = list(configs) if isinstance(configs, Mapping) else []
        raise TypeError(
            f"model must be a PEFT PeftModel or a diffusers model with PEFT LoRA layers that "
            f"has the adapter {adapter_name!r}; got {type(model).__name__} with adapters "
            f"{have} (wrap it with peft.get_peft_model, or model.add_adapter(LoraConfig(...)))"
        )
    if _is_peft_model(model):
        save_pretrained: Any = model.save_pretrained
        return lambda folder: save_pretrained(str(folder), selected_adapters=[adapter_name])
    save = getattr(model, "save_lora_adapter", None)
    if callable(save):
        return lambda folder: save(str(folder), adapter_name=adapter_name)
    raise TypeError(
        f"model {type(model).__name__} has PEFT adapters but neither PEFT's save_pretrained nor "
        "diffusers' save_lora_adapter: wrap it with peft.get_peft_model"
    )


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - PEFT is what makes peft_config
        return False
    return isinstance(model, PeftModel)


def _check_adapter_params(model: nn.Module, params: Mapping[str, Tensor], adapter: str) -> None:
    """``params`` must be one condition's tensors of the adapter (bind checks the rest)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must map names to tensors, got {type(params).__name__}")
    marker = f".{adapter}."
    foreign = [k for k in params if marker not in k]
    if foreign:
        raise ValueError(
            f"params hold tensors that are not the adapter {adapter!r}'s: {_few(foreign)}; an "
            "adapter file holds the adapter alone: generate only it, e.g. "
            "HyperNetwork(..., include='*lora_*')"
        )
