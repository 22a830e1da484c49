"""The HyperNetwork over the table of downstream modules, for every head and base."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from downstreams import CASES, IDS, Case, perturb_update_
from torch import nn
from torch.func import functional_call

from torchhyper import HyperNetwork
from torchhyper.heads import HEADS, head_names

CONTEXT_DIM = 5
# Heads that generate tensors from scratch (base="none") as well as updates to a base.
GENERATING = [h for h, factory in HEADS.items() if not factory.needs_base]
# (head, base): every named head on a learned base, the generating ones with no base, and a
# frozen base once.
VARIANTS = (
    [(h, "learned") for h in HEADS] + [(h, "none") for h in GENERATING] + [("film", "frozen")]
)


def context(batch: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, CONTEXT_DIM, dtype=dtype)


def run(case: Case, module: nn.Module, params: dict, inputs: tuple) -> torch.Tensor:
    return case.output(functional_call(module, params, inputs))


@pytest.mark.parametrize(("head", "base"), VARIANTS, ids=[f"{h}-{b}" for h, b in VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_keys_shapes_gradients_untouched(case: Case, head: str, base: str):
    module = case.build().eval()
    before = copy.deepcopy(module.state_dict())
    hyper = HyperNetwork(CONTEXT_DIM, [16, 12], module, head=head, base=base)
    if base != "none":
        perturb_update_(hyper)  # as after some training: the update depends on the context

    params = hyper(context())
    expected = [(n, p.shape) for n, p in module.named_parameters()]
    assert [(n, p.shape) for n, p in params.items()] == expected

    inputs = case.inputs()
    y = run(case, module, params, inputs)
    assert y.shape == case.output(module(*inputs)).shape
    y.square().sum().backward()
    trained = {n: p for n, p in hyper.named_parameters() if p.requires_grad}
    if head == "no_update":  # no update: the context is not read, only the base learns
        trained = {n: p for n, p in trained.items() if n.startswith("base.")}
    missing = [n for n, p in trained.items() if p.grad is None or not p.grad.isfinite().all()]
    assert not missing, f"no finite gradient reached {missing}"
    assert any(p.grad.abs().sum() > 0 for p in trained.values())
    if base == "frozen":
        assert all(p.grad is None for p in hyper.base)

    # Nothing of the downstream is registered in the hypernetwork, and the module is untouched.
    own = {id(p) for p in module.parameters()}
    assert not any(id(p) in own for p in hyper.parameters())
    assert not any(k.startswith(tuple(n for n, _ in expected)) for k in hyper.state_dict())
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_starts_exactly_at_the_downstream(case: Case, head: str):
    """With a base (the default), every head generates exactly the module's current values at
    construction, in train and eval mode: outputs match."""
    module = case.build().eval()
    hyper = HyperNetwork(CONTEXT_DIM, [16], module, head=head)
    params = hyper(context())
    for name, p in module.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=0)
    params = hyper.eval()(context())
    for name, p in module.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=0)
    inputs = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(run(case, module, params, inputs), case.output(module(*inputs)))


def _reference_stats(case: Case, draws: int = 64) -> dict[str, tuple[float, float, bool]]:
    """Mean, std and constancy of each parameter over fresh constructions of the module."""
    values: dict[str, list[torch.Tensor]] = {}
    for seed in range(draws):
        torch.manual_seed(1000 + seed)
        for n, p in case.build().named_parameters():
            values.setdefault(n, []).append(p.detach().flatten())
    stats = {}
    for n, v in values.items():
        v = torch.cat(v).double()
        constant = bool((v - v[0]).abs().max() <= 1e-7 * (1 + v[0].abs()))
        stats[n] = (v.mean().item(), v.std().item() if v.numel() > 1 else 0.0, constant)
    return stats


@pytest.mark.parametrize("head", GENERATING)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name != "unet"], ids=[i for i in IDS if i != "unet"]
)
def test_init_std_matches_pytorch(case: Case, head: str):
    """With base="none", generated tensors have the statistics of PyTorch's default init."""
    reference = _reference_stats(case)
    generated: dict[str, list[torch.Tensor]] = {}
    module = case.build()
    for seed in range(16):
        torch.manual_seed(seed)
        hyper = HyperNetwork(CONTEXT_DIM, [16, 12], module, head=head, base="none")
        with torch.no_grad():
            for n, v in hyper(context()).items():
                generated.setdefault(n, []).append(v.flatten())
    failures = []
    for n, (mean, std, constant) in reference.items():
        got = torch.cat(generated[n]).double()
        if constant:
            if (got - mean).abs().max() > 1e-6:
                failures.append(f"{n}: constant {mean}, got values spread {got.std():.3g}")
        else:
            ratio = got.std().item() / std
            if not 0.8 <= ratio <= 1.2:
                failures.append(
                    f"{n}: std {got.std():.4g} vs PyTorch's {std:.4g} (ratio {ratio:.3f})"
                )
    assert not failures, failures


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.name in ("linear", "batchnorm", "lstm", "unet")],
    ids=lambda c: c.name,
)
def test_dtype_and_state_dict_round_trip(case: Case):
    module = case.build().eval().double()
    hyper = perturb_update_(HyperNetwork(CONTEXT_DIM, [16], module)).double().eval()
    c = context(dtype=torch.float64)
    params = hyper(c)
    assert all(v.dtype == torch.float64 for v in params.values())
    inputs = tuple(t.double() if t.is_floating_point() else t for t in case.inputs())
    assert run(case, module, params, inputs).dtype == torch.float64

    buffer = io.BytesIO()
    torch.save(hyper.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    other = HyperNetwork(CONTEXT_DIM, [16], module).double().eval()
    assert list(other.state_dict()) == list(hyper.state_dict())
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for name, value in other(c).items():
        torch.testing.assert_close(value, params[name], rtol=0, atol=0)


def test_state_dict_keys_are_named():
    hyper = HyperNetwork(3, [8, 8], nn.Linear(2, 2), head="chunked")
    assert list(hyper.state_dict()) == [
        "gain",
        "spread",
        "center",
        "center_calls",
        "_extra_state",
        "encoder.0.weight",
        "encoder.0.bias",
        "encoder.2.weight",
        "encoder.2.bias",
        "head.embeddings",
        "head.weight",
        "head.bias",
        "head.mix.weight",
        "head.mix.bias",
        "base.0",
        "base.1",
    ]
    hyper = HyperNetwork(3, [8, 8], nn.Linear(2, 2), head="chunked", base="none")
    assert list(hyper.state_dict()) == [
        "gain",
        "spread",
        "offset",
        "_extra_state",
        "encoder.0.weight",
        "encoder.0.bias",
        "encoder.2.weight",
        "encoder.2.bias",
        "head.embeddings",
        "head.weight",
        "head.bias",
        "head.mix.weight",
        "head.mix.bias",
    ]


def test_gradients_match_explicit_functional():
    """Gradients through functional_call equal those of a hand-written F re-implementation."""
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    hyper = perturb_update_(HyperNetwork(4, [16], module, head="dense")).eval()  # center fixed
    x = torch.randn(10, 4)

    def loss_via(call):
        hyper.zero_grad()
        p = hyper(x)
        call(p).square().mean().backward()
        return {n: q.grad.clone() for n, q in hyper.named_parameters()}

    via_call = loss_via(lambda p: functional_call(module, p, x))
    via_f = loss_via(
        lambda p: nn.functional.linear(
            torch.tanh(nn.functional.linear(x, p["0.weight"], p["0.bias"])),
            p["2.weight"],
            p["2.bias"],
        )
    )
    for n in via_call:
        torch.testing.assert_close(via_call[n], via_f[n])


def test_tied_weights_one_key_retied():
    module = CASES[IDS.index("tied")].build()
    params = HyperNetwork(CONTEXT_DIM, [8], module)(context())
    assert "out.weight" not in params and "embed.weight" in params
    ids = torch.randint(0, 20, (2, 3))
    # Tied through functional_call: the output layer uses the generated embedding.
    y = functional_call(module, params, ids)
    h = torch.tanh(
        nn.functional.linear(
            params["embed.weight"][ids], params["hidden.weight"], params["hidden.bias"]
        )
    )
    torch.testing.assert_close(y, h @ params["embed.weight"].T)


def test_include_exclude():
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    hyper = HyperNetwork(4, [8], module, include="2.*")
    assert list(hyper(torch.randn(3, 4))) == ["2.weight", "2.bias"]
    hyper = HyperNetwork(4, [8], module, exclude=["*.bias"])
    assert list(hyper(torch.randn(3, 4))) == ["0.weight", "2.weight"]
    with pytest.raises(
        ValueError, match=r"pattern\(s\) \['decoder\.\*'\] match no parameter.*0\.weight"
    ):
        HyperNetwork(4, [8], module, include="decoder.*")
    with pytest.raises(ValueError, match="leave no parameter"):
        HyperNetwork(4, [8], module, exclude="*")
    with pytest.raises(TypeError, match="include must be a glob"):
        HyperNetwork(4, [8], module, include=3)


def test_unselected_parameters_keep_module_values():
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    hyper = HyperNetwork(4, [8], module, include="0.*")
    x = torch.randn(3, 4)
    p = hyper(x)
    expected = module[2](torch.relu(nn.functional.linear(x, p["0.weight"], p["0.bias"])))
    torch.testing.assert_close(functional_call(module, p, x), expected)


def test_lazy_module_error():
    with pytest.raises(
        ValueError, match=r"uninitialized lazy parameters \['weight', 'bias'\]: run one forward"
    ):
        HyperNetwork(4, [8], nn.LazyLinear(3))


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (
            torch.randn(4, 7),
            ValueError,
            r"prod\(\*\) == input_dim == 6, got shape \(4, 7\) \(7 features",
        ),
        (torch.randn(0, 6), ValueError, r"non-empty batch .* got shape \(0, 6\)"),
        (
            torch.ones(4, 6, dtype=torch.long),
            TypeError,
            "floating-point tensor, got dtype torch.int64",
        ),
        (
            torch.randn(4, 6, dtype=torch.float64),
            TypeError,
            "dtype torch.float64 but the hypernetwork has dtype torch.float32",
        ),
        ([[1.0] * 6], TypeError, "x must be a torch.Tensor, got list"),
        (
            torch.randn(4, 6, device="meta"),
            ValueError,
            "on device meta but the hypernetwork is on cpu",
        ),
    ],
)
def test_input_validation(x, error, message):
    hyper = HyperNetwork(6, [8], nn.Linear(2, 2))
    with pytest.raises(error, match=message):
        hyper(x)


