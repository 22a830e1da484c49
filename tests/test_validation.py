"""Validation at the boundary (issue 13): arguments, downstream dtypes and devices, state-dict
identity, atomic writes (load_state_dict, load_params) and interleaved binds.

Every refusal is checked for its type and message, and for leaving everything as it was: the
global RNG, the hypernetwork's tensors, the module's tensors (compared bitwise).
"""

from __future__ import annotations

import functools
import io
import threading
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from torchhyper import EmbeddingHyperNetwork, HyperNetwork, bind, load_params
from torchhyper._checks import activation


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Every tensor of ``module``'s state, cloned."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(before: dict[str, Tensor], module: nn.Module) -> bool:
    """Whether ``module``'s state is bitwise what ``before`` holds."""
    after = module.state_dict()
    return list(after) == list(before) and all(
        v.dtype == after[k].dtype and torch.equal(v, after[k]) for k, v in before.items()
    )


def build(kind: str, downstream: nn.Module, **options) -> nn.Module:
    """A hypernetwork conditioned on sets of 3 features, or on 4 ids."""
    if kind == "set":
        return HyperNetwork(3, options.pop("hidden_sizes", [8]), downstream, **options)
    return EmbeddingHyperNetwork(4, 8, downstream, **options)


# activation ---------------------------------------------------------------------------------

BAD_ACTIVATIONS = [
    (nn.ReLU(), r"activation must be an nn.Module class such as nn.ReLU, not an instance: "
                r"pass activation=ReLU, not activation=ReLU\(\)"),
    ("relu", r"got the string 'relu': pass the class, e.g. activation=nn.ReLU"),
    ("gelu", r"got the string 'gelu': pass the class, e.g. activation=nn.GELU"),
    (torch.relu, r"such as nn.ReLU \(or a factory that builds one with no arguments\), got relu"),
    (int, r"got the class int, which is not an nn.Module"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "message"), BAD_ACTIVATIONS)
def test_activation_checker_names_the_argument_and_the_fix(value, message):
    with pytest.raises(TypeError, match=message):
        activation("activation", value)
    assert activation("activation", nn.Tanh) is nn.Tanh
    leaky = functools.partial(nn.LeakyReLU, 0.2)  # a factory of a module: accepted
    assert activation("activation", leaky) is leaky


@pytest.mark.parametrize(
    "kind",
    [
        "ids",
        "set",
    ],
)
@pytest.mark.parametrize(("value", "message"), BAD_ACTIVATIONS[:2])
def test_bad_activation_is_refused_before_anything_is_built(kind, value, message):
    downstream = nn.Linear(2, 2)
    rng = torch.get_rng_state()
    with pytest.raises(TypeError, match=message):
        build(kind, downstream, hidden_sizes=[8], activation=value)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn: nothing was built


# Downstream dtypes and devices --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ids", "set"])
def test_a_refused_downstream_draws_no_random_numbers(kind):
    downstream = Complex()
    rng = torch.get_rng_state()
    with pytest.raises(TypeError, match="must be real floating point"):
        build(kind, downstream)
    assert torch.equal(torch.get_rng_state(), rng)  # refused before anything was built


class Complex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.real = nn.Parameter(torch.randn(3))
        self.phase = nn.Parameter(torch.randn(3, dtype=torch.complex64))


@pytest.mark.parametrize("kind", ["set", "ids"])
def test_complex_and_integer_parameters_are_refused(kind):
    downstream = Complex()
    with pytest.raises(
        TypeError,
        match=r"downstream parameters to generate must be real floating point, got phase "
        r"\(torch.complex64\): a complex tensor would be generated as real, losing its "
        r"imaginary part.*torch.view_as_real.*exclude=\['phase'\]",
    ):
        build(kind, downstream)
    hypernetwork = build(kind, Complex(), exclude="phase")  # left to the module: fine
    assert hypernetwork.names == ["real"]

    counts = nn.Linear(2, 2)
    counts.steps = nn.Parameter(torch.arange(3), requires_grad=False)
    with pytest.raises(TypeError, match=r"got steps \(torch.int64\): leave them to the module"):
        build(kind, counts)


@pytest.mark.parametrize("kind", ["set", "ids"])
def test_meta_downstream_and_script_module_are_refused(kind):
    with pytest.raises(
        ValueError,
        match=r"downstream parameters \['weight', 'bias'\] are on the meta device \(they hold no "
        r"values\).*downstream.to_empty\(device='cpu'\)",
    ):
        build(kind, nn.Linear(2, 2, device="meta"))
    scripted = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="stateless API can't be used with Jitted modules"):
        functional_call(scripted, dict(scripted.named_parameters()), (torch.ones(1, 2),))
    with pytest.raises(
        TypeError,
        match=r"downstream is a TorchScript module \(RecursiveScriptModule\): "
        r"torch.func.functional_call cannot replace its parameters",
    ):
        build(kind, scripted)


