r"""Batched forms of common layers for :func:`torchhyper.per_sample_call`.

Each handler runs one layer for ``B`` parameter sets at once: input ``x`` of shape ``(B, *)``
whose slice ``x[i]`` is what the layer would see in a loop, parameters either per sample
``(B, *shape)`` or shared (the module's own, when not generated). It returns what
``torch.stack([functional_call(layer, params[i], x[i]) for i in range(B)])`` returns, or
``NotImplemented`` for a configuration it does not cover (the caller then uses ``vmap``).

Linear is a batched matrix product, a convolution is a grouped convolution over the stacked
channels of all samples, the norms normalize as usual and apply per-sample scales and shifts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__: list[str] = []


class _Context:
    """The parameter sets of one call: name -> (B, *shape), plus who owns which tensor."""

    def __init__(self, params: dict[str, Tensor], names: dict[int, str], batch: int) -> None:
        self.params = params
        self.names = names  # id(module's tensor) -> its name in ``params``
        self.batch = batch
        self.fast = True  # False when global module hooks exist: they must see every module

    def get(self, module: nn.Module, attr: str) -> tuple[Tensor | None, bool]:
        """The tensor to use for ``module.<attr>``, and whether it is per sample."""
        own: Tensor | None = module._parameters.get(attr)
        if own is None:
            own = module._buffers.get(attr)
            if own is None:
                return None, False
        value = self.params.get(self.names.get(id(own), ""))
        return (own, False) if value is None else (value, True)


def _affine(y: Tensor, ctx: _Context, module: nn.Module, channel_dim: int) -> Tensor:
    """Applies ``weight`` and ``bias`` (shape ``(C, ...)``) that start at ``channel_dim``."""
    for attr, op in (("weight", torch.mul), ("bias", torch.add)):
        value, batched = ctx.get(module, attr)
        if value is None:
            continue
        trailing = y.dim() - channel_dim - (value.dim() - batched)
        if batched:
            value = value.view(
                value.shape[0], *[1] * (channel_dim - 1), *value.shape[1:], *[1] * trailing
            )
        else:
            value = value.view(*value.shape, *[1] * trailing)
        y = op(y, value)
    return y


def _linear(m: nn.Linear, x: Tensor, ctx: _Context) -> Any:
    w, w_batched = ctx.get(m, "weight")
    b, b_batched = ctx.get(m, "bias")
    if w is None:
        return NotImplemented  # no weight to apply: the layer's own forward decides
    if not w_batched:
        if b is None or not b_batched:
            return F.linear(x, w, b)
        y = F.linear(x, w)
        return y + b.view(b.shape[0], *[1] * (y.dim() - 2), -1)
    # (B, L, in) @ (B, in, out): each slice of x is one example (B, in) or a batch (B, L, in).
    dim = x.dim()
    flat = x.unsqueeze(1) if dim == 2 else x if dim == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
    if b is None:
        y = torch.bmm(flat, w.transpose(1, 2))
    else:
        y = torch.baddbmm(b.unsqueeze(1) if b_batched else b, flat, w.transpose(1, 2))
    return y.squeeze(1) if dim == 2 else y if dim == 3 else y.view(*x.shape[:-1], y.shape[-1])


def _conv(m: nn.modules.conv._ConvNd, x: Tensor, ctx: _Context) -> Any:
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
    if m.padding_mode != "zeros" or x.dim() - 1 not in (dims + 1, dims + 2):
        return NotImplemented
    unbatched = x.dim() - 1 == dims + 1  # each slice is one example (C, *spatial)
    if unbatched:
        x = x.unsqueeze(1)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    w, w_batched = ctx.get(m, "weight")
    b, b_batched = ctx.get(m, "bias")
    if w is None:
        return NotImplemented
    batch, n = x.shape[:2]
    stride, padding, dilation = m.stride, m.padding, m.dilation
    if w_batched:
        # Samples side by side as channel groups: (N, B * C, *) with B * groups groups.
        stacked = x.transpose(0, 1).reshape(n, batch * x.shape[2], *x.shape[3:])
        bias = None if b is None else (b if b_batched else b.expand(batch, -1)).reshape(-1)
        w = w.reshape(-1, *w.shape[2:])
        y = conv(stacked, w, bias, stride, padding, dilation, groups=batch * m.groups)
        y = y.view(n, batch, -1, *y.shape[2:]).transpose(0, 1)
    else:
        flat = x.reshape(batch * n, *x.shape[2:])
        bias = None if b_batched else b
        y = conv(flat, w, bias, stride, padding, dilation, groups=m.groups)
        y = y.view(batch, n, *y.shape[1:])
        if b is not None and b_batched:
            y = y + b.view(batch, 1, -1, *[1] * dims)
    return y.squeeze(1) if unbatched else y


def _layer_norm(m: nn.LayerNorm, x: Tensor, ctx: _Context) -> Any:
    y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return _affine(y, ctx, m, x.dim() - len(m.normalized_shape))


def _group_norm(m: nn.GroupNorm, x: Tensor, ctx: _Context) -> Any:
    if x.dim() < 3:  # a slice needs (N, C, *)
        return NotImplemented
    # Group norm statistics are per example and group: the batch of sets is just more examples.
    y = F.group_norm(x.reshape(-1, *x.shape[2:]), m.num_groups, None, None, m.eps).view(x.shape)
    return _affine(y, ctx, m, 2)


_BATCH_NORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x: Tensor, ctx: _Context) -> Any:
    if x.dim() - 1 not in _BATCH_NORM_DIMS[type(m)]:
        return NotImplemented
    if any(ctx.get(m, a)[1] for a in ("running_mean", "running_var")):
        return NotImplemented  # per-sample running statistics: leave them to vmap
    shape = (1, 1, x.shape[2]) + (1,) * (x.dim() - 3)
    running_mean, running_var = m.running_mean, m.running_var
    if m.training or running_mean is None or running_var is None:
        # Each sample's own batch statistics, as a loop would compute them.
        dims = (1, *range(3, x.dim()))
        count = x.numel() // (x.shape[0] * x.shape[2])
        if m.training and count <= 1:
            return NotImplemented  # let PyTorch raise its own error
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + m.eps)
        if m.training and m.track_running_stats and running_mean is not None:
            _update_running_stats(m, mean, var, count)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
        y = (x - mean) * torch.rsqrt(var + m.eps)
    return _affine(y, ctx, m, 2)


def _update_running_stats(
    m: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, count: int
) -> None:
    """One update with the average over samples of each sample's batch statistics. Samples
    whose statistics are not finite are left out (with a warning): one bad sample would
    otherwise spoil the running statistics every later call reads."""
    tracked, running_mean, running_var = m.num_batches_tracked, m.running_mean, m.running_var
    if tracked is None or running_mean is None or running_var is None:
        return  # track_running_stats registers all three
    with torch.no_grad():
        mean, var = mean.flatten(1), var.flatten(1)
        finite = torch.isfinite(mean).all(1) & torch.isfinite(var).all(1)
        if not bool(finite.all()):
            warnings.warn(
                f"{int((~finite).sum())} of {len(finite)} samples reach {type(m).__name__} with "
                "non-finite values: they are left out of its running statistics",
                UserWarning,
                stacklevel=2,
            )
            mean, var = mean[finite], var[finite]
            if not len(mean):
                return
        tracked.add_(1)
        factor = 1.0 / tracked.item() if m.momentum is None else m.momentum
        unbiased = var * (count / (count - 1))
        running_mean.mul_(1 - factor).add_(mean.mean(0), alpha=factor)
        running_var.mul_(1 - factor).add_(unbiased.mean(0), alpha=factor)


def _embedding(m: nn.Embedding, x: Tensor, ctx: _Context) -> Any:
    w, batched = ctx.get(m, "weight")
    if w is None or m.padding_idx is not None or m.max_norm is not None or x.is_floating_point():
        return NotImplemented  # padding rows get no gradient, max_norm renormalizes in place
    if not batched:
        return F.embedding(x, w)
    rows = torch.arange(x.shape[0], device=x.device).view(-1, *[1] * (x.dim() - 1))
    return w[rows, x]


def _project(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x W^T + b`` for ``x`` of shape (B, L, in), ``w`` (B, out, in) or (out, in)."""
    y = torch.matmul(x, w.transpose(-1, -2))
    if b is not None:
        y = y + (b.unsqueeze(-2) if b.dim() == 2 else b)
    return y


