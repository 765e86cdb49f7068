import numpy as np
import pytest
import torch

from diffdistill.config import DiffusionConfig
from diffdistill.diffusion import NoiseSchedule, cosine_betas, linear_betas, make_scheduler


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
