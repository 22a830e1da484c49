r"""The four experiments, one module each, behind one interface (:class:`Task`)."""

from __future__ import annotations

import torch

from experiments.config import Config
from experiments.tasks.base import Task

__all__ = ["Task", "build_task"]


def build_task(config: Config, device: torch.device) -> Task:
    r"""The task a config names, with its data and downstream built (imports are lazy)."""
    if config.experiment == "gmm":
        from experiments.tasks.gmm import GMMExperiment as cls
    elif config.experiment == "flow":
        from experiments.tasks.flow import FlowExperiment as cls
    elif config.experiment == "vae":
        from experiments.tasks.vae import VAEExperiment as cls
    else:
        from experiments.tasks.ddpm import DDPMExperiment as cls
    return cls(config, device)