@pytest.mark.parametrize("base", ["learned", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["set", "ids"])
def test_each_tensor_is_generated_in_the_downstreams_dtype(kind, dtype, base):
    downstream = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    hypernetwork = build(kind, downstream, base=base)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # what it computes in
    assert all(p.dtype == wide for p in hypernetwork.parameters())
    condition = torch.randn(6, 3, dtype=wide) if kind == "set" else 2
    params = hypernetwork(condition)
    assert {n: v.dtype for n, v in params.items()} == dict.fromkeys(hypernetwork.names, dtype)
    y = functional_call(downstream, params, (torch.randn(4, 3, dtype=dtype),))
    assert y.dtype == dtype
    y.float().square().sum().backward()  # the cast passes gradients to the hypernetwork
    assert all(p.grad is not None and p.grad.dtype == wide for p in hypernetwork.head.parameters())
    if base == "learned":
        # The base holds the downstream's values exactly (a float64 one is not rounded
        # through float32) and the update starts at zero: it generates them bitwise.
        hypernetwork.eval()
        with torch.no_grad():
            start = hypernetwork(condition)
        for n, p in downstream.named_parameters():
            assert torch.equal(start[n], p), n


def test_float64_hypernetwork_reads_float64_inputs():
    hypernetwork = HyperNetwork(3, [8], nn.Linear(2, 2).double())
    with pytest.raises(TypeError, match=r"x has dtype torch.float32 but the hypernetwork has "):
        hypernetwork(torch.randn(4, 3))


# A state dict knows what it generates -------------------------------------------------------


class Two(nn.Module):
    """Two tensors whose shapes can be swapped: (3, 4) and (4, 3), or the reverse."""

    def __init__(self, first=(3, 4), second=(4, 3), names=("a", "b")) -> None:
        super().__init__()
        self.register_parameter(names[0], nn.Parameter(torch.randn(*first)))
        self.register_parameter(names[1], nn.Parameter(torch.randn(*second)))


def trained(hypernetwork: nn.Module) -> nn.Module:
    """Moves every float tensor of the state, so that a load that wrote anything would show."""
    with torch.no_grad():
        for v in hypernetwork.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v))
    return hypernetwork


def test_state_dict_for_another_downstream_of_the_same_sizes_is_refused_and_nothing_written():
    # base="none" and a dense head: every tensor of the two state dicts has the same shape, so
    # torch alone would report "All keys matched" and generate (3, 4) weights as (4, 3).
    saved = HyperNetwork(3, [8], Two(), base="none", head="dense")
    target = trained(HyperNetwork(3, [8], Two((4, 3), (3, 4)), base="none", head="dense"))
    state = saved.state_dict()
    assert [v.shape for v in state.values()] == [v.shape for v in target.state_dict().values()]
    before = snapshot(target)
    with pytest.raises(
        RuntimeError,
        match=r"(?s)Error\(s\) in loading state_dict for HyperNetwork \(nothing was loaded\):.*"
        r"saved by a hypernetwork of another downstream:\n"
        r"    a: saved for \(3, 4\), this hypernetwork generates \(4, 3\)\n"
        r"    b: saved for \(4, 3\), this hypernetwork generates \(3, 4\)",
    ):
        target.load_state_dict(state)
    assert same(before, target)

    renamed = trained(HyperNetwork(3, [8], Two(names=("c", "b")), base="none", head="dense"))
    before = snapshot(renamed)
    with pytest.raises(
        RuntimeError,
        match=r"generated only by the saved hypernetwork: \['a'\]\n"
        r"    generated only by this hypernetwork: \['c'\]",
    ):
        renamed.load_state_dict(state)
    assert same(before, renamed)


def test_a_failed_load_writes_nothing_even_when_only_the_last_key_is_wrong():
    source = HyperNetwork(3, [8, 8], Two(), head="dense")
    target = trained(HyperNetwork(3, [8, 8], Two(), head="dense"))
    state = source.state_dict()
    last = list(state)[-1]
    state[last] = torch.zeros(5)  # torch alone writes every key before this one, then raises
    state["gain"] = "not a tensor"
    del state["spread"]
    state["extra.weight"] = torch.zeros(1)
    before = snapshot(target)
    with pytest.raises(RuntimeError) as error:
        target.load_state_dict(state)
    message = str(error.value)
    assert "missing keys: ['spread']" in message and "unexpected keys: ['extra.weight']" in message
    assert f"size mismatch for {last}: saved (5,), this hypernetwork has (4, 3)" in message
    assert "gain: expected a tensor, got str" in message
    assert same(before, target)


@pytest.mark.parametrize("kind", ["set", "ids"])
def test_state_dict_round_trip_records_names_and_shapes(kind):
    source = trained(build(kind, Two()))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(isinstance(v, Tensor) for v in state.values())  # the record is a tensor too
    record = bytes(state["_extra_state"].tolist()).decode()
    assert record == '{"generates": {"a": [3, 4], "b": [4, 3]}}'
    target = build(kind, Two())
    target.load_state_dict(state)
    assert same(snapshot(source), target)


