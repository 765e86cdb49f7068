import math

import numpy as np
import pytest
import torch

from diffdistill.config import DiffusionConfig
from diffdistill.diffusion import (
    NoiseSchedule,
    cosine_betas,
    discretized_gaussian_log_likelihood,
    linear_betas,
    make_scheduler,
    normal_kl,
)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_x0_from_eps_inverts_q_sample(schedule):
    sched = NoiseSchedule.from_config(DiffusionConfig(schedule=schedule))
    z0 = torch.randn(6, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(z0)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    zt = sched.q_sample(z0, t, eps)
    assert torch.allclose(sched.x0_from_eps(zt, t, eps), z0, atol=1e-6)
    # the formula itself: z_t = sqrt(abar) z0 + sqrt(1 - abar) eps
    abar = sched.alphas_cumprod[500]
    assert torch.allclose(zt[3], abar.sqrt() * z0[3] + (1 - abar).sqrt() * eps[3])


def test_schedules_match_diffusers():
    from diffusers import DDPMScheduler

    lin = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    assert np.allclose(linear_betas(1000, 1e-4, 0.02).numpy(), lin.betas.numpy(), atol=1e-8)
    cos = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert np.allclose(cosine_betas(1000).numpy(), cos.betas.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm"])
def test_samplers_use_the_training_betas(name):
    betas = cosine_betas(1000)
    s = make_scheduler(name, betas)
    s.set_timesteps(10)
    assert len(s.timesteps) == 10
    assert np.allclose(s.alphas_cumprod.numpy(), NoiseSchedule(betas).alphas_cumprod.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="expected one of ddpm, ddim, dpm"):
        make_scheduler("euler", betas)


def test_posterior_is_the_product_of_the_two_gaussians():
    sched = NoiseSchedule.from_config(DiffusionConfig())
    z0, zt = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 300, 999])
    mean, log_var = sched.posterior(z0, zt, t)
    a, b = sched.alphas_cumprod, sched.betas
    for j, s in enumerate(t.tolist()):
        # q(z_{t-1}|z0) = N(sqrt(abar_{t-1}) z0, 1 - abar_{t-1}); q(z_t|z_{t-1}) = N(sqrt(1 - b_t) z_{t-1}, b_t)
        precision = 1 / (1 - a[s - 1]) + (1 - b[s]) / b[s]
        expected = (a[s - 1].sqrt() * z0[j] / (1 - a[s - 1]) + (1 - b[s]).sqrt() * zt[j] / b[s]) / precision
        assert torch.allclose(mean[j], expected)
        assert torch.allclose(log_var[j], torch.log(1 / precision).expand(2, 4, 4))
    _, lv0 = sched.posterior(z0, zt, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(lv0, log_var.new_full(lv0.shape, float(torch.log(b[1] * (1 - a[0]) / (1 - a[1])))))


def test_kl_and_decoder_likelihood_against_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    m1, m2, lv1, lv2 = torch.randn(4, 50, dtype=torch.float64).unbind(0)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    mean, log_scale = torch.full_like(x, 0.1), torch.full_like(x, -0.5)
    d = Normal(mean, log_scale.exp())
    lo, hi = d.cdf(x - 1 / 255), d.cdf(x + 1 / 255)
    expected = torch.log(torch.where(x <= -1, hi, torch.where(x >= 1, 1 - lo, hi - lo)))  # edge bins reach ±∞
    assert torch.allclose(discretized_gaussian_log_likelihood(x, mean, log_scale), expected)


def test_vb_term_vanishes_for_the_true_noise_and_posterior_variance():
    sched = NoiseSchedule.from_config(DiffusionConfig())
    z0, eps = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    zt = sched.q_sample(z0, t, eps)
    v = -torch.ones_like(z0)  # v = -1: the model's variance is the posterior's
    assert torch.allclose(sched.vb_bits(z0, zt, t, eps, v), torch.zeros(4, dtype=torch.float64), atol=1e-9)
    wrong = sched.vb_bits(z0, zt, t, eps + 0.1, v)
    assert (wrong > 0).all()
    larger = sched.vb_bits(z0, zt, t, eps, torch.ones_like(z0))  # v = 1: beta_t, larger than the posterior's
    assert (larger[1:] > 0).all()
    t0 = torch.zeros(4, dtype=torch.long)  # t = 0: the decoder's negative log-likelihood, in bits
    nll = sched.vb_bits(z0, sched.q_sample(z0, t0, eps), t0, eps, v)
    assert (nll > 0).all()


def test_guidance_on_all_channels_or_only_the_first_ones():
    from diffdistill.stages.sample import guided_eps

    cond, uncond = torch.full((2, 4, 3, 3), 2.0), torch.full((2, 4, 3, 3), 0.5)
    assert torch.equal(guided_eps(cond, uncond, 4.0, None), torch.full((2, 4, 3, 3), 0.5 + 4.0 * 1.5))
    # original DiT: guidance on the first 3 latent channels, the 4th keeps the conditional prediction
    three = guided_eps(cond, uncond, 4.0, 3)
    assert torch.equal(three[:, :3], torch.full((2, 3, 3, 3), 6.5)) and torch.equal(three[:, 3], cond[:, 3])
    assert torch.equal(guided_eps(cond, uncond, 1.0, None), cond)  # scale 1: no guidance


def _respaced(sched, t: int) -> tuple[float, float]:
    """(ᾱ_t, ᾱ_prev) of the sampler's own step t -> its previous step (1 after the last)."""
    steps = sched.timesteps.tolist()
    prev = steps[steps.index(t) + 1] if steps.index(t) + 1 < len(steps) else -1
    a = sched.alphas_cumprod
    return float(a[t]), float(a[prev]) if prev >= 0 else 1.0


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_step_variance_against_the_formula(variance):
    betas = linear_betas(1000, 1e-4, 0.02)
    assert make_scheduler("ddpm", betas).config.variance_type == "fixed_large"  # DiT's sampler, the default
    sched = make_scheduler("ddpm", betas, ddpm_variance=variance)
    sched.set_timesteps(50)
    assert sched.timesteps[:3].tolist() == [999, 979, 958]  # DiT's respacing (linspace), as the default
    x, eps = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    t = int(sched.timesteps[10])
    a_t, a_prev = _respaced(sched, t)
    beta = 1 - a_t / a_prev  # β of the respaced schedule
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
    var = beta if variance == "fixed_large" else beta * (1 - a_prev) / (1 - a_t)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = sched.step(eps, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.allclose(out, mean + var ** 0.5 * z, atol=1e-6)


def test_learned_sigma_ddpm_step_against_the_formula():
    betas = linear_betas(1000, 1e-4, 0.02)
    sched = make_scheduler("ddpm", betas, learned_sigma=True)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    v = torch.rand(2, 4, 4, 4, generator=g) * 2 - 1  # the model's variance channels, in [-1, 1]
    t = int(sched.timesteps[20])
    a_t, a_prev = _respaced(sched, t)
    beta = 1 - a_t / a_prev
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
    # DiT's learned range: log σ² interpolates between log β̃_t (v = -1) and log β_t (v = 1)
    log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(beta * (1 - a_prev) / (1 - a_t))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    out = sched.step(torch.cat([eps, v], 1), t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.allclose(out, mean + torch.exp(0.5 * log_var) * z, atol=1e-5)


def test_cosine_sampling_from_the_last_training_step_needs_clipping():
    """The cosine schedule's ᾱ at t = 999 is 2.4e-9: x̂0 = x / sqrt(ᾱ) magnifies any error of ε̂ 20,000×.
    A fresh DiT predicts ε̂ = 0 (zero-initialised output), so that error is the whole noise."""
    from diffdistill.config import SampleConfig
    from diffdistill.models.dit import build_dit
    from diffdistill.stages.sample import sample_latents

    model = build_dit("tiny", 4, 8, 3).eval()
    labels, betas = torch.tensor([0, 1]), cosine_betas(1000)
    out = {}
    for clip in (False, True):
        scfg = SampleConfig(scheduler="ddpm", steps=5, guidance=1.0, clip_denoised=clip)
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        out[clip] = sample_latents(model, scfg, betas, labels, gens, (4, 8, 8), torch.device("cpu"), data_range=1.0)
    assert out[False].abs().max() > 100  # what sample.clip_denoised=false would hand to the decoder
    assert out[True].abs().max() <= 1.05  # x̂0 in [-1, 1]; the last step adds almost nothing else
