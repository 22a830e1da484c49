"""One table of downstream modules that every hypernetwork test runs over.

Each case builds a fresh module (its constructor runs PyTorch's default init) and the inputs
its ``forward`` takes. ``output`` reduces what ``forward`` returns to one tensor.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations


def perturb_update_(hypernetwork: nn.Module, std: float = 0.3) -> nn.Module:
    """Moves every head parameter by N(0, std^2) noise, in place, as training would: the update
    on a base, zero at init, then depends on the embedding. Returns the hypernetwork."""
    with torch.no_grad():
        for p in hypernetwork.head.parameters():
            p.add_(torch.randn_like(p) * std)
    return hypernetwork


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    output: Callable[[object], Tensor] = lambda y: y


class Tied(nn.Module):
    """A language-model shape: the output layer reuses the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(ids))))


class Scalar(nn.Module):
    """A 0-dim parameter (a temperature) beside a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) / self.temperature


class Frozen(nn.Module):
    """A module with one frozen parameter: it is generated all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)
        self.a.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))


class GMM(nn.Module):
    """A custom module with raw parameters: log-density of a 1-D Gaussian mixture."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(3))
        self.means = nn.Parameter(torch.tensor([-2.0, 0.0, 2.0]))
        self.log_scales = nn.Parameter(torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        comp = torch.distributions.Normal(self.means, self.log_scales.exp())
        log_w = torch.log_softmax(self.logits, dim=0)
        return torch.logsumexp(comp.log_prob(x[..., None]) + log_w, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
    )


def _first(y: object) -> Tensor:
    return y[0]


CASES = [
    Case(
        "linear",
        lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
        lambda: (torch.randn(5, 6),),
    ),
    Case("conv1d", lambda: nn.Conv1d(3, 4, 3), lambda: (torch.randn(2, 3, 10),)),
    Case(
        "conv2d",
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)),
        lambda: (torch.randn(2, 3, 6, 6),),
    ),
    Case("conv3d", lambda: nn.Conv3d(2, 3, 2), lambda: (torch.randn(1, 2, 4, 4, 4),)),
    Case(
        "conv_transpose",
        lambda: nn.ConvTranspose2d(3, 4, 3, stride=2),
        lambda: (torch.randn(2, 3, 4, 4),),
    ),
    Case(
        "batchnorm",
        lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()),
        lambda: (torch.randn(4, 3, 6, 6),),
    ),
    Case(
        "layernorm",
        lambda: nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12)),
        lambda: (torch.randn(5, 6),),
    ),
    Case(
        "groupnorm",
        lambda: nn.Sequential(nn.Conv2d(2, 8, 3), nn.GroupNorm(4, 8)),
        lambda: (torch.randn(2, 2, 6, 6),),
    ),
    Case("rnn", lambda: nn.RNN(4, 8, batch_first=True), lambda: (torch.randn(3, 5, 4),), _first),
    Case(
        "gru",
        lambda: nn.GRU(4, 8, num_layers=2, batch_first=True),
        lambda: (torch.randn(3, 5, 4),),
        _first,
    ),
    Case("lstm", lambda: nn.LSTM(4, 8, batch_first=True), lambda: (torch.randn(3, 5, 4),), _first),
    Case("multihead_attention", SelfAttention, lambda: (torch.randn(2, 5, 8),)),
    Case(
        "transformer_layer",
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
        lambda: (torch.randn(2, 5, 8),),
    ),
    Case("embedding", lambda: nn.Embedding(30, 6), lambda: (torch.randint(0, 30, (4, 7)),)),
    Case(
        "embedding_bag",
        lambda: nn.EmbeddingBag(30, 6, mode="mean"),
        lambda: (torch.randint(0, 30, (4, 7)),),
    ),
    Case(
        "prelu", lambda: nn.Sequential(nn.Linear(4, 6), nn.PReLU(6)), lambda: (torch.randn(5, 4),)
    ),
    Case("tied", Tied, lambda: (torch.randint(0, 20, (3, 5)),)),
    Case(
        "weight_norm",
        lambda: parametrizations.weight_norm(nn.Linear(5, 7)),
        lambda: (torch.randn(4, 5),),
    ),
    Case(
        "spectral_norm",
        lambda: parametrizations.spectral_norm(nn.Linear(5, 7)).eval(),
        lambda: (torch.randn(4, 5),),
    ),
    Case("scalar", Scalar, lambda: (torch.randn(5, 4),)),
    Case("frozen", Frozen, lambda: (torch.randn(5, 4),)),
    Case("gmm", GMM, lambda: (torch.randn(16),)),
]

if importlib.util.find_spec("diffusers") is not None:
    CASES.append(
        Case(
            "unet",
            _unet,
            lambda: (torch.randn(2, 1, 8, 8), torch.tensor([3, 7])),
            lambda y: y.sample,
        )
    )

IDS = [c.name for c in CASES]
