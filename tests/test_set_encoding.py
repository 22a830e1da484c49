"""Set encoding: standardize=, pool="moments", AttentionPool(seeds=k) and encoder=.

Each feature: invariant to the order of the set, any set size, and (for the ones meant to carry
a set's spread) a lower held-out loss than the plain mean pool on a tiny amortized fit whose
answer is the set's per-dimension variances.
"""

from __future__ import annotations

import pytest
import torch
from downstreams import perturb_update_
from torch import nn
from torch.func import functional_call

from torchhyper import HyperNetwork
from torchhyper.pooling import AttentionPool, MomentsPool

D = 3
TRAIN_LOG_SCALE = (-1.2, 1.1)  # the sets' log standard deviations in training: [0.3, 3]


class Gaussian(nn.Module):
    """A diagonal Gaussian: the downstream whose parameters a set's fit is."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(D))
        self.log_scale = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # mean negative log-likelihood
        z = (x - self.loc) * torch.exp(-self.log_scale)
        return (0.5 * z.square() + self.log_scale).sum(-1).mean()


def sets(
    generator: torch.Generator,
    count: int,
    size: int,
    log_scale: tuple[float, float] = TRAIN_LOG_SCALE,
) -> torch.Tensor:
    """Sets of Gaussian samples, means in [-2, 2] and log standard deviations in ``log_scale``
    (by default standard deviations in [0.3, 3])."""
    lo, hi = log_scale
    loc = torch.rand(count, 1, D, generator=generator) * 4 - 2
    scale = torch.exp(lo + torch.rand(count, 1, D, generator=generator) * (hi - lo))
    return loc + scale * torch.randn(count, size, D, generator=generator)


def held_out_nll(
    steps: int = 300, eval_log_scale: tuple[float, float] = TRAIN_LOG_SCALE, **options
) -> float:
    """Trains a hypernetwork over random sets; the held-out NLL of the Gaussians it generates,
    on sets whose log standard deviations lie in ``eval_log_scale``."""
    torch.manual_seed(0)
    downstream = Gaussian().requires_grad_(False)
    hyper = HyperNetwork(D, [32, 32], downstream, **options)
    optimizer = torch.optim.Adam(hyper.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    nll = torch.vmap(lambda p, x: functional_call(downstream, p, x))
    for _ in range(steps):
        x = sets(generator, 16, 64)
        loss = nll(hyper.per_set(x), x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hyper.eval()
    x = sets(torch.Generator().manual_seed(2), 64, 64, eval_log_scale)
    with torch.no_grad():
        return nll(hyper.per_set(x), x).mean().item()


VARIANTS = {
    "standardize": dict(standardize=True),
    "moments": dict(pool="moments"),
    "attention-seeds": dict(pool=AttentionPool(32, seeds=4)),
    "encoder": dict(encoder=nn.Sequential(nn.Linear(D, 32), nn.Tanh()), standardize=True),
    "rho": dict(standardize=True, rho=[32, 16]),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_order_of_the_set_and_its_size_do_not_matter(name):
    options = {k: v for k, v in VARIANTS[name].items()}
    hyper = perturb_update_(HyperNetwork(D, [32, 32], Gaussian(), **options)).eval()
    x = torch.randn(9, D) * 2 + 1
    a, b = hyper(x), hyper(x[torch.randperm(9)])
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-5)
    for size in (1, 2, 50):
        assert hyper(torch.randn(size, D))["loc"].shape == (D,)
    # One pass over a batch of sets, or one example per set, as for the plain MLP and pool.
    batch = torch.randn(4, 7, D)
    torch.testing.assert_close(
        hyper.per_set(batch)["loc"],
        torch.stack([hyper(s)["loc"] for s in batch]),
        atol=1e-5,
        rtol=1e-5,
    )
    each = hyper.per_sample(x)["log_scale"]
    torch.testing.assert_close(
        each, torch.stack([hyper(x[i : i + 1])["log_scale"] for i in range(9)])
    )


def test_features_that_carry_the_spread_beat_the_mean_pool():
    """The fit's answer is each set's per-dimension variance: the plain mean of ReLU encodings
    resolves it poorly, standardizing and the moments pool hand it to the head."""
    mean = held_out_nll()
    standardized = held_out_nll(standardize=True)
    moments = held_out_nll(pool="moments")
    assert standardized < mean - 0.05, (standardized, mean)
    assert moments < mean - 0.02, (moments, mean)


def test_standardize_with_rho_carries_a_fit_beyond_the_training_range():
    """Trained on standard deviations in [0.3, 3] and evaluated on [3, 9]: with the set's
    statistics appended after rho, the head can keep the log-scale linear in the set's log
    standard deviation; from rho alone it saturates."""
    beyond = (1.1, 2.2)
    rho = held_out_nll(eval_log_scale=beyond, rho=[32, 16])
    both = held_out_nll(eval_log_scale=beyond, rho=[32, 16], standardize=True)
    assert both < rho - 0.5, (both, rho)


def test_standardize_appends_the_sets_statistics():
    hyper = HyperNetwork(D, [8], Gaussian(), standardize=True)
    x = torch.randn(5, D) * 3 + 2
    z = hyper.embed(x)
    assert z.shape == (8 + 2 * D,)
    # The head reads the statistics as they are: only the encodings are layer-normalized.
    normed = hyper.norm(z)
    torch.testing.assert_close(normed[8:], z[8:])
    torch.testing.assert_close(normed[:8], nn.functional.layer_norm(z[:8], (8,)))
    torch.testing.assert_close(z[8 : 8 + D], x.mean(0))
    torch.testing.assert_close(z[8 + D :], (x.std(0, correction=0) + 1e-5).log())
    # Any affine change of the set moves only the statistics, not the encoder's input.
    shifted = hyper.embed(x * 2 + 1)
    torch.testing.assert_close(shifted[:8], z[:8], atol=1e-5, rtol=1e-5)


def test_a_cnn_encoder_reads_images():
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())  # (N, 1, 8, 8) -> (N, 144)
    downstream = nn.Linear(2, 2)
    hyper = perturb_update_(HyperNetwork((1, 8, 8), [16], downstream, encoder=cnn))
    assert hyper.encoder[0] is cnn and hyper.norm.normalized_shape == (16,)
    images = torch.randn(6, 1, 8, 8)
    params = hyper(images)
    functional_call(downstream, params, torch.randn(3, 2)).sum().backward()
    assert cnn[0].weight.grad is not None and cnn[0].weight.grad.abs().sum() > 0
    assert hyper.per_set(images.expand(2, -1, -1, -1, -1))["weight"].shape == (2, 2, 2)
    # No MLP after the encoder: the head reads the encoder's 144 features.
    assert HyperNetwork((1, 8, 8), [], downstream, encoder=cnn).norm.normalized_shape == (144,)


def test_encoder_and_standardize_errors():
    with pytest.raises(ValueError, match=r"encoder must map examples \(N, \*\(1, 8, 8\)\)"):
        HyperNetwork((1, 8, 8), [8], nn.Linear(2, 2), encoder=nn.Flatten(0))
    with pytest.raises(TypeError, match=r"encoder must be a torch.nn.Module, got function"):
        HyperNetwork(4, [8], nn.Linear(2, 2), encoder=lambda x: x)
    with pytest.raises(ValueError, match="hidden_sizes must be a non-empty list"):
        HyperNetwork(4, [], nn.Linear(2, 2))  # [] only with an encoder
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    hyper = HyperNetwork((1, 8, 8), [8], nn.Linear(2, 2), encoder=cnn)
    with pytest.raises(ValueError, match=r"with \* == input_dim == \(1, 8, 8\)"):
        hyper(torch.randn(5, 64))
    with pytest.raises(TypeError, match="standardize must be a bool, got int"):
        HyperNetwork(4, [8], nn.Linear(2, 2), standardize=1)


def test_standardize_refuses_a_pool_over_several_processes():
    from torchhyper.distributed import GlobalMean

    with pytest.raises(ValueError, match="cannot be combined with GlobalMean"):
        HyperNetwork(4, [8], nn.Linear(2, 2), standardize=True, pool=GlobalMean())


def test_rho_is_an_mlp_between_the_pool_and_the_head():
    hyper = HyperNetwork(D, [8], Gaussian(), standardize=True, rho=[32, 16])
    assert [m.out_features for m in hyper.rho if isinstance(m, nn.Linear)] == [32, 16]
    assert hyper.rho[0].in_features == 8 + 2 * D
    # rho reads the statistics, and they are appended to its output too, unnormalized.
    x = torch.randn(5, D) * 3 + 2
    z = hyper.embed(x)
    assert z.shape == (16 + 2 * D,) and hyper.norm.normalized_shape == (16,)
    torch.testing.assert_close(hyper.norm(z)[16:], z[16:])
    torch.testing.assert_close(z[16 : 16 + D], x.mean(0))
    torch.testing.assert_close(z[16 + D :], (x.std(0, correction=0) + 1e-5).log())
    assert HyperNetwork(D, [8], Gaussian(), rho=[32, 16]).embed(x).shape == (16,)
    with pytest.raises(ValueError, match=r"rho must be a list of positive ints, got \[0\]"):
        HyperNetwork(D, [8], Gaussian(), rho=[0])


def test_moments_pool_starts_as_the_mean_and_is_smooth_at_one_example():
    pool = MomentsPool(4)
    e = torch.randn(3, 5, 4)
    torch.testing.assert_close(pool.mix(torch.cat([e.mean(1), torch.zeros(3, 4)], -1)), e.mean(1))
    one = torch.randn(1, 4, requires_grad=True)
    pool(one).sum().backward()
    assert torch.isfinite(one.grad).all()
