"""Heads: parameter counts, the auto policy, the unit-variance contract, the zero-update start on a
base, FiLMHead, LoRAHead's fused paths, the registry, validation messages and edge cases."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from downstreams import CASES, IDS, perturb_update_
from torch import nn
from torch.func import functional_call

from torchhyper import HyperNetwork
from torchhyper.heads import (
    AUTO_BUDGET,
    HEADS,
    ChunkedHead,
    DenseHead,
    FiLMHead,
    Head,
    HybridHead,
    LoRAHead,
    LowRankHead,
    NoUpdate,
    auto_head,
    head_names,
    register_head,
    summary,
)
from torchhyper.heads.build import _make_head

H = 12
SHAPES = [(6, 5), (6,), (), (3, 2, 2), (7, 1)]
FACTORIES = {
    "dense": DenseHead,
    "chunked": functools.partial(ChunkedHead, chunk_size=8),
    "lowrank": functools.partial(LowRankHead, rank=3),
    "lora": functools.partial(LoRAHead, rank=3),
}
# On a base only: a budget that gives dense maps to the two smallest tensors of SHAPES.
HYBRID = functools.partial(HybridHead, budget=(H + 1) * 7, rank=3)
ONES = [torch.ones(s) for s in SHAPES]  # bases with no zero rows


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    n = sum(torch.Size(s).numel() for s in SHAPES)  # 30 + 6 + 1 + 12 + 7 = 56
    assert count(DenseHead(H, SHAPES)) == (H + 1) * n
    chunked = ChunkedHead(H, SHAPES, chunk_size=8, chunk_dim=4, rank=5)
    assert chunked.chunks == 7
    assert count(chunked) == 7 * 4 + (H + 4 + 1) * 5 + 8 * 5 + 8
    r = 3
    rows_cols = (6 + 5) + (6 + 1) + (1 + 1) + (3 + 4) + (7 + 1)
    assert count(LoRAHead(H, SHAPES, rank=r)) == r * rows_cols + (H + 1) * r * len(SHAPES)


def test_auto_policy_decides_by_cost():
    """Dense while (H + 1) N fits AUTO_BUDGET parameters; above, HybridHead on a base (dense maps
    for the smallest tensors within that budget) or LoRAHead without one. The head says why."""
    assert AUTO_BUDGET == 2**20
    fits = AUTO_BUDGET // (H + 1)  # the most values a dense head may generate
    for base in (True, False):
        head = auto_head(H, [(fits,)], base=base)
        assert (
            isinstance(head, DenseHead) and f"within the budget of {AUTO_BUDGET:,}" in head.reason
        )
    head = auto_head(H, [(fits + 1,)])
    assert isinstance(head, HybridHead) and f"over the budget of {AUTO_BUDGET:,}" in head.reason
    assert isinstance(auto_head(H, [(fits + 1,)], base=False), LoRAHead)
    assert auto_head(H, [(1000, 1000)], base=False).rank == 16  # capped
    # Smallest first: the vector and the small matrix get dense maps, the large one does not.
    head = auto_head(H, [(2000, 600), (2000,), (10, 600)])
    assert head.dense_index == [1, 2] and head.scaled_index == [0]
    assert head.budget == AUTO_BUDGET
    # Without the bases every other tensor gets the additive term; with them, only those with a
    # row of zeros (and vectors).
    assert head.scaled.additive == [True]
    bases = [torch.ones(2000, 600), torch.ones(2000), torch.ones(10, 600)]
    assert auto_head(H, [b.shape for b in bases], bases=bases).scaled.additive == [False]
    bases[0][7] = 0
    assert auto_head(H, [b.shape for b in bases], bases=bases).scaled.additive == [True]
    assert "dense maps for the 2 smallest of 3 tensors" in head.reason
    gmm = CASES[IDS.index("gmm")].build()
    assert isinstance(HyperNetwork(1, [32, 64, 96], gmm).head, DenseHead)


@pytest.mark.parametrize("input_dim", [2, 794])
def test_auto_seed_constructor(input_dim):
    """The seed constructor's default on a 269 k MLP: a learned base and a HybridHead with dense
    maps for the biases and the output layer, a row scale and a rank-8 update for the rest."""
    mlp = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    hyper = HyperNetwork(input_dim, [32, 64, 96], mlp)
    head = hyper.head
    assert isinstance(head, HybridHead) and "base='learned'" in repr(hyper)
    assert head.dense_index == [1, 3, 4, 5] and head.scaled_index == [0, 2]
    dense = 97 * (256 + 256 + 2560 + 10)
    scaled = 97 * (256 + 256)  # row scales: no row of the bases is zero, no additive term
    assert count(head) == dense + scaled
    assert sum(b.numel() for b in hyper.base) == hyper.numel == 269_322
    assert "base='learned'" in repr(hyper)
    assert "head=HybridHead (auto: dense would need" in repr(hyper)
    text = summary(hyper).splitlines()
    assert text[0] == f"head: HybridHead(budget={AUTO_BUDGET}, rank=8)"
    assert text[1].startswith("why: auto: dense would need 26,124,234 parameters, over the")
    assert text[2] == "base: learned (269,322 values, trained)"
    assert text[4].startswith(
        f"trained parameters: {count(hyper):,} ({count(hyper) / hyper.numel:.3g}x generated)"
    )
    assert f"head {count(hyper.head):,}" in text[4] and "base 269,322" in text[4]
    frozen = HyperNetwork(input_dim, [32, 64, 96], mlp, base="frozen")
    assert summary(frozen).splitlines()[2] == "base: frozen (269,322 values, fixed)"
    assert "base " not in summary(frozen).splitlines()[4]


def test_registry_is_the_one_list_of_names():
    assert head_names() == ["auto", *HEADS]
    assert {"film", "dense", "lora", "chunked", "lowrank", "no_update"} <= set(HEADS)
    assert all(isinstance(cls, type) and issubclass(cls, Head) for cls in HEADS.values())


def test_renamed_names_are_refused_with_the_new_name():
    """A name or keyword of an earlier release raises, naming its replacement."""
    mlp = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="head='none' is now head='no_update'"):
        HyperNetwork(3, [8], mlp, head="none")
    assert "none" not in head_names()
    with pytest.raises(
        TypeError, match=r"ChunkedHead\(\) takes chunk_dim= in place of embedding_dim=: pass"
    ):
        ChunkedHead(H, SHAPES, embedding_dim=4)


@pytest.fixture
def registered():
    """Registers a toy head for the test, and removes it afterwards."""
    names = list(HEADS)

    @register_head("toy_shift")
    class ToyShift(Head):
        """One conditioned shift for every generated value."""

        def __init__(self, in_features, shapes):
            super().__init__(in_features, shapes)
            self.linear = nn.Linear(in_features, 1)

        def forward(self, z):
            return self.linear(z).expand(*z.shape[:-1], self.numel)

        def zero_update_(self):
            with torch.no_grad():
                self.linear.weight.zero_()
                self.linear.bias.zero_()
            return True

    try:
        yield ToyShift
    finally:
        del HEADS["toy_shift"]
        assert list(HEADS) == names


def test_a_registered_head_is_a_choice_everywhere(registered):
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    hyper = HyperNetwork(3, [8], mlp, head="toy_shift")
    assert type(hyper.head) is registered and "toy_shift" in head_names()
    x = torch.randn(5, 3)
    params = hyper(x)
    for name, p in mlp.named_parameters():  # the update starts at zero
        torch.testing.assert_close(params[name], p)
    with pytest.raises(ValueError, match="head must be one of .*'toy_shift'.*, got 'toy'"):
        HyperNetwork(3, [8], mlp, head="toy")


def test_register_head_errors(registered):
    with pytest.raises(ValueError, match="head name 'toy_shift' is taken by .*ToyShift"):
        register_head("toy_shift")(type("Other", (Head,), {}))
    with pytest.raises(ValueError, match="identifier other than 'auto', got 'auto'"):
        register_head("auto")
    with pytest.raises(ValueError, match="identifier other than 'auto', got 'a b'"):
        register_head("a b")
    with pytest.raises(TypeError, match="decorates Head subclasses, got <class 'torch.nn"):
        register_head("linear")(nn.Linear)


def test_head_override():
    mlp = nn.Sequential(nn.Linear(300, 300))
    assert isinstance(HyperNetwork(4, [8], mlp, head="dense").head, DenseHead)
    assert isinstance(HyperNetwork(4, [8], mlp, head=LoRAHead).head, LoRAHead)
    hyper = HyperNetwork(4, [8], mlp, head=functools.partial(LoRAHead, rank=2))
    assert hyper.head.rank == 2


@pytest.mark.parametrize("name", list(FACTORIES))
def test_unit_variance_contract(name):
    """Given a normalized embedding, raw values have zero mean and unit variance at init."""
    values = []
    for seed in range(40):
        torch.manual_seed(seed)
        head = FACTORIES[name](H, SHAPES)
        z = nn.functional.layer_norm(torch.randn(H), (H,))
        with torch.no_grad():
            values.append(head(z))
    v = torch.stack(values)
    assert v.shape == (40, head.numel)
    assert abs(v.mean().item()) < 0.1
    assert 0.9 < v.std().item() < 1.1


def test_lora_is_exactly_standardized_base_at_init():
    head = LoRAHead(H, SHAPES)
    z = torch.randn(H)
    values = head(z).split(head.numels)
    for shape, v in zip(head.shapes, values):
        if shape.numel() > 1:
            torch.testing.assert_close(v.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
            torch.testing.assert_close(v.square().mean(), torch.tensor(1.0))
    torch.testing.assert_close(head(z), head.noise, rtol=0, atol=0)  # B starts at zero
    with torch.no_grad():
        for right in head.right:
            right.normal_()
    assert not torch.allclose(head(z), head(torch.randn(H)))  # the update depends on z


def test_lora_fused_path_matches_reference():
    """One embedding takes a fused autograd Function; a batch takes plain autograd ops."""
    torch.manual_seed(0)
    head = LoRAHead(5, SHAPES + [(2, 0, 3)], rank=2).double()
    with torch.no_grad():
        for right in head.right:
            right.normal_()
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    batched = head(z[None].expand(3, 5))
    torch.testing.assert_close(head(z), batched[1])
    params = list(head.parameters())
    grads = torch.autograd.grad(head(z).square().sum(), [z, *params])
    reference = torch.autograd.grad(batched[1].square().sum(), [z, *params])
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r)
    assert torch.autograd.gradcheck(lambda z, *p: head(z), (z, *params))


def test_lora_state_dict_keeps_seed_not_noise():
    head = LoRAHead(H, SHAPES)
    state = head.state_dict()
    assert "seed" in state and "noise" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = LoRAHead(H, SHAPES).double()
    assert not torch.equal(other.noise.float(), head.noise)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.noise.dtype == torch.float64
    torch.testing.assert_close(other.noise.float(), head.noise, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("factory", "error", "message"),
    [
        (functools.partial(LoRAHead, rank=0), ValueError, "rank must be a positive int, got 0"),
        (
            functools.partial(LoRAHead, rank=True),
            ValueError,
            "rank must be a positive int, got True",
        ),
        (
            functools.partial(LowRankHead, rank=-1),
            ValueError,
            "rank must be a positive int, got -1",
        ),
        (
            functools.partial(ChunkedHead, chunk_size=0),
            ValueError,
            "chunk_size must be a positive int, got 0",
        ),
        (
            functools.partial(ChunkedHead, chunk_dim=2.5),
            ValueError,
            "chunk_dim must be a positive int, got 2.5",
        ),
    ],
)
def test_validation_messages(factory, error, message):
    with pytest.raises(error, match=message):
        factory(H, SHAPES)


def test_make_head_and_summary_errors():
    names = str(head_names()).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=f"head must be one of {names} or a callable, got 'lora2'"):
        _make_head("lora2", H, SHAPES, bases=ONES)
    with pytest.raises(TypeError, match="head factory must return an nn.Module, got int"):
        _make_head(lambda h, s: 3, H, SHAPES, bases=ONES)
    with pytest.raises(
        ValueError, match=r"must map an embedding \(12,\) to \(56,\) values .* got \(55,\)"
    ):
        _make_head(lambda h, s: nn.Linear(h, 55), H, SHAPES, bases=ONES)
    with pytest.raises(
        TypeError, match=r"calling it on a dummy input of shape \(12,\) raised RuntimeError"
    ):
        _make_head(lambda h, s: nn.Linear(h + 1, 56), H, SHAPES, bases=ONES)
    for name in ("film", "no_update", "hybrid"):
        with pytest.raises(ValueError, match="modulates a base, but base='none'"):
            _make_head(name, H, SHAPES, bases=None)
    with pytest.raises(TypeError, match="hypernetwork must be a HyperNetwork .* got Linear"):
        summary(nn.Linear(2, 2))


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize(
    "shapes",
    [[(5, 3)], [(17,)], [()], [(), ()], [(0, 3), (4,)], [(3, 3), (1025,)]],
    ids=["matrix", "odd-vector", "scalar", "two-scalars", "empty-tensor", "N%chunk!=0"],
)
def test_shapes_edge_cases(name, shapes):
    head = FACTORIES[name](H, shapes)
    n = sum(torch.Size(s).numel() for s in shapes)
    z = torch.randn(H, requires_grad=True)
    out = head(z)
    assert out.shape == (n,)
    assert head(torch.randn(2, 3, H)).shape == (2, 3, n)
    out.square().sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_chunked_chunk_size_larger_than_numel():
    head = ChunkedHead(H, [(3,)], chunk_size=1024)
    assert head.chunk_size == 3 and head.chunks == 1
    head = ChunkedHead(H, [(10,)], chunk_size=4)
    assert head.chunks == 3 and head(torch.randn(H)).shape == (10,)


BASE_FACTORIES = FACTORIES | {"film": FiLMHead, "no_update": NoUpdate, "hybrid": HYBRID}


@pytest.mark.parametrize("name", list(BASE_FACTORIES))
def test_zero_update_starts_at_the_base(name):
    """On a base, every built-in head's update is exactly zero at init, for any embedding,
    and still has gradients (it learns from the first step)."""
    torch.manual_seed(0)
    head = BASE_FACTORIES[name](H, SHAPES)
    assert head.zero_update_()
    bases = [torch.randn(torch.Size(s).numel()) for s in SHAPES]
    spread, gain = torch.rand(len(SHAPES)) + 0.5, torch.rand(len(SHAPES)) + 0.5
    z = torch.randn(3, H)
    out = head.assemble(z, bases, spread, gain)
    for value, base in zip(out, bases):
        assert value.shape == (3, base.numel())
        torch.testing.assert_close(value, base.expand_as(value), rtol=0, atol=0)
    if head.needs_base:  # the scalar offsets of base="none" are refused
        with pytest.raises(ValueError, match=f"{type(head).__name__} needs a base: build"):
            head.assemble(z, [torch.tensor(0.0)] * len(SHAPES), spread, gain)
    if name != "no_update":
        sum(v.square().sum() for v in out).backward()
        assert any(p.grad.abs().sum() > 0 for p in head.parameters())


def test_film_modulates_rows_and_shifts_vectors():
    head = FiLMHead(H, SHAPES)
    torch.manual_seed(1)
    with torch.no_grad():
        head.linear.weight.normal_()
    bases = [torch.randn(torch.Size(s).numel()) for s in SHAPES]
    spread, gain = torch.rand(len(SHAPES)) + 0.5, torch.rand(len(SHAPES)) + 0.5
    z = torch.randn(H)
    g = head.linear(z).split(head.widths)
    out = head.assemble(z, bases, spread, gain)
    # (6, 5): each row of the base scaled by 1 + gain * g.
    torch.testing.assert_close(
        out[0].view(6, 5), bases[0].view(6, 5) * (1 + gain[0] * g[0])[:, None]
    )
    # (6,): shifted value by value, in units of its spread.
    torch.testing.assert_close(out[1], bases[1] + spread[1] * gain[1] * g[1])
    batched = head.assemble(z.expand(2, H), bases, spread, gain)
    for a, b in zip(out, batched):
        torch.testing.assert_close(b[1], a)


def test_any_module_from_a_factory_is_wrapped_and_starts_at_the_base():
    """A factory may return a plain module (*, H) -> (*, N): it is wrapped once; as it cannot
    zero itself, its per-tensor gains start at 0, so the hypernetwork still starts at the base,
    and the gains learn."""
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    n = sum(p.numel() for p in module.parameters())
    hyper = HyperNetwork(5, [8], module, head=lambda h, shapes: nn.Linear(h, n))
    assert type(hyper.head).__name__ == "_ModuleHead" and isinstance(hyper.head.module, nn.Linear)
    assert torch.equal(hyper.gain, torch.zeros(4))
    x = torch.randn(6, 5)
    hyper(torch.randn(6, 5))  # a first training call sets the running mean
    params = hyper(x)
    for name, p in module.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=0)
    sum(v.square().sum() for v in params.values()).backward()
    assert hyper.gain.grad.abs().sum() > 0


# Every named head but the two that never move a zero base: FiLM (row scales) and no update.
ADDITIVE = [h for h in HEADS if not HEADS[h].scales_base and h != "no_update"]


@pytest.mark.parametrize("base", ["frozen", "learned"])
@pytest.mark.parametrize("name", [*ADDITIVE, "hybrid-scaled"])
def test_a_zero_base_moves_within_three_steps(name, base):
    """A tensor whose base is zero (PEFT's lora_B, a zero-initialized layer) gets a nonzero
    gradient within 3 Adam steps, and then a conditioned value, for every head that claims to
    generate any tensor (``hybrid-scaled``: HybridHead without dense maps)."""
    torch.manual_seed(0)
    downstream = nn.Linear(4, 3)
    nn.init.zeros_(downstream.weight)
    nn.init.zeros_(downstream.bias)
    head = functools.partial(HybridHead, budget=0) if name == "hybrid-scaled" else name
    hyper = HyperNetwork(2, [16], downstream, head=head, base=base)
    optimizer = torch.optim.Adam(hyper.parameters(), lr=1e-2)
    moved = []
    for _ in range(3):
        c = torch.randn(8, 2)
        x = torch.randn(8, 4)
        target = x[:, :3] * c.mean()  # the best weights depend on the set
        loss = (functional_call(downstream, hyper(c), x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        moved.append(
            any(p.grad is not None and p.grad.abs().sum() > 0 for p in hyper.head.parameters())
        )
        optimizer.step()
    assert any(moved), "no gradient reached the head in 3 steps"
    hyper.eval()
    a, b = hyper(torch.randn(8, 2)), hyper(torch.randn(8, 2) + 3)
    assert a["weight"].abs().sum() > 0 and not torch.equal(a["weight"], b["weight"])


@pytest.mark.parametrize("base", ["frozen", "learned"])
def test_film_warns_of_zero_rows(base):
    downstream = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    nn.init.zeros_(downstream[1].weight)
    with torch.no_grad():
        downstream[0].weight[1] = 0  # one zero row
    fate = "never move" if base == "frozen" else "get no conditioned update until"
    with pytest.warns(UserWarning, match=rf"\['0.weight', '1.weight'\] have zero rows and {fate}"):
        HyperNetwork(2, [8], downstream, head="film", base=base)


def test_hybrid_head_parts_agree_with_their_reference():
    """Dense maps give DenseHead's values; the other tensors are (1 + gain g) * base plus the
    low-rank term; batched embeddings give each embedding's values; a huge budget is DenseHead."""
    torch.manual_seed(0)
    head = HYBRID(H, SHAPES)
    assert head.dense_index == [1, 2] and head.scaled_index == [0, 3, 4]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    bases = [torch.randn(torch.Size(s).numel()) for s in SHAPES]
    spread, gain = torch.rand(len(SHAPES)) + 0.5, torch.rand(len(SHAPES)) + 0.5
    z = torch.randn(H)
    out = head.assemble(z, bases, spread, gain)
    dense = head.dense.assemble(z, [bases[1], bases[2]], spread[[1, 2]], gain[[1, 2]])
    torch.testing.assert_close(out[1], dense[0])
    torch.testing.assert_close(out[2], dense[1])
    scaled = head.scaled
    r = scaled.rank
    c = scaled.coefficients(z).view(3, r)
    lefts = scaled.left.split([m * r for m, _ in scaled.matrix_shapes])
    rights = scaled.right.split([n * r for _, n in scaled.matrix_shapes])
    f = scaled.scales(z).split([6, 3])  # the row scales of the two matrices (not the vector)
    for k, (i, (rows, cols)) in enumerate(zip(head.scaled_index, scaled.matrix_shapes)):
        lowrank = lefts[k].view(rows, r) @ torch.diag(c[k]) @ rights[k].view(cols, r).T
        lowrank = lowrank * spread[i] * gain[i] / r**0.5
        rowscale = 1 + gain[i] * f[k] if cols > 1 else torch.ones(rows)
        expected = bases[i].view(rows, cols) * rowscale[:, None] + lowrank
        torch.testing.assert_close(out[i], expected.flatten())
    batched = head.assemble(torch.stack([z, -z]), bases, spread, gain)
    flipped = head.assemble(-z, bases, spread, gain)
    for a, b, v in zip(out, flipped, batched):
        torch.testing.assert_close(v[0], a)
        torch.testing.assert_close(v[1], b)
    every = HybridHead(H, SHAPES, budget=10**9)
    assert every.scaled is None and every.dense_index == list(range(len(SHAPES)))
    assert count(every) == count(DenseHead(H, SHAPES))
    with pytest.raises(ValueError, match=r"budget must be >= 0 \(parameters; 0 for no dense"):
        HybridHead(H, SHAPES, budget=-1)
    with pytest.raises(TypeError, match="budget must be an int \\(parameters\\), got 1.5"):
        HybridHead(H, SHAPES, budget=1.5)
    with pytest.raises(ValueError, match=r"like it \(5\), got 5; shapes differ at 0: \(30,\)"):
        HybridHead(H, SHAPES, bases=[b.flatten() for b in ONES])
    with pytest.raises(ValueError, match="additive must hold one bool per generated tensor"):
        HybridHead(H, SHAPES, additive=[True])
    flags = HybridHead(H, SHAPES, budget=0, additive=[False, True, True, False, True])
    assert flags.scaled.additive == [False, True, True, False, True]  # vectors: always


@pytest.mark.parametrize("base", ["learned", "frozen"])
def test_hybrid_through_the_hypernetwork(base):
    """Both parts of HybridHead through HyperNetwork: the additive term only where a row is zero
    (and on vectors without a dense map), per_sample and per_set equal forward (eval mode), and
    gradients reach every head parameter."""
    torch.manual_seed(0)
    downstream = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Linear(5, 40))
    with torch.no_grad():
        downstream[2].weight[3] = 0  # a zero row: the row scale cannot move it
    head = functools.partial(HybridHead, budget=(H + 1) * 6, rank=2)
    hyper = HyperNetwork(3, [H], downstream, head=head, base=base)
    names = [n for n, _ in downstream.named_parameters()]
    scaled = [names[i] for i in hyper.head.scaled_index]
    assert [names[i] for i in hyper.head.dense_index] == ["2.bias"]  # the smallest: 5 values
    additive = [n for n, a in zip(scaled, hyper.head.scaled.additive) if a]
    assert additive == ["0.bias", "2.weight", "3.bias"]
    perturb_update_(hyper)
    x = torch.randn(4, 3)
    params = hyper(x)
    sum(v.square().sum() for v in params.values()).backward()
    missing = [n for n, p in hyper.head.named_parameters() if p.grad is None or p.grad.eq(0).all()]
    assert not missing, missing
    hyper.eval()
    one_each = hyper.per_sample(x)
    sets = hyper.per_set(x.view(2, 2, 3))
    for i in range(4):
        alone = hyper(x[i : i + 1])
        for n in names:
            torch.testing.assert_close(one_each[n][i], alone[n])
    for s in range(2):
        for n, v in hyper(x.view(2, 2, 3)[s]).items():
            torch.testing.assert_close(sets[n][s], v)


