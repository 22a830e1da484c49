"""bind, load_params and materialize."""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from downstreams import CASES, GMM, IDS, Case
from torch import nn
from torch.func import functional_call

from torchhyper import EmbeddingHyperNetwork, HyperNetwork, bind, load_params, materialize


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
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in hyper.base)


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


# Pitfalls: subsets, non-tensors, batched sets, aliasing, modules deepcopy cannot copy ---------


def run_bind(module, params):
    with bind(module, params):
        pass


def run_load(module, params):
    load_params(module, params, strict=False)


APPLY = [run_bind, run_load, materialize]
APPLY_IDS = ["bind", "load_params", "materialize"]


def test_a_subset_needs_strict_false_in_load_params_only():
    flow = Flow()
    hyper = HyperNetwork(3, [8], flow, include="shift")
    params = hyper(torch.randn(4, 3))
    assert list(params) == ["shift"]
    with pytest.raises(ValueError, match=r"missing keys \['log_scale'\]") as error:
        load_params(flow, params)
    assert "covers only a subset of the module's parameters" in str(error.value)
    assert "pass strict=False" in str(error.value)
    assert torch.equal(flow.shift, torch.zeros(3))  # nothing was written

    load_params(flow, params, strict=False)
    assert torch.equal(flow.shift, params["shift"]) and torch.equal(flow.log_scale, torch.zeros(3))
    # bind and materialize take a subset as it is; the others keep the module's values.
    other, x = Flow(), torch.randn(2, 3)
    with bind(other, params):
        bound = other(x)
    copied = materialize(other, params)
    reference = functional_call(other, params, x)
    torch.testing.assert_close(bound, reference)
    torch.testing.assert_close(copied(x), reference)
    assert torch.equal(copied.log_scale, other.log_scale)


def test_a_mismatch_that_is_not_a_subset_gets_no_strict_hint():
    with pytest.raises(ValueError, match=r"unexpected keys \['scale'\]") as error:
        load_params(Flow(), {"scale": torch.zeros(3)})
    assert "strict=False" not in str(error.value)


@pytest.mark.parametrize("apply", APPLY, ids=APPLY_IDS)
def test_values_that_are_not_tensors_are_named_with_their_type(apply):
    flow = Flow()
    with pytest.raises(TypeError, match="values must be tensors") as error:
        apply(flow, {"shift": 0.5, "log_scale": [0.0, 0.0, 0.0]})
    assert "params['shift'] is float; params['log_scale'] is list" in str(error.value)
    assert "torch.as_tensor" in str(error.value)
    assert torch.equal(flow.shift, torch.zeros(3)) and isinstance(flow.shift, nn.Parameter)


def per_sample(module):
    return HyperNetwork(4, [8], module).per_sample(torch.randn(5, 4))


def per_set(module):
    return HyperNetwork(4, [8], module).per_set(torch.randn(5, 7, 4))


def per_id(module):
    return EmbeddingHyperNetwork(6, 4, module)(torch.tensor([0, 1, 2, 3, 4]))


@pytest.mark.parametrize("apply", APPLY, ids=APPLY_IDS)
@pytest.mark.parametrize("generate", [per_sample, per_set, per_id])
def test_batched_params_point_to_per_sample_call(apply, generate):
    module = nn.Linear(2, 3)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    params = generate(module)
    assert params["weight"].shape == (5, 3, 2)
    with pytest.raises(ValueError, match=r"weight: expected \(3, 2\), got \(5, 3, 2\)") as error:
        apply(module, params)
    message = str(error.value)
    assert "extra leading dimension, (B, *shape) where the module expects shape" in message
    assert "weight (B=5), bias (B=5)" in message
    assert "torchhyper.per_sample_call(module, params, x)" in message
    assert "{k: v[i] for k, v in params.items()}" in message
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]) and isinstance(p, nn.Parameter)
    apply(module, {k: v[2] for k, v in params.items()})  # the fix the message gives works


def test_other_shape_errors_keep_their_message():
    with pytest.raises(
        ValueError,
        match=r"^params has wrong shapes: shift: expected \(3,\), got "
        r"\(3, 1\); log_scale: expected \(3,\), got \(2, 4\)$",
    ):
        load_params(Flow(), {"shift": torch.zeros(3, 1), "log_scale": torch.zeros(2, 4)})


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        self.b = nn.Parameter(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
        self.c = nn.Parameter(torch.tensor([[9.0, 10.0], [11.0, 12.0]]))


def test_load_params_reads_every_value_before_the_first_write():
    module = Pair()
    a, b, c = (p.detach().clone() for p in (module.a, module.b, module.c))
    parameters = dict(module.named_parameters())

    load_params(module, {"a": module.b, "b": module.a}, strict=False)  # a swap
    assert torch.equal(module.a, b) and torch.equal(module.b, a)
    load_params(module, {"a": module.b, "b": module.a}, strict=False)  # and back
    assert torch.equal(module.a, a) and torch.equal(module.b, b)

    load_params(module, {"a": module.c, "b": module.a, "c": module.b})  # a rotation
    assert torch.equal(module.a, c) and torch.equal(module.b, a) and torch.equal(module.c, b)

    load_params(module, {"a": module.a.t(), "b": module.a.detach()[0].expand(2, 2)}, strict=False)
    assert torch.equal(module.a, c.t()) and torch.equal(module.b, c[0].expand(2, 2))  # views

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    load_params(module, dict(module.named_parameters()))  # its own values: unchanged
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert all(p is parameters[n] for n, p in module.named_parameters())  # written in place


class Locked(nn.Module):
    """A module deepcopy cannot copy: a lock on one of its submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2))
        self.inner[0].lock = threading.Lock()


def test_materialize_names_what_cannot_be_deep_copied():
    module = Locked()
    bias = module.inner[0].bias.detach().clone()
    with pytest.raises(TypeError, match="Locked cannot be deep-copied") as error:
        materialize(module, {"inner.0.bias": torch.ones(2)})
    message = str(error.value)
    assert "cannot pickle '_thread.lock' object" in message
    assert "attributes that cannot be copied: inner.0.lock (lock)" in message
    assert "Make it deep-copyable" in message
    assert "bind(module, params) or load_params(module, params)" in message
    assert torch.equal(module.inner[0].bias, bias)  # left untouched
    load_params(module, {"inner.0.bias": torch.ones(2)}, strict=False)  # the fix it gives works
    assert torch.equal(module.inner[0].bias, torch.ones(2))


def test_materialize_copies_a_deeply_nested_module():
    module: nn.Module = nn.Linear(3, 2)
    for _ in range(200):
        module = nn.Sequential(module)
    with pytest.raises(RecursionError):  # what materialize has to get around
        copy.deepcopy(module)
    (name,) = [n for n, _ in module.named_parameters() if n.endswith("weight")]
    params = {name: torch.randn(2, 3)}
    limit = sys.getrecursionlimit()
    copied = materialize(module, params)
    assert sys.getrecursionlimit() == limit  # restored
    x = torch.randn(4, 3)
    torch.testing.assert_close(copied(x), functional_call(module, params, x))
    assert not torch.equal(module(x), copied(x))  # module itself left as it was
