"""The traps of docs/pitfalls.md, each a clear error or correct behaviour: non-finite inputs,
checkpoints with the downstream's buffers, a downstream changed after construction, batched
parameters where one set is expected, keys in another order, gradients at init."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from torchhyper import EmbeddingHyperNetwork as Ids
from torchhyper import (
    HyperNetwork,
    checkpoint_state,
    load_checkpoint_state,
    output_regularizer,
    per_sample_call,
)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def perturbed(hyper: nn.Module) -> nn.Module:
    """As after training: the update depends on the input."""
    with torch.no_grad():
        for p in hyper.head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return hyper


# Non-finite inputs ---------------------------------------------------------------------------


def test_a_non_finite_batch_leaves_the_running_mean_as_it_was():
    """forward() on a set with a NaN: a warning, NaN outputs for that call, the running mean
    untouched; later calls, training or eval, are as if the bad call never happened."""
    torch.manual_seed(0)
    hyper = perturbed(HyperNetwork(3, [16], mlp()))
    clean = copy.deepcopy(hyper)
    x = torch.randn(6, 3)
    hyper(x), clean(x)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.warns(UserWarning, match="1 of 1 embeddings in this training call are not finite"):
        out = hyper(bad)
    assert not torch.isfinite(out["0.weight"]).all()
    assert torch.isfinite(hyper.center).all()
    torch.testing.assert_close(hyper.center, clean.center, rtol=0, atol=0)
    assert hyper.center_calls == clean.center_calls
    later = torch.randn(6, 3)
    for mode in (True, False):
        hyper.train(mode), clean.train(mode)
        for a, b in zip(hyper(later).values(), clean(later).values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_sample_rows_stay_isolated_within_and_across_calls():
    """One bad example: its own weights are not finite, every other row's are those of the same
    call without it, and the next call equals a hypernetwork's that never saw it."""
    torch.manual_seed(0)
    hyper = perturbed(HyperNetwork(3, [16], mlp()))
    hyper(torch.randn(5, 3))
    without = copy.deepcopy(hyper)
    x = torch.randn(5, 3)
    bad = x.clone()
    bad[1] = float("inf")
    with pytest.warns(UserWarning, match="1 of 5 embeddings"):
        rows = hyper.per_sample(bad)
    keep = [0, 2, 3, 4]
    expected = without.per_sample(x[keep])
    for name, v in rows.items():
        assert not torch.isfinite(v[1]).all()
        torch.testing.assert_close(v[keep], expected[name])
    later = torch.randn(5, 3)
    for a, b in zip(hyper.per_sample(later).values(), without.per_sample(later).values()):
        torch.testing.assert_close(a, b)


def test_eval_mode_is_pure():
    hyper = HyperNetwork(3, [16], mlp()).eval()
    before = {k: v.clone() for k, v in hyper.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning: nothing is left out of anything
        hyper(torch.full((4, 3), float("nan")))
        hyper.per_sample(torch.randn(4, 3))
    for k, v in hyper.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_batch_norm_statistics_in_per_sample_call_skip_a_non_finite_sample():
    """per_sample_call's BatchNorm updates the module's running statistics once per call, with
    the average over samples: a sample with a NaN is left out of it."""
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    params = {n: p.detach().expand(3, *p.shape).clone() for n, p in bn.named_parameters()}
    x = torch.randn(3, 8, 3)
    x[0, 5, 2] = float("nan")
    with pytest.warns(UserWarning, match="1 of 3 samples reach BatchNorm1d with non-finite"):
        per_sample_call(bn, params, x)
    assert torch.isfinite(bn[1].running_mean).all() and torch.isfinite(bn[1].running_var).all()


# Checkpoints ---------------------------------------------------------------------------------


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 3),
    )  # fmt: skip


