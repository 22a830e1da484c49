"""Set pooling: the named reductions and attention pooling (Set Transformer PMA)."""

from __future__ import annotations

import pytest
import torch
from downstreams import perturb_update_
from torch import nn
from torch.func import functional_call

from torchhyper import AttentionPool, HyperNetwork
from torchhyper.pooling import POOLS, MaxPool, MeanPool, Pool, SumPool, register_pool


def test_registry_holds_the_built_in_pools():
    assert list(POOLS) == ["mean", "sum", "max", "moments", "attention"]
    assert POOLS["mean"] is MeanPool and POOLS["attention"] is AttentionPool
    for name, cls in POOLS.items():
        hyper = HyperNetwork(3, [8], nn.Linear(2, 2), pool=name)
        assert type(hyper.pool) is cls and hyper.pool.in_features == 8


@pytest.mark.parametrize("pool", list(POOLS))
def test_permutation_invariant_any_set_size(pool):
    hyper = perturb_update_(HyperNetwork(3, [16, 8], nn.Linear(2, 2), pool=pool)).eval()
    x = torch.randn(9, 3)
    a, b = hyper(x), hyper(x[torch.randperm(9)])
    for n in a:
        torch.testing.assert_close(a[n], b[n])
    for size in (1, 2, 50):
        assert hyper(torch.randn(size, 3))["weight"].shape == (2, 2)
    # The set matters: a different set gives different weights.
    assert not torch.allclose(a["weight"], hyper(torch.randn(9, 3))["weight"])


