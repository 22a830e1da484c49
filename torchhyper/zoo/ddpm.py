r"""A denoising diffusion model: diffusers' ``UNet2DModel`` with diffusers' ``DDPMScheduler``.

diffusers (the ``diffusion`` extra) is imported when a :class:`DDPM` is built, not before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DDPM"]


class DDPM(nn.Module):
    r"""A DDPM whose only parameters are those of its UNet, so a hypernetwork can generate them all.

    ``forward`` returns each image's denoising loss ``||eps - eps_theta(x_t, t)||^2`` (mean over
    pixels) at a random step ``t``, drawn with the global RNG, as in Ho et al. 2020. ``sample``
    runs the scheduler's reverse process; call it under :func:`torchhyper.bind` to sample with
    generated parameters.

    Args:
        sample_size: Image height and width (e.g. 8 for scikit-learn's digits, 28 for MNIST).
        channels: Image channels.
        block_out_channels: Channels of the UNet's resolution levels; one down/up block each.
        layers_per_block: ResNet layers per block.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        num_train_timesteps: Diffusion steps ``T`` of the scheduler.

    Example:
        >>> ddpm = DDPM(8, block_out_channels=(16, 32))
        >>> ddpm(torch.randn(4, 1, 8, 8)).shape  # loss per image
        torch.Size([4])

    References:
        | Denoising Diffusion Probabilistic Models (Ho et al., 2020)
        | https://arxiv.org/abs/2006.11239
    """

    def __init__(
        self,
        sample_size: int,
        *,
        channels: int = 1,
        block_out_channels: Sequence[int] = (16, 32),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        try:
            from diffusers import DDPMScheduler, UNet2DModel
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "DDPM needs diffusers: pip install 'torchhyper[diffusion]'"
            ) from error
        blocks = list(block_out_channels)
        if not blocks or any(c % norm_num_groups for c in blocks):
            raise ValueError(
                f"block_out_channels must be non-empty and divisible by norm_num_groups="
                f"{norm_num_groups}, got {block_out_channels!r}"
            )
        self.sample_size = sample_size
        self.channels = channels
        self.unet: nn.Module = UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(blocks),
            down_block_types=("DownBlock2D",) * len(blocks),
            up_block_types=("UpBlock2D",) * len(blocks),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)

    def forward(self, x: Tensor) -> Tensor:
        r"""The denoising loss of each image, ``(B, C, H, W) -> (B,)``, images scaled to [-1, 1]."""
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        alpha_bar = self.scheduler.alphas_cumprod.to(x.device, x.dtype)[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
        eps: Tensor = self.unet(noisy, t).sample
        return (eps - noise).square().flatten(1).mean(1)

    @torch.no_grad()
    def sample(
        self, n: int, *, steps: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draws ``n`` images ``(n, C, H, W)`` in [-1, 1] with ``steps`` reverse steps (default
        ``T``)."""
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(self.scheduler.config)  # set_timesteps mutates it
        scheduler.set_timesteps(steps or scheduler.config.num_train_timesteps)
        weight = next(self.unet.parameters())
        shape = (n, self.channels, self.sample_size, self.sample_size)
        x = torch.randn(shape, generator=generator, device=weight.device, dtype=weight.dtype)
        for t in scheduler.timesteps:
            eps = self.unet(x, t.to(x.device)).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return x.clamp(-1, 1)