def trained_pair(seed: int = 0) -> tuple[HyperNetwork, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    downstream = cnn()
    hyper = HyperNetwork(16, [16], downstream)
    optimizer = torch.optim.Adam(hyper.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(8, 16) * 3 + 1  # running statistics far from the init's
        loss = functional_call(downstream, hyper(x), x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return hyper.eval(), downstream.eval(), optimizer


def test_a_checkpoint_keeps_the_downstreams_buffers():
    """The hypernetwork's state dict alone loses BatchNorm's running statistics; checkpoint_state
    holds them, and restores the outputs exactly."""
    hyper, downstream, optimizer = trained_pair()
    x = torch.randn(5, 16)
    want = functional_call(downstream, hyper(x), x)
    state = checkpoint_state(hyper, downstream, optimizer)
    assert set(state["downstream"]) == {
        "2.running_mean",
        "2.running_var",
        "2.num_batches_tracked",
    }
    fresh_hyper, fresh_downstream, fresh_optimizer = trained_pair(seed=1)
    fresh_hyper.load_state_dict(state["hypernetwork"])
    alone = functional_call(fresh_downstream, fresh_hyper(x), x)
    assert not torch.allclose(alone, want)  # the buffers were the fresh downstream's
    load_checkpoint_state(fresh_hyper, state, fresh_downstream, fresh_optimizer)
    torch.testing.assert_close(functional_call(fresh_downstream, fresh_hyper(x), x), want)
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_loading_a_checkpoint_checks_every_part_before_writing():
    hyper, downstream, optimizer = trained_pair()
    state = checkpoint_state(hyper)  # the downstream it was built on, by default
    other_hyper, other_downstream, other_optimizer = trained_pair(seed=1)
    before = copy.deepcopy((other_hyper.state_dict(), other_downstream.state_dict()))

    def unchanged() -> None:
        for old, new in zip(before, (other_hyper.state_dict(), other_downstream.state_dict())):
            for k in old:
                torch.testing.assert_close(new[k], old[k], rtol=0, atol=0)

    bad = {**state, "downstream": {**state["downstream"], "2.running_mean": torch.zeros(7)}}
    with pytest.raises(ValueError, match=r"2.running_mean: saved \(7,\), the downstream has"):
        load_checkpoint_state(other_hyper, bad, other_downstream)
    unchanged()
    extra = {**state, "downstream": {**state["downstream"], "9.bias": torch.zeros(2)}}
    with pytest.raises(ValueError, match=r"unexpected: \['9.bias'\]"):
        load_checkpoint_state(other_hyper, extra, other_downstream)
    unchanged()
    with pytest.raises(ValueError, match=r"with keys \['hypernetwork', 'downstream', 'optim"):
        load_checkpoint_state(other_hyper, state, other_downstream, other_optimizer)
    unchanged()
    wrong = {**state, "hypernetwork": {**state["hypernetwork"], "gain": torch.zeros(9)}}
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        load_checkpoint_state(other_hyper, wrong, other_downstream)
    unchanged()


# A downstream changed after construction -----------------------------------------------------


def test_an_appended_layer_is_refused():
    downstream = mlp()
    hyper = HyperNetwork(3, [8], downstream)
    downstream.append(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"parameters added since: \['3.weight', '3.bias'\]"):
        hyper(torch.randn(4, 3))


def test_a_replaced_layer_and_a_late_conversion_are_refused():
    downstream = mlp()
    hyper = HyperNetwork(3, [8], downstream)
    downstream[0] = nn.Linear(4, 32)
    with pytest.raises(ValueError, match=r"0.weight: shape \(16, 4\) -> \(32, 4\)"):
        hyper.per_sample(torch.randn(4, 3))
    downstream = mlp()
    ids = Ids(3, 4, downstream)
    downstream.double()
    with pytest.raises(ValueError, match=r"dtype torch.float32 -> torch.float64.*then build"):
        ids(torch.tensor([0, 1]))


def test_tensors_kept_on_another_device_are_refused():
    """Buffers (and parameters that are not generated) must be where the generated ones are."""
    downstream = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    hyper = HyperNetwork(3, [8], downstream, include="0.*")
    downstream[1].to("meta")
    with pytest.raises(ValueError, match=r"another device than the hypernetwork \(cpu\).*1.weight"):
        hyper(torch.randn(4, 3))


def test_new_values_are_not_read_until_rebase():
    """The base is a copy: values loaded into the downstream afterwards change nothing, until
    rebase_ takes them."""
    torch.manual_seed(0)
    downstream = mlp()
    hyper = HyperNetwork(3, [8], downstream).eval()
    x = torch.randn(4, 3)
    before = hyper(x)
    trained = mlp()
    downstream.load_state_dict(trained.state_dict())
    for a, b in zip(hyper(x).values(), before.values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    hyper.rebase_()
    for name, p in downstream.named_parameters():
        torch.testing.assert_close(hyper(x)[name], p.detach(), rtol=0, atol=0)
    other = mlp()
    hyper.rebase_(other)
    torch.testing.assert_close(hyper(x)["2.bias"], other[2].bias.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rebase_ needs .*parameters removed since"):
        hyper.rebase_(nn.Sequential(nn.Linear(4, 16)))
    none = HyperNetwork(3, [8], downstream, base="none")
    with pytest.raises(ValueError, match="rebase_ needs a base, but this hypernetwork has base="):
        none.rebase_()


def test_a_pickled_hypernetwork_still_runs():
    """torch.save of the whole module: the copy forgets its downstream, and checks nothing."""
    import io

    downstream = mlp()
    hyper = HyperNetwork(3, [8], downstream)
    buffer = io.BytesIO()
    torch.save(hyper, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    downstream.append(nn.Linear(2, 2))
    assert loaded(torch.randn(4, 3))["0.weight"].shape == (16, 4)


# Batched and unbatched parameters, keys in another order --------------------------------------


def test_per_sample_call_given_one_set_says_so():
    downstream = mlp()
    hyper = HyperNetwork(3, [8], downstream)
    with pytest.raises(ValueError, match=r"params are one parameter set.*hypernetwork.per_sample"):
        per_sample_call(downstream, hyper(torch.randn(5, 3)), torch.randn(5, 4))


def test_output_regularizer_takes_keys_in_any_order():
    hyper = Ids(4, 3, mlp())
    old = torch.arange(2)
    params = hyper(old)
    targets = {k: v.detach() + 1 for k, v in reversed(list(params.items()))}
    expected = sum((v - (v.detach() + 1)).square().sum() for v in params.values()) / 2
    torch.testing.assert_close(output_regularizer(params, targets), expected)
    with pytest.raises(ValueError, match=r"missing from targets \['0.weight'\], not in params"):
        output_regularizer(params, {k: v for k, v in targets.items() if k != "0.weight"})


# Gradients with respect to the input ---------------------------------------------------------


def test_input_gradients_are_zero_at_init_and_flow_after_a_step():
    """The update starts at exactly zero, so the generated weights do not depend on the input
    until the first optimizer step: the gradient with respect to the input is exactly zero at
    init (docs/pitfalls.md), and nonzero once the head has moved."""
    torch.manual_seed(0)
    downstream = mlp()
    hyper = HyperNetwork(3, [8], downstream)
    c = torch.randn(5, 3, requires_grad=True)
    x = torch.randn(5, 4)
    loss = functional_call(downstream, hyper(c), x).square().sum()
    (grad,) = torch.autograd.grad(loss, c)
    assert torch.equal(grad, torch.zeros_like(grad))
    optimizer = torch.optim.Adam(hyper.parameters(), lr=1e-2)
    optimizer.zero_grad()
    functional_call(downstream, hyper(torch.randn(5, 3)), x).square().sum().backward()
    optimizer.step()
    loss = functional_call(downstream, hyper(c), x).square().sum()
    (grad,) = torch.autograd.grad(loss, c)
    assert grad.abs().sum() > 0