def test_input_shapes_flatten():
    hyper = HyperNetwork(12, [8], nn.Linear(2, 2))
    assert hyper(torch.randn(5, 3, 4))["weight"].shape == (2, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_dim": 0}, ValueError, "input_dim must be a positive int, got 0"),
        (
            {"hidden_sizes": []},
            ValueError,
            r"hidden_sizes must be a non-empty list of positive ints, got \[\]",
        ),
        ({"hidden_sizes": [8, -1]}, ValueError, r"got \[8, -1\]"),
        ({"downstream": "net"}, TypeError, "downstream must be a torch.nn.Module, got str"),
        (
            {"head": "huge"},
            ValueError,
            "head must be one of " + str(head_names()).replace("[", r"\["),
        ),
        ({"init": "default"}, TypeError, "unexpected keyword argument 'init'"),  # removed in 0.4
        (
            {"base": "pretrained"},
            ValueError,
            r"base must be one of \['learned', 'frozen', 'none'\], got 'pretrained'",
        ),
        (
            {"base": "none", "head": "film"},
            ValueError,
            "FiLMHead modulates a base, but base='none'",
        ),
        ({"downstream": nn.ReLU()}, ValueError, "ReLU has no parameters"),
    ],
)
def test_constructor_validation(kwargs, error, message):
    args = {"input_dim": 4, "hidden_sizes": [8], "downstream": nn.Linear(2, 2)} | kwargs
    with pytest.raises(error, match=message):
        HyperNetwork(
            args.pop("input_dim"), args.pop("hidden_sizes"), args.pop("downstream"), **args
        )


