"""Noise schedule and the forward-process formulas (pure tensor math), plus diffusers samplers built
from the same betas so training and sampling share one schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffdistill.config import DiffusionConfig


def linear_betas(steps: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)


def cosine_betas(steps: int, beta_start: float = 0.0, beta_end: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2"); betas capped at 0.999."""

    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int, float, float], Tensor]] = {"linear": linear_betas, "cosine": cosine_betas}


class NoiseSchedule:
    """ᾱ_t for t = 0..T-1 and the formulas that use it. Tensors are float64 on CPU; results take x's dtype."""

    def __init__(self, betas: Tensor) -> None:
        self.betas = betas.double()
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # [T]

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        return cls(SCHEDULES[cfg.schedule](cfg.train_steps, cfg.beta_start, cfg.beta_end))

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    def _coef(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """values[t] shaped [B, 1, 1, ...] to broadcast against `like`."""
        out = values.to(like.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """z_t = sqrt(ᾱ_t) z0 + sqrt(1 − ᾱ_t) ε."""
        a = self.alphas_cumprod
        return self._coef(a.sqrt(), t, z0) * z0 + self._coef((1 - a).sqrt(), t, z0) * noise

    def x0_from_eps(self, zt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂0 = sqrt(1/ᾱ_t) z_t − sqrt(1/ᾱ_t − 1) ε̂ (unclipped; differentiable through ε̂)."""
        a = self.alphas_cumprod
        return self._coef((1 / a).sqrt(), t, zt) * zt - self._coef((1 / a - 1).sqrt(), t, zt) * eps


def make_scheduler(name: str, betas: Tensor):
    """A diffusers sampler over the training betas (epsilon prediction, no clipping)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=betas.shape[0], trained_betas=betas.float().numpy(),
                  prediction_type="epsilon")
    builders = {
        # fixed_small = the posterior variance, as DiT's sampler uses for non-learned sigma
        "ddpm": lambda: DDPMScheduler(**common, variance_type="fixed_small", clip_sample=False),
        "ddim": lambda: DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False),
        "dpm": lambda: DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++"),
    }
    if name not in builders:
        raise ValueError(f"sampler {name!r}: expected one of {', '.join(builders)}")
    return builders[name]()
