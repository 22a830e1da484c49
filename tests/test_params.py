"""bind, load_params and materialize."""

from __future__ import annotations

import pytest
import torch
from downstreams import CASES, GMM, IDS, Case
from torch import nn
from torch.func import functional_call

from torchhyper import HyperNetwork, bind, load_params, materialize


class Flow(nn.Module):
    """An element-wise affine flow with a method other than forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(3))
        self.log_scale = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return (x - self.shift) * torch.exp(-self.log_scale)

    def sample(self, n: int):
        return self.shift + torch.exp(self.log_scale) * torch.randn(n, 3)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bind_matches_functional_call_and_restores(case: Case):
    module = case.build().eval()
    originals = {n: p for n, p in module.named_parameters()}
    hyper = HyperNetwork(4, [8], module)
    params = hyper(torch.randn(6, 4))
    inputs = case.inputs()
    with bind(module, params) as bound:
        assert bound is module
        y = case.output(module(*inputs))
    torch.testing.assert_close(y, case.output(functional_call(module, params, inputs)))
    y.square().sum().backward()
    assert all(p.grad is not None for p in hyper.parameters())
    assert all(p is originals[n] for n, p in module.named_parameters())


def test_bind_any_method_with_gradients():
    flow = Flow()
    hyper = HyperNetwork(3, [8], flow)
    with bind(flow, hyper(torch.randn(10, 3))):
        samples = flow.sample(5)
    samples.sum().backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in hyper.bases)


def test_bind_restores_when_body_raises():
    flow = Flow()
    shift = flow.shift
    with pytest.raises(RuntimeError, match="boom"), bind(flow, {"shift": torch.ones(3)}):
        assert torch.equal(flow.shift, torch.ones(3))
        raise RuntimeError("boom")
    assert flow.shift is shift and isinstance(flow.shift, nn.Parameter)


def test_bind_tied_binds_every_alias():
    module = CASES[IDS.index("tied")].build()
    w = torch.randn(20, 8)
    with bind(module, {"embed.weight": w}):
        assert module.out.weight is w and module.embed.weight is w
    assert module.out.weight is module.embed.weight and isinstance(module.out.weight, nn.Parameter)


def test_bind_errors():
    flow = Flow()
    with pytest.raises(ValueError, match=r"unexpected keys \['scale', 'bias'\]"):
        with bind(flow, {"scale": torch.ones(3), "bias": torch.ones(3)}):
            pass
    with pytest.raises(ValueError, match=r"shift: expected \(3,\), got \(4,\)"):
        with bind(flow, {"shift": torch.ones(4)}):
            pass
    with pytest.raises(TypeError, match="must be a dict of name -> Tensor, got list"):
        with bind(flow, [torch.ones(3)]):
            pass


def test_load_params_writes_by_name():
    module = GMM()
    params = {"log_scales": torch.ones(3), "logits": torch.arange(3.0), "means": torch.zeros(3)}
    load_params(module, params)
    for n, p in module.named_parameters():
        assert torch.equal(p, params[n]) and isinstance(p, nn.Parameter)


def test_load_params_reports_all_offenders():
    module = GMM()
    before = {n: p.clone() for n, p in module.named_parameters()}
    with pytest.raises(
        ValueError, match=r"unexpected keys \['mean'\], missing keys \['means', 'log_scales'\]"
    ):
        load_params(module, {"logits": torch.zeros(3), "mean": torch.zeros(3)})
    with pytest.raises(
        ValueError,
        match=r"logits: expected \(3,\), got \(2,\); means: expected \(3,\), got \(3, 1\)",
    ):
        load_params(
            module,
            {"logits": torch.zeros(2), "means": torch.zeros(3, 1), "log_scales": torch.zeros(3)},
        )
    with pytest.raises(TypeError, match=r"means: expected torch.float32, got torch.float64"):
        load_params(module, {"means": torch.zeros(3, dtype=torch.float64)}, strict=False)
    for n, p in module.named_parameters():  # nothing was written
        assert torch.equal(p, before[n])


def test_materialize_copies():
    module = Flow()
    hyper = HyperNetwork(3, [8], module)
    params = hyper(torch.randn(4, 3))
    copy = materialize(module, params)
    assert copy is not module and torch.equal(module.shift, torch.zeros(3))
    x = torch.randn(2, 3)
    torch.testing.assert_close(copy(x), functional_call(module, params, x))
    assert all(p.grad_fn is None for p in copy.parameters())
