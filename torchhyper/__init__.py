r"""torchhyper: modular hypernetworks for any ``torch.nn.Module``.

The top level holds the names a user types most; every other public name is imported from the
module that defines it, such as :mod:`torchhyper.heads` or :mod:`torchhyper.distributed`.
"""

from torchhyper.embedding import EmbeddingHyperNetwork, output_regularizer
from torchhyper.heads import summary
from torchhyper.model import HyperNetwork
from torchhyper.params import bind, load_params, materialize
from torchhyper.per_sample import per_sample_call, vmap_compatible
from torchhyper.pooling import AttentionPool
from torchhyper.state import checkpoint_state, load_checkpoint_state

__version__ = "0.4.0"

__all__ = [
    "HyperNetwork",
    "EmbeddingHyperNetwork",
    "AttentionPool",
    "per_sample_call",
    "vmap_compatible",
    "output_regularizer",
    "summary",
    "bind",
    "load_params",
    "materialize",
    "checkpoint_state",
    "load_checkpoint_state",
]
