r"""The process-wide switches that let stock modules run under ``torch.func.vmap``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["vmap_compatible"]


@contextmanager
def vmap_compatible() -> Iterator[None]:
    r"""Within the block, common modules run under ``torch.func.vmap`` with gradients.

    Three things keep stock modules from running under ``vmap``; each is fixed here by global,
    value-preserving switches, undone on exit even when the body raises (blocks that overlap,
    in threads, share them: the last one out restores what the first one in found):

    * ``nn.GroupNorm`` on a non-contiguous input, which diffusers' attention and ResNet blocks
      pass (``group_norm(h.transpose(1, 2))``), fails with ``NYI: querying is_contiguous inside
      of vmap``. A global forward pre-hook makes GroupNorm inputs contiguous.
    * ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in eval mode take a fused
      fast path that cannot see that gradients are needed through ``vmap``, and then fail in the
      backward (``derivative for aten::_native_multi_head_attention is not implemented``), or
      run it one sample at a time. The fast path is switched off
      (``torch.backends.mha.set_fastpath_enabled(False)``).
    * ``scaled_dot_product_attention`` picks a fused kernel (flash attention on CPU) that has
      no derivative with respect to a mask that needs one under ``vmap`` (T5's learned position
      bias: "not differentiable with respect to argument 'attn_mask'"). The math kernel is
      forced (``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])``).

    Nothing is subclassed, patched or registered on the user's modules, so this is safe to wrap
    around any code; :func:`per_sample_call` enters it around its ``vmap`` fallback. Use it
    around your own ``vmap`` of such modules.

    Example:
        >>> from torch.func import functional_call, stack_module_state, vmap
        >>> norm = nn.GroupNorm(2, 4)
        >>> params = stack_module_state([nn.GroupNorm(2, 4) for _ in range(3)])[0]
        >>> x = torch.randn(3, 2, 5, 4).transpose(-1, -2)  # not contiguous: (3, 2, 4, 5)
        >>> with vmap_compatible():
        ...     y = vmap(lambda p, x: functional_call(norm, p, x))(params, x)
        >>> y.shape
        torch.Size([3, 2, 4, 5])
    """
    global _inside
    with _switches_lock:
        if _inside == 0:  # the first block in: switch, and remember how to switch back
            _switch_on(_switches)
        _inside += 1
    try:
        yield
    finally:
        with _switches_lock:
            _inside -= 1
            if _inside == 0:  # the last block out, whatever the order the blocks left in
                _switches.close()


# The switches are process-wide, so blocks that overlap (threads) share them: the first block in
# turns them on and the last one out restores what the first found.
_switches = contextlib.ExitStack()
_switches_lock = threading.Lock()
_inside = 0


def _switch_on(stack: contextlib.ExitStack) -> None:
    # torch types a global pre-hook as returning None; its docs let it return a new input tuple.
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        _contiguous_input  # type: ignore[arg-type]
    )
    stack.callback(handle.remove)
    stack.callback(
        torch.backends.mha.set_fastpath_enabled, torch.backends.mha.get_fastpath_enabled()
    )
    torch.backends.mha.set_fastpath_enabled(False)
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))  # restores the backends on close


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if isinstance(module, nn.GroupNorm) and args and isinstance(args[0], Tensor):
        return (args[0].contiguous(), *args[1:])
    return None
