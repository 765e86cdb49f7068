"""Noise schedule and the forward-process formulas (pure tensor math), the variational-bound term of
learned-sigma models, plus diffusers samplers built from the same betas so training and sampling share
one schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffdistill.config import DEFAULT_SPACING, DiffusionConfig


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
    """ᾱ_t for t = 0..T-1 and the formulas that use it. Tensors are float64 (on the CPU unless moved with
    `to`); results take x's dtype."""

    def __init__(self, betas: Tensor) -> None:
        self.betas = betas.double()
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # [T]

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        return cls(SCHEDULES[cfg.schedule](cfg.train_steps, cfg.beta_start, cfg.beta_end))

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same tables on `device` (computed on the CPU, so every device holds the same values): formulas
        then gather their coefficients there, with no host-to-device copy per call."""
        out = NoiseSchedule.__new__(NoiseSchedule)
        out.betas, out.alphas_cumprod = self.betas.to(device), self.alphas_cumprod.to(device)
        return out

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

    def _posterior_terms(self) -> tuple[Tensor, Tensor, Tensor]:
        """[T] coefficients of q(z_{t-1} | z_t, z0): mean = c0·z0 + ct·z_t; clipped log variance (the
        variance at t = 0 is 0, so its log takes the t = 1 value, as in DDPM / DiT)."""
        a, b = self.alphas_cumprod, self.betas
        a_prev = torch.cat([a.new_ones(1), a[:-1]])
        var = b * (1 - a_prev) / (1 - a)
        log_var = torch.log(torch.cat([var[1:2], var[1:]]))
        return b * a_prev.sqrt() / (1 - a), (1 - a_prev) * (1 - b).sqrt() / (1 - a), log_var

    def posterior(self, z0: Tensor, zt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """q(z_{t-1} | z_t, z0) = N(mean, exp(log_var)), log_var broadcast to z0's shape."""
        c0, ct, log_var = self._posterior_terms()
        mean = self._coef(c0, t, z0) * z0 + self._coef(ct, t, z0) * zt
        return mean, self._coef(log_var, t, z0).expand_as(z0)

    def model_log_variance(self, t: Tensor, var_values: Tensor) -> Tensor:
        """DiT's learned range: v in [-1, 1] interpolates log σ² between the posterior's and log β_t."""
        frac = (var_values + 1) / 2
        min_log = self._coef(self._posterior_terms()[2], t, var_values)
        max_log = self._coef(torch.log(self.betas), t, var_values)
        return frac * max_log + (1 - frac) * min_log

    def vb_bits(self, z0: Tensor, zt: Tensor, t: Tensor, eps: Tensor, var_values: Tensor) -> Tensor:
        """[B] the variational-bound term of the hybrid loss, in bits per dimension: KL(q(z_{t-1}|z_t, z0) ‖
        p(z_{t-1}|z_t)) for t > 0, the discretized decoder NLL of z0 at t = 0. Pass ε̂ detached so that
        this term trains only the variance (DiT's "frozen mean")."""
        true_mean, true_log_var = self.posterior(z0, zt, t)
        model_mean, _ = self.posterior(self.x0_from_eps(zt, t, eps), zt, t)
        model_log_var = self.model_log_variance(t, var_values)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(z0, model_mean, 0.5 * model_log_var).flatten(1).mean(1)
        return torch.where(t.to(z0.device) == 0, nll, kl) / math.log(2.0)


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability of x (in [-1, 1], 256 levels) under N(mean, e^(2·log_scale)) integrated
    over x's bin; the outermost bins extend to ±∞ (DDPM's decoder). Uses the exact normal CDF."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp_min(1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp_min(1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp_min(1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))



def mode_guided_eps(eps: Tensor, zt: Tensor, mode: Tensor, alpha_bar: Tensor | float, scale: float) -> Tensor:
    """MGD³'s mode guidance in ε form: ε̂ − λ σ_t (m − x̂0), with σ_t = √(1 − ᾱ_t) and x̂0 = (z_t − σ_t ε̂) / √ᾱ_t
    the step's predicted clean latent. The x̂0 of the result is x̂0 + λ σ_t² / √ᾱ_t · (m − x̂0): closer to the
    mode m while λ σ_t² / √ᾱ_t < 2; at the noisiest steps (ᾱ_t ~ 1e-4) it overshoots past m, which the
    samplers (linear in ε̂) carry as a small pull of z_t toward m — unless x̂0 is clipped (sample.clip_denoised),
    which then saturates it. All tensors [B, C, H, W]; `alpha_bar` = ᾱ_t (scalar or [B, 1, 1, 1])."""
    a = torch.as_tensor(alpha_bar, dtype=eps.dtype, device=eps.device)
    sigma = (1 - a).sqrt()
    x0 = (zt - sigma * eps) / a.sqrt()
    return eps - scale * sigma * (mode - x0)


def noised_start(mode: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """√ᾱ_s m + √(1 − ᾱ_s) ε: a prototype noised to step s (D4M-style start)."""
    a = torch.as_tensor(alpha_bar, dtype=mode.dtype, device=mode.device)
    return a.sqrt() * mode + (1 - a).sqrt() * noise


def make_scheduler(name: str, betas: Tensor, learned_sigma: bool = False, spacing: str | None = None,
                   ddpm_variance: str = "fixed_large", clip: float | None = None):
    """A diffusers sampler over the training betas (epsilon prediction; x̂0 clipped to [−clip, clip] by ddpm and
    ddim if `clip` is given, never by dpm). With `learned_sigma`
    DDPM takes the model's variance channels (DiT's learned range); the other samplers ignore them.
    Without, DDPM's variance is `ddpm_variance`: "fixed_large" = β_t (DiT's sampler for models without
    learned sigma) or "fixed_small" = the posterior variance β̃_t, both of the respaced schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name not in DEFAULT_SPACING:
        raise ValueError(f"sampler {name!r}: expected one of {', '.join(DEFAULT_SPACING)}")
    common = dict(num_train_timesteps=betas.shape[0], trained_betas=betas.float().numpy(),
                  prediction_type="epsilon", timestep_spacing=spacing or DEFAULT_SPACING[name])
    if ddpm_variance not in ("fixed_large", "fixed_small"):
        raise ValueError(f"DDPM variance {ddpm_variance!r}: expected 'fixed_large' or 'fixed_small'")
    variance = "learned_range" if learned_sigma else ddpm_variance
    clipping = dict(clip_sample=clip is not None, clip_sample_range=clip or 1.0)
    builders = {
        "ddpm": lambda: DDPMScheduler(**common, variance_type=variance, **clipping),
        "ddim": lambda: DDIMScheduler(**common, set_alpha_to_one=False, **clipping),
        "dpm": lambda: DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++"),
    }
    return builders[name]()