def test_scale_rows_gradients():
    """Row scaling's own backward (a row-wise dot product for the scales) against autograd's
    finite differences, for one scale per row and a batch of them."""
    from torchhyper.heads.head import _scale_rows

    base = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    for shape in [(4,), (3, 4)]:
        factor = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_scale_rows, (base, factor), check_forward_ad=True)
        torch.testing.assert_close(_scale_rows(base, factor), base * factor.unsqueeze(-1))
    # Under torch.func: per-example gradients through vmap, and forward mode.
    factors = torch.randn(3, 4, dtype=torch.float64)

    def loss(b, f):
        return _scale_rows(b, f).square().sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(None, 0))(base, factors)
    for f, g in zip(factors, grads):
        torch.testing.assert_close(g, 2 * (base * f.unsqueeze(-1) * base).sum(-1))
    _, tangent = torch.func.jvp(lambda f: _scale_rows(base, f), (factors[0],), (factors[1],))
    torch.testing.assert_close(tangent, base * factors[1].unsqueeze(-1))


def test_hypernetwork_under_torch_func():
    """The hybrid and FiLM heads' row scaling composes with torch.func: gradients of a
    functional call of the hypernetwork match autograd's."""
    torch.manual_seed(0)
    downstream = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 4))
    for head in ("film", functools.partial(HybridHead, budget=0)):
        hyper = perturb_update_(HyperNetwork(2, [8], downstream, head=head)).eval()
        x = torch.randn(5, 2)
        params = dict(hyper.named_parameters())

        def loss(p, x, hyper=hyper):
            out = functional_call(hyper, (p, dict(hyper.named_buffers())), (x,))
            return sum(v.square().sum() for v in out.values())

        grads = torch.func.grad(loss)(params, x)
        loss(params, x).backward()
        for n, p in params.items():
            torch.testing.assert_close(grads[n], p.grad, msg=n)
