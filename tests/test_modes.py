"""Mode guidance (MGD³) and the prototype start (D4M-style) in the sampling loop."""

import pytest
import torch

from diffdistill.config import ModeGuidanceConfig, SampleConfig
from diffdistill.diffusion import linear_betas, make_scheduler, mode_guided_eps, noised_start
from diffdistill.models.dit import build_dit
from diffdistill.stages import sample as sample_mod
from diffdistill.stages.sample import sample_latents, start_step

BETAS = linear_betas(1000, 1e-4, 0.02)
SHAPE = (4, 8, 8)


def _model():
    torch.manual_seed(0)
    model = build_dit("tiny", 4, 8, 3).eval()
    for p in model.parameters():  # a fresh DiT predicts ε̂ = 0 exactly (zero-initialised output): perturb it
        p.data.add_(0.02 * torch.randn_like(p))
    return model


def _sample(model, scfg, modes=None):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    return sample_latents(model, scfg, BETAS, torch.tensor([0, 1]), gens, SHAPE, torch.device("cpu"), modes=modes)


def test_mode_guided_eps_moves_x0_toward_the_mode_by_the_stated_factor():
    g = torch.Generator().manual_seed(0)
    eps, zt, mode = (torch.randn(2, *SHAPE, generator=g) for _ in range(3))
    a, lam = torch.tensor(0.3), 0.1
    x0 = (zt - (1 - a).sqrt() * eps) / a.sqrt()
    new = mode_guided_eps(eps, zt, mode, a, lam)
    x0_new = (zt - (1 - a).sqrt() * new) / a.sqrt()
    factor = 1 - lam * (1 - a) / a.sqrt()  # 0.872
    assert torch.allclose(x0_new - mode, factor * (x0 - mode), atol=1e-5)
    assert (x0_new - mode).norm() < (x0 - mode).norm()


def test_noised_start_is_the_forward_process_at_that_step():
    m, e = torch.ones(1, *SHAPE), torch.full((1, *SHAPE), 2.0)
    assert torch.allclose(noised_start(m, e, 0.64), 0.8 * m + 0.6 * e)


def test_scale_zero_and_stop_zero_equal_plain_sampling_bit_for_bit():
    model = _model()
    base = SampleConfig(scheduler="ddim", steps=6, guidance=1.0)
    plain = _sample(model, base)
    modes = torch.randn(2, *SHAPE)
    for mg in (ModeGuidanceConfig(scale=0.0), ModeGuidanceConfig(scale=0.1, stop=0.0)):
        out = _sample(model, SampleConfig(scheduler="ddim", steps=6, guidance=1.0, mode_guidance=mg), modes)
        assert torch.equal(out, plain)


def test_guidance_acts_on_the_first_steps_only_and_pulls_toward_each_image_s_mode(monkeypatch):
    model = _model()
    modes = torch.stack([torch.full(SHAPE, 1.0), torch.full(SHAPE, -1.0)])  # a different mode per image
    calls = []

    def recording(eps, zt, mode, alpha_bar, scale):
        out = mode_guided_eps(eps, zt, mode, alpha_bar, scale)
        a = torch.as_tensor(alpha_bar)
        before = (zt - (1 - a).sqrt() * eps) / a.sqrt()
        after = (zt - (1 - a).sqrt() * out) / a.sqrt()
        gain = float(scale * (1 - a) / a.sqrt())  # x̂0 − m shrinks by |1 − gain|: toward m while gain < 2
        calls.append((gain, (before - mode).flatten(1).norm(dim=1), (after - mode).flatten(1).norm(dim=1)))
        return out

    monkeypatch.setattr(sample_mod, "mode_guided_eps", recording)
    scfg = SampleConfig(scheduler="ddim", steps=10, guidance=1.0, mode_guidance=ModeGuidanceConfig(0.1, 0.5))
    guided = _sample(model, scfg, modes)
    assert len(calls) == 5  # stop after half of the 10 steps
    # at the noisiest steps (ᾱ_t ~ 1e-4) x̂0 overshoots past the mode; from there on, each step pulls it closer
    toward = [(before, after) for gain, before, after in calls if gain < 2]
    assert len(toward) >= 2 and all(bool((after < before).all()) for before, after in toward)
    monkeypatch.undo()
    plain = _sample(model, SampleConfig(scheduler="ddim", steps=10, guidance=1.0))
    dist = lambda x: (x - modes).flatten(1).norm(dim=1)  # noqa: E731
    assert bool((dist(guided) < dist(plain)).all())


@pytest.mark.parametrize("scheduler,strength,first", [("ddpm", 0.6, 4), ("ddim", 0.6, 4), ("dpm", 0.6, 4),
                                                       ("ddim", 1.0, 0)])
def test_prototype_start_noises_the_mode_to_the_first_step_run(scheduler, strength, first):
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, x, t, y):
            seen.setdefault("x", x.clone())
            seen.setdefault("t", int(t[0]))
            seen["calls"] = seen.get("calls", 0) + 1
            return self.inner(x, t, y)

    model = Recorder(_model())
    modes = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9))
    scfg = SampleConfig(scheduler=scheduler, steps=10, guidance=1.0, start="prototype", prototype_strength=strength)
    _sample(model, scfg, modes)
    sched = make_scheduler(scheduler, BETAS)
    sched.set_timesteps(10)
    assert start_step(10, scfg) == first and seen["calls"] == 10 - first
    assert seen["t"] == int(sched.timesteps[first])  # strength 1: the prototype noised to the first step
    noise = torch.cat([torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    a = torch.cumprod(1 - BETAS.double(), 0).float()[seen["t"]]
    assert torch.allclose(seen["x"], a.sqrt() * modes + (1 - a).sqrt() * noise, atol=1e-6)


def test_modes_are_required_when_asked_for():
    scfg = SampleConfig(scheduler="ddim", steps=4, guidance=1.0, start="prototype")
    with pytest.raises(ValueError, match="need each image's mode"):
        _sample(_model(), scfg)


def test_a_batch_that_runs_out_of_memory_is_sampled_in_halves(capsys):
    from diffdistill.stages.sample import _sample_fitting

    sizes = []

    def make(part):
        sizes.append(len(part))
        if len(part) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return torch.tensor(part)[:, None]

    fits = [7]
    out = _sample_fitting(make, list(range(7)), fits)
    assert out.squeeze(1).tolist() == list(range(7))  # every image, in order
    assert sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1] and fits == [1]  # 7 -> 3 -> 1 (3 // 2), kept for what follows
    assert "sample.batch_size=3" in capsys.readouterr().out
    assert _sample_fitting(make, list(range(4)), [2]).squeeze(1).tolist() == [0, 1, 2, 3]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _sample_fitting(lambda part: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")), [0], [1])
