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

    With ``num_classes``, the UNet also embeds a class label per image (diffusers'
    ``num_class_embeds``: an ``nn.Embedding`` added to the timestep embedding), the standard
    class-conditional DDPM; ``forward`` and ``sample`` then take ``class_labels``.

    Args:
        sample_size: Image height and width (e.g. 8 for scikit-learn's digits, 28 for MNIST).
        channels: Image channels.
        block_out_channels: Channels of the UNet's resolution levels; one down/up block each.
        layers_per_block: ResNet layers per block.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        num_train_timesteps: Diffusion steps ``T`` of the scheduler.
        num_classes: Classes of the class labels; ``None``: an unconditional DDPM.

    Example:
        >>> ddpm = DDPM(8, block_out_channels=(16, 32))
        >>> ddpm(torch.randn(4, 1, 8, 8)).shape  # loss per image
        torch.Size([4])
        >>> conditional = DDPM(8, block_out_channels=(16, 32), num_classes=10)
        >>> conditional(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])).shape
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
        num_classes: int | None = None,
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
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.sample_size = sample_size
        self.channels = channels
        self.num_classes = num_classes
        self.unet: nn.Module = UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(blocks),
            down_block_types=("DownBlock2D",) * len(blocks),
            up_block_types=("UpBlock2D",) * len(blocks),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            num_class_embeds=num_classes,
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)

    def _check_labels(self, class_labels: Tensor | None, n: int) -> None:
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError(
                    "class_labels were given to an unconditional DDPM; build it with "
                    "num_classes=C to condition it on classes"
                )
            return
        if class_labels is None:
            raise ValueError(
                f"this DDPM is conditioned on {self.num_classes} classes: pass class_labels, "
                f"a ({n},) tensor of ints in [0, {self.num_classes})"
            )
        if class_labels.shape != (n,) or class_labels.is_floating_point():
            raise ValueError(
                f"class_labels must be a ({n},) tensor of ints in [0, {self.num_classes}), got "
                f"{tuple(class_labels.shape)} of {class_labels.dtype}"
            )

    def forward(self, x: Tensor, class_labels: Tensor | None = None) -> Tensor:
        r"""The denoising loss of each image, ``(B, C, H, W) -> (B,)``, images scaled to [-1, 1];
        ``class_labels`` ``(B,)``, one per image, with ``num_classes``."""
        self._check_labels(class_labels, x.shape[0])
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        alpha_bar = self.scheduler.alphas_cumprod.to(x.device, x.dtype)[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
        eps: Tensor = self.unet(noisy, t, class_labels=class_labels).sample
        return (eps - noise).square().flatten(1).mean(1)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        r"""Draws ``n`` images ``(n, C, H, W)`` in [-1, 1] with ``steps`` reverse steps (default
        ``T``); with ``num_classes``, of the classes ``class_labels`` ``(n,)``."""
        from diffusers import DDPMScheduler

        self._check_labels(class_labels, n)
        scheduler = DDPMScheduler.from_config(self.scheduler.config)  # set_timesteps mutates it
        scheduler.set_timesteps(steps or scheduler.config.num_train_timesteps)
        weight = next(self.unet.parameters())
        shape = (n, self.channels, self.sample_size, self.sample_size)
        x = torch.randn(shape, generator=generator, device=weight.device, dtype=weight.dtype)
        if class_labels is not None:
            class_labels = class_labels.to(x.device)
        for t in scheduler.timesteps:
            eps = self.unet(x, t.to(x.device), class_labels=class_labels).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return x.clamp(-1, 1)