def test_batchnorm_buffers_stay_with_module():
    module = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).train()
    hyper = HyperNetwork(4, [8], module)
    assert not any("running" in k for k in hyper.state_dict())
    x = torch.randn(16, 4)
    functional_call(module, hyper(x), x)
    assert module[1].num_batches_tracked.item() == 1  # train mode updates the module's own buffers


def test_seed_zip_loop():
    """The seed README's loop copies values() into parameters() by position: the order holds."""
    module = CASES[IDS.index("transformer_layer")].build().eval()
    hyper = HyperNetwork(CONTEXT_DIM, [16], module)
    params = hyper(context())
    for p, w in zip(module.parameters(), params.values(), strict=True):
        p.data = w.data
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(x), functional_call(module, params, x))


@pytest.mark.parametrize("pool", ["mean", "sum", "max"])
def test_pooling_is_permutation_invariant(pool):
    hyper = HyperNetwork(3, [8], nn.Linear(2, 2), pool=pool)
    x = torch.randn(7, 3)
    a, b = hyper(x), hyper(x[torch.randperm(7)])
    for n in a:
        torch.testing.assert_close(a[n], b[n])
    assert hyper(torch.randn(2, 3))["weight"].shape == hyper(torch.randn(50, 3))["weight"].shape


def test_pool_callable_and_errors():
    hyper = HyperNetwork(3, [8], nn.Linear(2, 2), pool=lambda e: e[0])
    x = torch.randn(4, 3)
    torch.testing.assert_close(hyper(x)["weight"], hyper(x[:1])["weight"])
    with pytest.raises(
        ValueError,
        match=r"pool must be one of \['mean', 'sum', 'max', 'moments', 'attention'\], a Pool",
    ):
        HyperNetwork(3, [8], nn.Linear(2, 2), pool="median")


