"""Image <-> latent maps. Images are float tensors in [-1, 1], [B, C, H, W]; latents are scaled so
that they have roughly unit variance (z = s · encode(x)); `scaling_factor` is explicit on every model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffdistill.checkpoint import load_pretrained
from diffdistill.config import AutoencoderConfig


class IdentityAutoencoder:
    """Pixel space, optionally pixel-unshuffled (16 px gray with factor 2 -> a 4x8x8 latent)."""

    def __init__(self, unshuffle: int = 1, scaling_factor: float = 1.0) -> None:
        self.factor, self.scaling_factor = unshuffle, scaling_factor

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        if image_size % self.factor:
            raise ValueError(
                f"data.image_size {image_size} is not divisible by autoencoder.unshuffle {self.factor}"
            )
        r = self.factor
        return channels * r * r, image_size // r, image_size // r

    def to(self, device: torch.device | str) -> IdentityAutoencoder:
        return self

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        z = F.pixel_unshuffle(x, self.factor) if self.factor > 1 else x
        return z * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        z = z / self.scaling_factor
        return F.pixel_shuffle(z, self.factor) if self.factor > 1 else z


class KLAutoencoder:
    """diffusers AutoencoderKL (the Stable-Diffusion VAE), from a hub id or a local folder."""

    def __init__(self, vae, scaling_factor: float | None = None) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor or vae.config.scaling_factor)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, source: str, subfolder: str | None, revision: str | None,
                        scaling_factor: float | None = None) -> KLAutoencoder:
        from diffusers import AutoencoderKL

        if Path(source).is_dir() and subfolder and not (Path(source) / subfolder).is_dir():
            subfolder = None  # a folder holding the VAE itself
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, revision=revision,
                                            low_cpu_mem_usage=False)
        return cls(vae, scaling_factor)

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        if channels != self.vae.config.in_channels:
            raise ValueError(
                f"the VAE expects {self.vae.config.in_channels}-channel images, data has {channels}; "
                f"set data.channels={self.vae.config.in_channels}"
            )
        if image_size % self.downsample:
            raise ValueError(f"data.image_size {image_size} is not divisible by the VAE's {self.downsample}")
        return self.vae.config.latent_channels, image_size // self.downsample, image_size // self.downsample

    def to(self, device: torch.device | str) -> KLAutoencoder:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(self.vae.dtype) / self.scaling_factor).sample.float()


def build_autoencoder(cfg: AutoencoderConfig) -> IdentityAutoencoder | KLAutoencoder:
    builders = {
        "identity": lambda: IdentityAutoencoder(cfg.unshuffle, cfg.scaling_factor or 1.0),
        "kl": lambda: _build_kl(cfg),
    }
    return builders[cfg.kind]()


def _build_kl(cfg: AutoencoderConfig) -> KLAutoencoder:
    if not cfg.pretrained:
        raise ValueError("autoencoder.kind=kl needs autoencoder.pretrained (a hub id or a local folder)")
    return load_pretrained(
        lambda: KLAutoencoder.from_pretrained(cfg.pretrained, cfg.subfolder, cfg.revision, cfg.scaling_factor),
        cfg.pretrained, "autoencoder.pretrained",
    )
