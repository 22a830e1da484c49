"""per_sample_call and HyperNetwork.per_sample: one parameter set per example, in one call."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from downstreams import CASES, IDS, Case
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten

from torchhyper import HyperNetwork, per_sample_call, vmap_compatible

B = 3
CONTEXT_DIM = 5


def stacked_inputs(case: Case) -> tuple:
    """B independent draws of the case's inputs, stacked: each sample gets its own batch."""
    draws = [case.inputs() for _ in range(B)]
    return tuple(torch.stack(parts) for parts in zip(*draws))


def loop(module: nn.Module, params: dict, inputs: tuple) -> object:
    # The attention kernel that per_sample_call's vmap uses (vmap_compatible forces the math
    # one): the comparison is of the batching, not of two kernels' rounding.
    with sdpa_kernel([SDPBackend.MATH]):
        outs = [
            functional_call(
                module, {k: v[i] for k, v in params.items()}, tuple(a[i] for a in inputs)
            )
            for i in range(B)
        ]
    flat = [tree_flatten(o) for o in outs]
    return [torch.stack(parts) for parts in zip(*(f[0] for f in flat))]


def grads(outputs: list, leaves: list, weights: list) -> list:
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_loop_outputs_and_gradients(case: Case):
    """Every module of the table (vmap fallback or fast path) against a loop of functional_call."""
    module = case.build().eval()
    before = copy.deepcopy(module.state_dict())
    params = {
        n: (p.detach() + 0.1 * torch.randn(B, *p.shape)).requires_grad_()
        for n, p in module.named_parameters()
    }
    inputs = tuple(t.requires_grad_() if t.is_floating_point() else t for t in stacked_inputs(case))
    leaves = list(params.values()) + [t for t in inputs if t.requires_grad]

    got = tree_flatten(per_sample_call(module, params, inputs))[0]
    want = loop(module, params, inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    weights = [torch.randn_like(w) for w in want]
    for g, w, name in zip(
        grads(got, leaves, weights),
        grads(want, leaves, weights),
        list(params) + ["input"] * len(inputs),
    ):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(
                g, w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )
    after = module.state_dict()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.RNN(3, 5, num_layers=2, nonlinearity="relu"),
        lambda: nn.GRU(3, 5, bidirectional=True, batch_first=True),
        lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True),
    ],
    ids=["rnn_relu_2layers", "gru_bidirectional", "lstm_bidirectional_2layers"],
)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_recurrent_variants(build, batched):
    """vmap has no batching rule for RNNs; the batched recurrence covers their options."""
    module = build().eval()
    params = {n: p.detach() + 0.1 * torch.randn(B, *p.shape) for n, p in module.named_parameters()}
    shape = (B, 4, 6, 3) if batched else (B, 6, 3)
    x = torch.randn(shape)
    got = tree_flatten(per_sample_call(module, params, x))[0]
    for g, w in zip(got, loop(module, params, (x,))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_unselected_parameters_are_shared():
    module = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(16, 3))
    params = {"0.weight": torch.randn(B, 4, 2, 3, 3), "3.bias": torch.randn(B, 3)}
    x = torch.randn(B, 5, 2, 4, 4)
    torch.testing.assert_close(per_sample_call(module, params, x), loop(module, params, (x,))[0])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_train_mode_policy(momentum):
    """Train mode: each sample normalizes with its own batch statistics, as the loop does; the
    running statistics move once, by the average of the samples' updates."""
    for wrap in (lambda m: m, lambda m: nn.Sequential(nn.Identity(), Custom(m))):  # fast path, vmap
        module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum)).train()
        module = wrap(module)
        params = {
            n: (p.detach() + 0.1 * torch.randn(B, *p.shape)).requires_grad_()
            for n, p in module.named_parameters()
        }
        x = torch.randn(B, 6, 3, 5, 5)
        start = copy.deepcopy(module)
        got = per_sample_call(module, params, x)
        updated = module.state_dict()

        outs, states = [], []
        for i in range(B):
            fresh = copy.deepcopy(start)  # each loop step from the same running statistics
            outs.append(functional_call(fresh, {k: v[i] for k, v in params.items()}, x[i]))
            states.append(fresh.state_dict())
        running = {k: [s[k] for s in states] for k in updated if "running" in k}
        start = start.state_dict()
        torch.testing.assert_close(got, torch.stack(outs), rtol=1e-5, atol=1e-5)
        r = torch.randn_like(got)  # not a plain sum of squares: that is constant after a norm
        g1 = torch.autograd.grad((got * r).sum(), list(params.values()))
        g2 = torch.autograd.grad((torch.stack(outs) * r).sum(), list(params.values()))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for k, values in running.items():
            torch.testing.assert_close(updated[k], torch.stack(values).mean(0))
        tracked = [k for k in start if k.endswith("num_batches_tracked")]
        assert [updated[k].item() for k in tracked] == [start[k].item() + 1 for k in tracked]


