"""EmbeddingHyperNetwork: integer ids to parameters; the continual-learning regularizer."""

from __future__ import annotations

import pytest
import torch
from downstreams import CASES, IDS, Case, perturb_update_
from torch import nn
from torch.func import functional_call

from torchhyper import EmbeddingHyperNetwork, HyperNetwork, output_regularizer, per_sample_call


@pytest.mark.parametrize("base", ["none", "learned"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_downstream(case: Case, base: str):
    module = case.build().eval()
    hyper = EmbeddingHyperNetwork(4, 6, module, hidden_sizes=[12], base=base)
    params = hyper(2)
    assert [(n, p.shape) for n, p in params.items()] == [
        (n, p.shape) for n, p in module.named_parameters()
    ]
    case.output(functional_call(module, params, case.inputs())).square().sum().backward()
    missing = [n for n, p in hyper.named_parameters() if p.grad is None]
    assert not missing, missing
    rows = hyper.embedding.weight.grad.abs().sum(1)
    assert rows[[0, 1, 3]].sum() == 0  # only the used id's embedding learns


def test_only_the_used_embedding_learns():
    module = nn.Linear(3, 2)
    hyper = perturb_update_(EmbeddingHyperNetwork(4, 6, module, head="dense"))
    per_sample_call(
        module, hyper(torch.tensor([1, 1, 3])), torch.randn(3, 3)
    ).square().sum().backward()
    used = hyper.embedding.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [False, True, False, True]


def test_batched_ids_equal_single_ids():
    module = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    hyper = EmbeddingHyperNetwork(5, 4, module)
    ids = torch.tensor([[0, 4], [2, 2]])
    batched = hyper(ids)
    assert batched["0.weight"].shape == (2, 2, 8, 3)
    for idx in [(0, 0), (0, 1), (1, 0)]:
        for n, v in hyper(int(ids[idx])).items():
            torch.testing.assert_close(batched[n][idx], v)
    # One weight set per example, applied in one call: example i uses task ids[i].
    flat = torch.tensor([0, 3, 3, 1])
    x = torch.randn(4, 3)
    y = per_sample_call(module, hyper(flat), x)
    for i in range(4):
        torch.testing.assert_close(y[i], functional_call(module, hyper(int(flat[i])), x[i]))


def test_shares_the_hypernetwork_init_and_heads():
    module = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 64))
    for head in ("dense", "chunked", "lowrank"):
        torch.manual_seed(0)
        hyper = EmbeddingHyperNetwork(3, 16, module, head=head, base="none")
        reference = HyperNetwork(2, [16], module, head=head, base="none")
        torch.testing.assert_close(hyper.spread, reference.spread)
        torch.testing.assert_close(hyper.offset, reference.offset)
        assert type(hyper.head) is type(reference.head)
        std = hyper(torch.arange(3))["1.weight"].std().item()
        assert 0.8 < std / module[1].weight.std().item() < 1.25
    for base in ("learned", "frozen"):
        start = EmbeddingHyperNetwork(3, 8, module, base=base)(1)
        for n, p in module.named_parameters():
            torch.testing.assert_close(start[n], p.detach(), rtol=0, atol=0)


def test_state_dict_keys():
    hyper = EmbeddingHyperNetwork(3, 4, nn.Linear(2, 2), hidden_sizes=[8], head="dense")
    assert hyper.base is not None and hyper.base[0].requires_grad  # learned, as HyperNetwork's
    assert list(hyper.state_dict()) == [
        "gain",
        "spread",
        "center",
        "center_calls",
        "_extra_state",
        "embedding.weight",
        "encoder.0.weight",
        "encoder.0.bias",
        "head.weight",
        "head.bias",
        "base.0",
        "base.1",
    ]
    hyper = EmbeddingHyperNetwork(
        3, 4, nn.Linear(2, 2), hidden_sizes=[8], head="dense", base="none"
    )
    assert list(hyper.state_dict()) == [
        "gain",
        "spread",
        "offset",
        "_extra_state",
        "embedding.weight",
        "encoder.0.weight",
        "encoder.0.bias",
        "head.weight",
        "head.bias",
    ]


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (5, ValueError, r"ids must be in \[0, 4\] \(num_embeddings=5\), got values from 5 to 5"),
        (torch.tensor([-1, 2]), ValueError, "got values from -1 to 2"),
        (
            torch.tensor([0.5]),
            TypeError,
            "ids must be an int or an integer tensor, got dtype torch.float32",
        ),
        ("a", TypeError, "got str"),
        (
            torch.tensor([1], device="meta"),
            ValueError,
            "ids are on device meta but the hypernetwork is on cpu",
        ),
    ],
)
def test_id_validation(ids, error, message):
    hyper = EmbeddingHyperNetwork(5, 4, nn.Linear(2, 2))
    with pytest.raises(error, match=message):
        hyper(ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_embeddings": 0}, "num_embeddings must be a positive int, got 0"),
        ({"embedding_dim": 2.0}, "embedding_dim must be a positive int, got 2.0"),
        ({"hidden_sizes": [4, 0]}, r"hidden_sizes must be a list of positive ints, got \[4, 0\]"),
    ],
)
def test_constructor_validation(kwargs, message):
    args = {"num_embeddings": 3, "embedding_dim": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        EmbeddingHyperNetwork(
            args.pop("num_embeddings"), args.pop("embedding_dim"), nn.Linear(2, 2), **args
        )


def test_output_regularizer():
    hyper = EmbeddingHyperNetwork(3, 4, nn.Linear(2, 2))
    old = torch.arange(2)
    targets = {k: v.detach() for k, v in hyper(old).items()}
    assert output_regularizer(hyper(old), targets).item() == 0
    moved = {k: v + 1 for k, v in targets.items()}
    # (4 + 2 values) * 1^2 per task, averaged over 2 tasks.
    assert output_regularizer(moved, targets).item() == pytest.approx(6.0)
    loss = output_regularizer(hyper(old), {k: v + 0.1 for k, v in targets.items()})
    loss.backward()
    assert hyper.gain.grad is not None and targets["weight"].grad is None
    with pytest.raises(ValueError, match=r"missing from targets \['bias'\]"):
        output_regularizer(hyper(old), {"weight": targets["weight"]})
    with pytest.raises(ValueError, match=r"weight: \(2, 2, 2\) vs \(1, 2, 2\)"):
        output_regularizer(hyper(old), {k: v[:1] for k, v in targets.items()})
