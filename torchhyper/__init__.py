r"""torchhyper: modular hypernetworks for any ``torch.nn.Module``."""

from torchhyper.functional import bind, load_params, materialize
from torchhyper.heads import ChunkedHead, DenseHead, Head, LowRankHead
from torchhyper.model import HyperNetwork

__version__ = "0.2.0"

__all__ = [
    "HyperNetwork",
    "Head",
    "DenseHead",
    "ChunkedHead",
    "LowRankHead",
    "bind",
    "load_params",
    "materialize",
]