class Custom(nn.Module):
    """A module with its own forward: it runs under vmap, not by a fast path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.0


def test_hooks_and_custom_modules_use_vmap():
    calls = []
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    module[2].register_forward_hook(lambda m, a, y: calls.append(y.shape))
    params = {n: torch.randn(B, *p.shape) for n, p in module.named_parameters()}
    x = torch.randn(B, 4)
    got = per_sample_call(module, params, x)
    assert calls == [torch.Size([2])]  # the hook ran, on one sample's output (under vmap)
    torch.testing.assert_close(got, loop(module, params, (x,))[0])


def test_multiple_inputs_kwargs_and_shared():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)

        def forward(self, x, y, *, scale: float = 1.0, extra=None):
            return (self.a(x) + self.b(y)) * scale + (0 if extra is None else extra)

    module = TwoInputs()
    params = {n: torch.randn(B, *p.shape) for n, p in module.named_parameters()}
    x, y, extra = torch.randn(B, 3), torch.randn(B, 2), torch.randn(B, 4)
    got = per_sample_call(module, params, (x, y), {"scale": 2.0, "extra": extra})
    want = torch.stack(
        [
            functional_call(
                module,
                {k: v[i] for k, v in params.items()},
                (x[i], y[i]),
                {"scale": 2.0, "extra": extra[i]},
            )
            for i in range(B)
        ]
    )
    torch.testing.assert_close(got, want)


def test_errors():
    module = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    good = {n: torch.randn(B, *p.shape) for n, p in module.named_parameters()}
    x = torch.randn(B, 4)
    per_sample_call(module, good, x)  # a signature seen before is still checked against x
    with pytest.raises(
        ValueError, match=r"not parameters or buffers of Sequential: \['2.weight'\]"
    ):
        per_sample_call(module, {**good, "2.weight": torch.randn(B, 2)}, x)
    with pytest.raises(ValueError, match=r"0.weight: expected \(3, 6, 4\), got \(6, 4\)"):
        per_sample_call(module, {**good, "0.weight": torch.randn(6, 4)}, x)
    with pytest.raises(ValueError, match=r"1.bias: expected \(3, 2\), got \(4, 2\)"):
        per_sample_call(module, {**good, "1.bias": torch.randn(4, 2)}, x)
    with pytest.raises(
        ValueError, match=r"leading dimension B == 3 of params, got shapes \[\(5, 4\)\]"
    ):
        per_sample_call(module, good, torch.randn(5, 4))
    with pytest.raises(
        ValueError, match=r"leading dimension B == 3 of params, got shapes \[\(2, 3\), \(2,\)\]"
    ):
        per_sample_call(module, good, (x, torch.randn(2, 3)), {"y": [torch.randn(2)]})
    with pytest.raises(TypeError, match="params must be a dict of name -> Tensor, got list"):
        per_sample_call(module, [1], x)
    odd = r"params must map names to tensors \(B, \*shape\), got \['0.bias \(list\)'\]"
    with pytest.raises(TypeError, match=odd):
        per_sample_call(module, {**good, "0.bias": [0.0] * 6}, x)
    with pytest.raises(ValueError, match="params is empty"):
        per_sample_call(module, {}, x)


@pytest.mark.parametrize("pool", ["mean", "sum", "max", "attention", lambda e: e.mean(0) * 2])
def test_hypernetwork_per_sample_and_per_set(pool):
    module = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    hyper = HyperNetwork(CONTEXT_DIM, [16, 12], module, pool=pool)
    c = torch.randn(4, CONTEXT_DIM)
    per_sample = hyper.per_sample(c)
    for i in range(4):
        for name, value in hyper(c[i : i + 1]).items():
            torch.testing.assert_close(per_sample[name][i], value)
    sets = torch.randn(3, 5, CONTEXT_DIM)
    per_set = hyper.per_set(sets)
    for s in range(3):
        for name, value in hyper(sets[s]).items():
            torch.testing.assert_close(per_set[name][s], value)
    # The context c conditions the weights; the downstream reads other inputs x.
    x = torch.randn(4, 7, 2)
    y = per_sample_call(module, per_sample, x)
    assert y.shape == (4, 7, 1)
    y.square().sum().backward()
    missing = [n for n, p in hyper.named_parameters() if p.grad is None]
    assert not missing, missing


def test_per_set_errors():
    hyper = HyperNetwork(CONTEXT_DIM, [8], nn.Linear(2, 2))
    with pytest.raises(
        ValueError, match=r"non-empty batch of sets \(S, B, \*\) .* got shape \(5,\)"
    ):
        hyper.per_set(torch.randn(5))
    with pytest.raises(
        ValueError, match=r"\(S, B, \*\) with prod\(\*\) == input_dim == 5, got shape \(2, 3, 4\)"
    ):
        hyper.per_set(torch.randn(2, 3, 4))


def test_vmap_compatible_restores_hooks_on_error():
    from torch.nn.modules import module as m

    count = len(m._global_forward_pre_hooks)
    assert torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError, match="boom"), vmap_compatible():
        assert len(m._global_forward_pre_hooks) == count + 1
        assert not torch.backends.mha.get_fastpath_enabled()
        raise RuntimeError("boom")
    assert len(m._global_forward_pre_hooks) == count
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.skipif("unet" not in IDS, reason="diffusers is not installed")
def test_unet_under_plain_vmap_needs_vmap_compatible():
    """Without the context, vmap fails inside diffusers' blocks; with it, it matches the loop."""
    case = CASES[IDS.index("unet")]
    module = case.build().eval()
    params = {n: p.detach() + 0.01 * torch.randn(2, *p.shape) for n, p in module.named_parameters()}
    x, t = torch.randn(2, 2, 1, 8, 8), torch.tensor([[3, 5], [7, 1]])

    def call(p, a, b):
        return functional_call(module, p, (a, b)).sample

    with pytest.raises(RuntimeError, match="inside of vmap"):
        torch.func.vmap(call)(params, x, t)
    with vmap_compatible():
        got = torch.func.vmap(call)(params, x, t)
    want = torch.stack([call({k: v[i] for k, v in params.items()}, x[i], t[i]) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["none", "learned"])
def test_many_sets_fold_scale_into_dense_head(base):
    """With more sets than embedding features, the dense head's weights carry the per-tensor
    scale and base: same values and gradients as generating the sets one by one (in eval
    mode, where the embeddings' running mean stays put)."""
    module = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    hyper = HyperNetwork(CONTEXT_DIM, [8], module, head="dense", base=base).eval()
    with torch.no_grad():
        hyper.gain.uniform_(0.5, 1.5)  # make every tensor depend on the head
        hyper.head.weight.normal_(0, 0.3)
    c = torch.randn(20, CONTEXT_DIM)  # 20 sets > 8 features: the folded path
    folded = hyper.per_sample(c)
    one_by_one = [hyper(c[i : i + 1]) for i in range(20)]
    for name, value in folded.items():
        torch.testing.assert_close(value, torch.stack([p[name] for p in one_by_one]))
    weights = {n: torch.randn_like(v) for n, v in folded.items()}

    def gradients(params_list) -> dict:
        hyper.zero_grad()
        sum(
            (params[n] * weights[n][i]).sum()
            for i, params in enumerate(params_list)
            for n in params
        ).backward()
        return {n: p.grad.clone() for n, p in hyper.named_parameters()}

    a = gradients([{n: v[i] for n, v in hyper.per_sample(c).items()} for i in range(20)])
    b = gradients([hyper(c[i : i + 1]) for i in range(20)])
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-5)