def test_attention_pool_is_trained_and_registered():
    hyper = perturb_update_(HyperNetwork(3, [16], nn.Linear(2, 2), pool="attention")).eval()
    assert isinstance(hyper.pool, AttentionPool)
    names = [n for n, _ in hyper.named_parameters() if n.startswith("pool.")]
    assert "pool.seed" in names and "pool.attention.in_proj_weight" in names
    assert any(k.startswith("pool.") for k in hyper.state_dict())
    x = torch.randn(6, 3)
    functional_call(nn.Linear(2, 2), hyper(x), torch.randn(4, 2)).square().sum().backward()
    missing = [n for n, p in hyper.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_attention_pool_batched_sets():
    pool = AttentionPool(8, num_heads=2)
    sets = torch.randn(4, 5, 8)
    torch.testing.assert_close(pool(sets), torch.stack([pool(s) for s in sets]))


def test_attention_pool_errors():
    with pytest.raises(ValueError, match="num_heads must divide in_features=6, got 4"):
        AttentionPool(6, num_heads=4)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        AttentionPool(6, num_heads=0)
    with pytest.raises(
        TypeError, match=r"AttentionPool\(\) takes num_heads= in place of heads=: pass num_heads=2"
    ):
        AttentionPool(6, heads=2)
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        AttentionPool(0)
    with pytest.raises(ValueError, match=r"encodings \(\*, B, H\) with H == 8, got \(5, 4\)"):
        AttentionPool(8)(torch.randn(5, 4))
    assert AttentionPool(6).num_heads == 2


def test_pool_argument_errors():
    with pytest.raises(
        ValueError,
        match=r"pool must be one of \['mean', 'sum', 'max', 'moments', 'attention'\], a Pool or",
    ):
        HyperNetwork(3, [8], nn.Linear(2, 2), pool="median")
    with pytest.raises(TypeError, match=r"a Pool or a callable \(B, H\) -> \(H,\), got int"):
        HyperNetwork(3, [8], nn.Linear(2, 2), pool=3)
    # A pool's output shape is checked once, on a dummy set, when the hypernetwork is built.
    with pytest.raises(
        ValueError,
        match=r"of width 8 to \(8,\), got \(2, 8\) from a dummy input of shape \(2, 8\)",
    ):
        HyperNetwork(3, [8], nn.Linear(2, 2), pool=lambda e: e)
    with pytest.raises(TypeError, match=r"dummy input of shape \(2, 8\) raised ValueError.*H == 4"):
        HyperNetwork(3, [8], nn.Linear(2, 2), pool=AttentionPool(4))
    with pytest.raises(ValueError, match=r"MeanPool expects encodings \(\*, B, H\), got \(5,\)"):
        MeanPool()(torch.randn(5))


def test_a_callable_for_one_set_is_mapped_over_sets():
    """A user's (B, H) -> (H,) pool serves forward, per_set and per_sample alike."""
    median = lambda e: e.median(dim=0).values  # noqa: E731
    hyper = perturb_update_(HyperNetwork(3, [8], nn.Linear(2, 2), pool=median)).eval()
    sets = torch.randn(4, 5, 3)
    batched = hyper.per_set(sets)["weight"]
    torch.testing.assert_close(batched, torch.stack([hyper(s)["weight"] for s in sets]))
    x = torch.randn(6, 3)
    each = hyper.per_sample(x)["weight"]
    torch.testing.assert_close(each, torch.stack([hyper(x[i : i + 1])["weight"] for i in range(6)]))
    # A module is registered, and so trained; the check left it in training mode.
    module = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    pooled = HyperNetwork(3, [8], nn.Linear(2, 2), pool=lambda e: module(e).mean(0))
    assert module.training and pooled.pool.training
    trained = HyperNetwork(3, [8], nn.Linear(2, 2), pool=_SumOfLinear(8))
    assert any(n.startswith("pool.") for n, _ in trained.named_parameters())


class _SumOfLinear(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, e):
        return self.linear(e).sum(dim=0)


@pytest.fixture
def registered():
    @register_pool("second_moment")
    class SecondMoment(Pool):
        def __init__(self, in_features):
            super().__init__()

        def forward(self, e):
            return e.square().mean(dim=-2)

    yield SecondMoment
    del POOLS["second_moment"]


def test_a_registered_pool_is_a_choice_by_name(registered):
    hyper = HyperNetwork(3, [8], nn.Linear(2, 2), pool="second_moment")
    assert type(hyper.pool) is registered
    e = torch.randn(4, 5, 8)
    torch.testing.assert_close(hyper.pool(e), e.square().mean(1))
    with pytest.raises(ValueError, match="pool name 'second_moment' is taken by"):
        register_pool("second_moment")(type("Other", (Pool,), {}))
    with pytest.raises(TypeError, match=r"register_pool\('x'\) decorates Pool subclasses"):
        register_pool("x")(nn.Linear)
    with pytest.raises(ValueError, match="a pool name must be an identifier, got 'a b'"):
        register_pool("a b")


@pytest.mark.parametrize(
    ("cls", "reduce"), [(MeanPool, torch.mean), (SumPool, torch.sum), (MaxPool, torch.amax)]
)
def test_reductions_take_any_leading_batch(cls, reduce):
    e = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(cls(4)(e), reduce(e, dim=-2))
    torch.testing.assert_close(cls(4).local(e), reduce(e, dim=-2))


def test_context_differs_from_downstream_input():
    """The hypernetwork reads a context c; the downstream reads its own inputs x."""
    downstream = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    hyper = perturb_update_(HyperNetwork(7, [16], downstream, pool="attention")).eval()
    c = torch.randn(12, 7)  # e.g. 12 observed (input, output) pairs of a task
    x = torch.randn(30, 2)  # where the generated downstream is evaluated
    params = hyper(c)
    y = functional_call(downstream, params, x)
    assert y.shape == (30, 1)
    # Same context, other queries: the same weights; other context: other weights.
    torch.testing.assert_close(hyper(c)["0.weight"], params["0.weight"])
    assert not torch.allclose(hyper(torch.randn(12, 7))["0.weight"], params["0.weight"])
    y.square().mean().backward()
    assert all(p.grad is not None for p in hyper.parameters())


def test_per_sample_uses_a_pools_local_form():
    """A set of one lives on one process: per_sample must not reduce across processes."""

    class CrossProcess(Pool):
        def local(self, e):
            return e.mean(dim=-2)

        def forward(self, e):
            if self.training:
                raise RuntimeError("reduced across processes")
            return self.local(e)

    hyper = HyperNetwork(3, [8], torch.nn.Linear(2, 2), pool=CrossProcess())
    x = torch.randn(5, 3)
    reference = HyperNetwork(3, [8], torch.nn.Linear(2, 2), pool="mean")
    reference.load_state_dict(hyper.state_dict())
    torch.testing.assert_close(hyper.per_sample(x)["weight"], reference.per_sample(x)["weight"])
