"""Set pooling: the named reductions and attention pooling (Set Transformer PMA)."""

from __future__ import annotations

import pytest
import torch
from downstreams import perturb_update_
from torch import nn
from torch.func import functional_call

from torchhyper import AttentionPool, HyperNetwork

POOLS = ["mean", "sum", "max", "attention"]


@pytest.mark.parametrize("pool", POOLS)
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
    pool = AttentionPool(8, heads=2)
    sets = torch.randn(4, 5, 8)
    torch.testing.assert_close(pool(sets), torch.stack([pool(s) for s in sets]))


def test_attention_pool_errors():
    with pytest.raises(
        ValueError, match="heads must be a positive int that divides features=6, got 4"
    ):
        AttentionPool(6, heads=4)
    with pytest.raises(ValueError, match="features must be a positive int, got 0"):
        AttentionPool(0)
    with pytest.raises(ValueError, match=r"encodings \(\*, B, H\) with H == 8, got shape \(5, 4\)"):
        AttentionPool(8)(torch.randn(5, 4))
    assert AttentionPool(6).heads == 2


def test_unknown_pool_names_attention():
    with pytest.raises(ValueError, match=r"got 'median' \(attention pooling: pool='attention'"):
        HyperNetwork(3, [8], nn.Linear(2, 2), pool="median")
    with pytest.raises(
        TypeError, match=r"pool must be a name or a callable \(B, H\) -> \(H,\), got 3"
    ):
        HyperNetwork(3, [8], nn.Linear(2, 2), pool=3)


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

    class CrossProcess(torch.nn.Module):
        local = staticmethod(lambda e: e.mean(dim=-2))

        def forward(self, e):
            raise RuntimeError("reduced across processes")

    hyper = HyperNetwork(3, [8], torch.nn.Linear(2, 2), pool=CrossProcess())
    x = torch.randn(5, 3)
    reference = HyperNetwork(3, [8], torch.nn.Linear(2, 2), pool="mean")
    reference.load_state_dict(hyper.state_dict())
    torch.testing.assert_close(hyper.per_sample(x)["weight"], reference.per_sample(x)["weight"])