def test_cached_plan_follows_module_changes():
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    x = torch.randn(B, 4)
    params = {n: torch.randn(B, *p.shape) for n, p in module.named_parameters()}
    torch.testing.assert_close(per_sample_call(module, params, x), loop(module, params, (x,))[0])
    module.append(nn.Linear(6, 2))  # a new layer: new names, a new plan
    params = {n: torch.randn(B, *p.shape) for n, p in module.named_parameters()}
    torch.testing.assert_close(per_sample_call(module, params, x), loop(module, params, (x,))[0])
    module[2].bias = nn.Parameter(torch.full((2,), 5.0))  # a replaced, unselected parameter is used
    del params["2.bias"]
    torch.testing.assert_close(per_sample_call(module, params, x), loop(module, params, (x,))[0])
    calls = []
    module.register_forward_hook(lambda m, a, y: calls.append(y.shape))  # a container hook: vmap
    torch.testing.assert_close(per_sample_call(module, params, x), loop(module, params, (x,))[0])
    assert calls[0] == torch.Size([2])


@pytest.mark.parametrize("hooked", [None, 0, 2], ids=["no_hook", "hook_first", "hook_middle"])
def test_vectors_through_rowwise_layers(hooked):
    """Per-sample vectors (B, D) through Linear, LayerNorm and activations, which run them as
    rows (B, 1, D): the loop's outputs and gradients, and a hooked layer (under vmap) sees one
    sample's vector, as in the loop."""
    module = nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 5, bias=False),
        nn.LayerNorm(5),
        nn.Tanh(),
        nn.Linear(5, 3),
    )
    seen = []
    if hooked is not None:
        module[hooked].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    params = {  # 5.weight is not generated: the module's own, shared by all samples
        n: (p.detach() + 0.1 * torch.randn(B, *p.shape)).requires_grad_()
        for n, p in module.named_parameters()
        if n != "5.weight"
    }
    x = torch.randn(B, 4, requires_grad=True)
    got = per_sample_call(module, params, x)
    if hooked is not None:
        assert seen == [torch.Size([module[hooked].in_features])]
    want = loop(module, params, (x,))[0]
    assert got.shape == (B, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    leaves = [*params.values(), x, module[5].weight]
    weights = torch.randn_like(want)
    for g, w in zip(grads([got], leaves, [weights]), grads([want], leaves, [weights])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_cached_checks_follow_module_changes():
    """A signature of params seen before is checked again when the module changes."""
    linear = nn.Linear(4, 2, bias=False)
    params = {"weight": torch.randn(B, 2, 4)}
    x = torch.randn(B, 4)
    per_sample_call(linear, params, x)
    linear.bias = nn.Parameter(torch.full((2,), 5.0))  # registered after the first call: used
    torch.testing.assert_close(per_sample_call(linear, params, x), loop(linear, params, (x,))[0])
    linear.weight.data = torch.randn(2, 3)  # same tensor, a new size
    with pytest.raises(ValueError, match=r"weight: expected \(3, 2, 3\), got \(3, 2, 4\)"):
        per_sample_call(linear, params, x)


@pytest.mark.parametrize(
    "build",
    [lambda: nn.Sequential(nn.Linear(3, 2), nn.Sequential(nn.Tanh())), lambda: nn.Linear(3, 2)],
    ids=["sequential", "layer"],
)
def test_downstream_is_not_kept_alive(build):
    """What per_sample_call caches about a module does not keep the module alive."""
    module = build()
    params = {n: torch.randn(B, *p.shape) for n, p in module.named_parameters()}
    per_sample_call(module, params, torch.randn(B, 3))
    ref = weakref.ref(module)
    del module
    gc.collect()
    assert ref() is None


def _switches():
    from torch.nn.modules import module as m

    return (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        len(m._global_forward_pre_hooks),
    )


@pytest.mark.parametrize("order", ["first-in-first-out", "last-in-first-out"])
def test_vmap_compatible_blocks_that_overlap_restore_the_switches(order):
    """Two blocks that overlap (as two threads would) share the process-wide switches: they
    stay on while either is inside, and the last one out restores what the first one found."""
    before = _switches()
    first, second = vmap_compatible(), vmap_compatible()
    first.__enter__()
    inside = _switches()
    assert inside[0] is False and inside[1] is False and inside[3] == before[3] + 1
    second.__enter__()
    leaving = [first, second] if order == "first-in-first-out" else [second, first]
    leaving[0].__exit__(None, None, None)
    assert _switches() == inside  # the other block is still inside
    leaving[1].__exit__(None, None, None)
    assert _switches() == before
    with pytest.raises(RuntimeError, match="body"):
        with vmap_compatible():
            raise RuntimeError("body")
    assert _switches() == before