def _cell(
    kind: type, gx: Tensor, gh: Tensor, state: tuple[Tensor, ...], act: Any
) -> tuple[Tensor, ...]:
    """One step: input gates ``gx`` and hidden gates ``gh`` (B, N, G * H) to the new state."""
    if kind is nn.RNN:
        return (act(gx + gh),)
    if kind is nn.GRU:
        xr, xz, xn = gx.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return ((1 - z) * n + z * state[0],)
    i, f, g, o = (gx + gh).chunk(4, -1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _rnn(m: nn.RNNBase, x: Tensor, ctx: _Context) -> Any:
    if getattr(m, "proj_size", 0) or x.dim() - 1 not in (2, 3):
        return NotImplemented
    unbatched = x.dim() == 3  # each slice is one sequence (T, in)
    seq = x.unsqueeze(1) if unbatched else (x if m.batch_first else x.transpose(1, 2))
    batch, n, steps = seq.shape[:3]  # (B, N, T, in)
    kind = type(m)
    act = torch.tanh if getattr(m, "nonlinearity", "tanh") == "tanh" else torch.relu
    directions = 2 if m.bidirectional else 1
    finals: list[tuple[Tensor, ...]] = []
    for layer in range(m.num_layers):
        outputs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = ctx.get(m, "weight_ih" + sfx)[0], ctx.get(m, "weight_hh" + sfx)[0]
            b_ih, b_hh = ctx.get(m, "bias_ih" + sfx)[0], ctx.get(m, "bias_hh" + sfx)[0]
            if w_ih is None or w_hh is None:
                return NotImplemented
            gx = _project(seq.reshape(batch, n * steps, -1), w_ih, b_ih).view(batch, n, steps, -1)
            zeros = seq.new_zeros(batch, n, m.hidden_size)
            state: tuple[Tensor, ...] = (zeros, zeros) if kind is nn.LSTM else (zeros,)
            hs = [zeros] * steps
            for t in reversed(range(steps)) if d else range(steps):
                gh = _project(state[0], w_hh, b_hh)
                state = _cell(kind, gx[:, :, t], gh, state, act)
                hs[t] = state[0]
            outputs.append(torch.stack(hs, dim=2))
            finals.append(state)
        seq = torch.cat(outputs, dim=-1)  # (B, N, T, D * H)
        if m.dropout and m.training and layer < m.num_layers - 1:
            seq = F.dropout(seq, m.dropout, training=True)
    out = seq.squeeze(1) if unbatched else (seq if m.batch_first else seq.transpose(1, 2))
    parts = [
        torch.stack([f[k] for f in finals], dim=1) for k in range(len(finals[0]))
    ]  # (B, D*L, N, H)
    parts = [p.squeeze(2) if unbatched else p for p in parts]
    return (out, parts[0]) if kind is not nn.LSTM else (out, (parts[0], parts[1]))


def _elementwise(m: nn.Module, x: Tensor, ctx: _Context) -> Any:
    return m.forward(x)  # the caller checked for hooks: skip __call__'s overhead


def _relu(m: nn.ReLU, x: Tensor, ctx: _Context) -> Any:
    # Not m.forward: on small inputs, F.relu's Python checks cost as much as the kernel.
    return torch.relu_(x) if m.inplace else torch.relu(x)


_ELEMENTWISE = (
    nn.Identity,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Dropout,
    nn.AlphaDropout,
)

# A handler: (layer, x (B, *), ctx) -> y (B, *) or NotImplemented. The layer is typed Any because
# each handler takes its own layer type, and a callable's argument types cannot be narrowed.
_Handler = Callable[[Any, Tensor, _Context], Any]

_FAST: dict[type[nn.Module], _Handler] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
    nn.RNN: _rnn,
    nn.GRU: _rnn,
    nn.LSTM: _rnn,
    nn.GroupNorm: _group_norm,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.ReLU: _relu,
    **{t: _elementwise for t in _ELEMENTWISE},
}

# Handlers that treat every leading dimension of x as a batch dimension, so that x (B, *) and
# x.unsqueeze(1) (B, 1, *) give the same result, up to that unit dimension.
_ROWWISE: frozenset[_Handler] = frozenset({_linear, _layer_norm, _relu, _elementwise})
