"""Image <-> latent maps. Images are float tensors in [-1, 1], [B, C, H, W]; latents are scaled so
that they have roughly unit variance (z = s · encode(x)); `scaling_factor` is explicit on every model.

Encoding is split in two so that the latent cache and encode-every-step give the same latents:
`moments(x)` -> the unscaled posterior (mean, std) (std None for a deterministic map), and
`sample_latent(mean, std, s, generator)` = s · (mean + std · ε) with ε from the run's generator.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffdistill.config import AutoencoderConfig
from diffdistill.errors import StageError, load_pretrained


class IdentityAutoencoder:
    """Pixel space, optionally pixel-unshuffled (16 px gray with factor 2 -> a 4x8x8 latent)."""

    stochastic = False  # moments() gives no std
    in_channels = None  # any

    def __init__(self, unshuffle: int = 1, scaling_factor: float = 1.0) -> None:
        self.factor, self.scaling_factor = unshuffle, scaling_factor

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        if image_size % self.factor:
            raise StageError(
                f"data.image_size {image_size} is not divisible by autoencoder.unshuffle {self.factor}"
            )
        r = self.factor
        return channels * r * r, image_size // r, image_size // r

    def to(self, device: torch.device | str) -> IdentityAutoencoder:
        return self

    def moments(self, x: Tensor) -> tuple[Tensor, None]:
        return (F.pixel_unshuffle(x, self.factor) if self.factor > 1 else x), None

    def decode(self, z: Tensor) -> Tensor:
        z = z / self.scaling_factor
        return F.pixel_shuffle(z, self.factor) if self.factor > 1 else z


class KLAutoencoder:
    """diffusers AutoencoderKL (the Stable-Diffusion VAE), from a hub id or a local folder."""

    stochastic = True

    def __init__(self, vae, scaling_factor: float | None = None) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor or vae.config.scaling_factor)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.in_channels: int = vae.config.in_channels

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
            raise StageError(
                f"the VAE expects {self.vae.config.in_channels}-channel images, data has {channels}; "
                f"set data.channels={self.vae.config.in_channels}"
            )
        if image_size % self.downsample:
            raise StageError(f"data.image_size {image_size} is not divisible by the VAE's {self.downsample}")
        return self.vae.config.latent_channels, image_size // self.downsample, image_size // self.downsample

    def to(self, device: torch.device | str) -> KLAutoencoder:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(self.vae.dtype) / self.scaling_factor).sample.float()


def sample_latent(mean: Tensor, std: Tensor | None, scaling_factor: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """s · (mean + std · ε), ε ~ N(0, I) drawn from `generator` on its device (default: the CPU, whose stream
    is the same on every machine), then moved to mean's."""
    if std is None:
        return mean * scaling_factor
    where = generator.device if generator is not None else "cpu"
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=where).to(mean.device)
    return (mean + std * noise) * scaling_factor


def build_autoencoder(cfg: AutoencoderConfig) -> IdentityAutoencoder | KLAutoencoder:
    builders = {
        "identity": lambda: IdentityAutoencoder(cfg.unshuffle, cfg.scaling_factor or 1.0),
        "kl": lambda: _build_kl(cfg),
    }
    return builders[cfg.kind]()


def build_decoder(cfg: AutoencoderConfig) -> IdentityAutoencoder | KLAutoencoder:
    """The autoencoder that decodes samples: `autoencoder.decoder` if set (with the encoder's scaling
    factor, since the latents were scaled by it), else the encoder itself."""
    if cfg.kind != "kl" or not cfg.decoder:
        return build_autoencoder(cfg)
    encoder_scale = cfg.scaling_factor or _load_kl(cfg.pretrained, cfg.subfolder, cfg.revision, None,
                                                   "autoencoder.pretrained").scaling_factor
    return _load_kl(cfg.decoder, cfg.decoder_subfolder, cfg.decoder_revision, encoder_scale, "autoencoder.decoder")


def _build_kl(cfg: AutoencoderConfig) -> KLAutoencoder:
    if not cfg.pretrained:
        raise StageError("autoencoder.kind=kl needs autoencoder.pretrained (a hub id or a local folder)")
    return _load_kl(cfg.pretrained, cfg.subfolder, cfg.revision, cfg.scaling_factor, "autoencoder.pretrained")


def _load_kl(source: str, subfolder: str | None, revision: str | None, scaling_factor: float | None,
             key: str) -> KLAutoencoder:
    return load_pretrained(lambda: KLAutoencoder.from_pretrained(source, subfolder, revision, scaling_factor),
                           source, key, revision)