def test_no_update_trains_exactly_like_direct_training():
    """With a learned base and no update, training through the hypernetwork is direct training,
    step for step: same losses, same weights (Adam, lr 1e-3, BatchNorm in train mode)."""
    torch.manual_seed(0)
    direct = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    downstream = copy.deepcopy(direct).requires_grad_(False)
    hyper = HyperNetwork(6, [32, 64, 96], downstream, head="no_update")
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (direct, hyper)]
    for _ in range(30):
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        losses = []
        for optimizer, forward in zip(
            optimizers, [direct, lambda x: functional_call(downstream, hyper(x), x)]
        ):
            loss = (forward(x) - y).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-6 * max(1.0, abs(losses[0]))
    for (name, p), base in zip(direct.named_parameters(), hyper.base):
        torch.testing.assert_close(base, p.detach(), rtol=0, atol=1e-6, msg=name)


def test_update_reads_the_embedding_minus_its_running_mean():
    """In training mode each call first moves ``center`` toward the mean of its embeddings
    (every call so far is averaged, then a 1/100 running mean); eval mode leaves it."""
    hyper = perturb_update_(HyperNetwork(3, [8], nn.Linear(2, 2)))
    seen = []
    for _ in range(3):
        x = torch.randn(5, 3)
        seen.append(hyper.norm(hyper.embed(x)).detach())
        hyper(x)
    torch.testing.assert_close(hyper.center, torch.stack(seen).mean(0))
    assert hyper.center_calls.item() == 3
    # Past 100 calls, a running mean with rate 1/100.
    hyper.center_calls.fill_(1000)
    center, x = hyper.center.clone(), torch.randn(5, 3)
    z = hyper.norm(hyper.embed(x)).detach()
    hyper(x)
    torch.testing.assert_close(hyper.center, center + (z - center) / 100)
    hyper.eval()
    center = hyper.center.clone()
    a, b = hyper(torch.randn(5, 3)), hyper(torch.randn(5, 3))
    torch.testing.assert_close(hyper.center, center, rtol=0, atol=0)
    assert not torch.allclose(a["weight"], b["weight"])


def test_frozen_base_is_fixed():
    module = nn.Linear(3, 2)
    hyper = HyperNetwork(3, [8], module, head="film", base="frozen")
    assert all(not b.requires_grad for b in hyper.base)
    assert "base='frozen'" in repr(hyper)
    optimizer = torch.optim.Adam([p for p in hyper.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = torch.randn(4, 3)
        loss = functional_call(module, hyper(x), x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(hyper.base[0], module.weight.detach(), rtol=0, atol=0)
    assert hyper.head.linear.weight.abs().sum() > 0  # the update learned


def test_follows_device_moves():
    hyper = HyperNetwork(3, [8], nn.Linear(2, 2), head="chunked").to("meta")
    params = hyper(torch.randn(4, 3, device="meta"))
    assert all(v.device.type == "meta" for v in params.values())


def test_state_dict_of_0_3_loads():
    """torchhyper 0.3 named the base ``bases`` and the spreads ``scale``: its state dicts load."""
    torch.manual_seed(0)
    downstream = nn.Linear(3, 2)
    hyper = HyperNetwork(2, [8], downstream)
    with torch.no_grad():
        hyper.base[0].add_(1.0)
    rename = {"spread": "scale"}  # and base.i -> bases.i
    old = {rename.get(k, k.replace("base.", "bases.", 1)): v for k, v in hyper.state_dict().items()}
    assert "bases.0" in old and "scale" in old and "base.0" not in old
    fresh = HyperNetwork(2, [8], downstream)
    fresh.load_state_dict(old)
    x = torch.randn(4, 2)
    for name, value in hyper.eval()(x).items():
        torch.testing.assert_close(fresh.eval()(x)[name], value, rtol=0, atol=0)