def test_old_state_dict_without_the_record_loads_with_a_warning_and_strict_false_skips_it():
    source = trained(HyperNetwork(3, [8], Two()))
    old = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    target = HyperNetwork(3, [8], Two())
    with pytest.warns(UserWarning, match="has no record of what the hypernetwork that saved it"):
        target.load_state_dict(old)
    assert same(snapshot(source), target)

    # strict=False: the parts of a hypernetwork built for another downstream, e.g. its encoder.
    other = HyperNetwork(3, [8], Two((4, 3), (3, 4)))
    encoder = {k: v for k, v in source.state_dict().items() if k.startswith(("encoder.", "_"))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(encoder, strict=False)
    assert torch.equal(other.encoder[0].weight, source.encoder[0].weight)
    with pytest.raises(RuntimeError, match=r"size mismatch for base.0: saved \(3, 4\)"):
        other.load_state_dict(source.state_dict(), strict=False)  # shapes are still checked


# load_params is atomic ----------------------------------------------------------------------


def five() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))  # 6 tensors


@pytest.mark.parametrize(
    ("fourth", "error", "message"),
    [
        (torch.zeros(3, device="meta"), ValueError,
         r"cannot be copied into Sequential: 1.bias: the value is on the meta device"),
        (torch.zeros(3, dtype=torch.float64), TypeError,
         r"wrong dtypes: 1.bias: expected torch.float32, got torch.float64"),
        (torch.zeros(4), ValueError, r"wrong shapes: 1.bias: expected \(3,\), got \(4,\)"),
        (torch.zeros(3).to_sparse(), ValueError,
         r"1.bias: the value has layout torch.sparse_coo, expected torch.strided"),
    ],
)  # fmt: skip
def test_load_params_checks_everything_before_the_first_write(fourth, error, message):
    module = five()
    before = snapshot(module)
    params = {n: torch.randn_like(p) for n, p in module.named_parameters()}
    params["1.bias"] = fourth  # the 4th tensor: the first three would be written by now
    with pytest.raises(error, match=message):
        load_params(module, params)
    assert same(before, module)


def test_load_params_refuses_a_module_on_meta():
    module = nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"weight: the module's parameter is on the meta device"):
        load_params(module, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)})


# bind: interleaving detected, the module never corrupted --------------------------------------


def test_binds_exiting_out_of_order_raise_and_the_module_gets_its_own_tensors_back():
    module = nn.Linear(2, 2)
    weight = module.weight
    first, second = (
        bind(module, {"weight": torch.ones(2, 2)}),
        bind(module, {"weight": torch.zeros(2, 2)}),
    )
    first.__enter__()
    second.__enter__()
    with pytest.raises(
        RuntimeError,
        match=r"bind\(Linear\) was not the only one to change the module while it was active "
        r"\(bind is not thread-safe\): weight: another bind entered after this one and is still "
        r"active",
    ):
        first.__exit__(None, None, None)
    assert torch.equal(module.weight, torch.zeros(2, 2))  # still the second bind's
    second.__exit__(None, None, None)
    assert module.weight is weight  # its own Parameter, not the first bind's tensor

    with bind(module, {"weight": torch.ones(2, 2)}), bind(module, {"weight": torch.zeros(2, 2)}):
        assert torch.equal(module.weight, torch.zeros(2, 2))  # nesting is fine
    assert module.weight is weight


def test_binds_interleaved_by_threads_raise_and_leave_the_module_intact():
    module = nn.Linear(2, 2)
    weight = module.weight
    entered, left = threading.Event(), threading.Event()
    errors: dict[str, str] = {}

    def one() -> None:  # binds, then waits while the other thread binds and leaves
        try:
            with bind(module, {"weight": torch.ones(2, 2)}):
                entered.set()
                left.wait(10)
        except RuntimeError as error:
            errors["one"] = str(error)

    def two() -> None:
        entered.wait(10)
        try:
            with bind(module, {"weight": torch.zeros(2, 2)}):
                pass
        except RuntimeError as error:
            errors["two"] = str(error)
        left.set()

    threads = [threading.Thread(target=one), threading.Thread(target=two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert list(errors) == ["one"]  # its body ran with the other thread's tensor for a while
    assert "weight: another thread bound it while this bind was active" in errors["one"]
    assert module.weight is weight and isinstance(module.weight, nn.Parameter)


def test_a_slot_assigned_inside_bind_is_reported_and_left_as_assigned():
    module = nn.Linear(2, 2)
    replacement = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="weight: it was assigned inside the body"):
        with bind(module, {"weight": torch.ones(2, 2)}):
            module.weight = replacement
    assert module.weight is replacement


def test_a_downstream_that_cannot_be_copied_warns_why_its_statistics_are_its_values():
    import threading

    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.lock = threading.Lock()  # not deep-copyable

        def forward(self, x):
            return self.linear(x)

    with pytest.warns(UserWarning, match=r"Locked cannot be copied \(TypeError: .*lock"):
        hyper = HyperNetwork(4, [8], Locked(), base="none")
    assert hyper(torch.randn(5, 4))["linear.weight"].shape == (2, 3)
