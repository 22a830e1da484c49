r"""torchhyper: modular hypernetworks for any ``torch.nn.Module``."""

from torchhyper.embedding import EmbeddingHyperNetwork, output_regularizer
from torchhyper.heads import (
    ChunkedHead,
    DenseHead,
    FiLMHead,
    Head,
    HybridHead,
    LoRAHead,
    LowRankHead,
    NoUpdate,
    summary,
)
from torchhyper.model import HyperNetwork
from torchhyper.params import bind, load_params, materialize
from torchhyper.per_sample import per_sample_call, vmap_compatible
from torchhyper.pooling import AttentionPool
from torchhyper.state import checkpoint_state, load_checkpoint_state

__version__ = "0.3.0"

__all__ = [
    "HyperNetwork",
    "EmbeddingHyperNetwork",
    "AttentionPool",
    "per_sample_call",
    "vmap_compatible",
    "output_regularizer",
    "Head",
    "HybridHead",
    "FiLMHead",
    "NoUpdate",
    "DenseHead",
    "ChunkedHead",
    "LowRankHead",
    "LoRAHead",
    "summary",
    "bind",
    "load_params",
    "materialize",
    "checkpoint_state",
    "load_checkpoint_state",
]
