"""Class-balanced sampling with classifier-free guidance over any diffusers scheduler.

Image i of class c starts from noise (and draws its ancestral noise) from its own generator seeded by
(seed, class name, i): any class or image can be regenerated alone, the set does not depend on the batch
size, and the first k images of a class are exactly what a run with IPC = k would make.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from diffdistill.autoencoders import build_decoder
from diffdistill.checkpoint import atomic_write_json, staged_dir
from diffdistill.config import Config, SampleConfig
from diffdistill.data.classes import condition_ids
from diffdistill.data.datasets import data_classes, to_uint8
from diffdistill.diffusion import DEFAULT_SPACING, NoiseSchedule, make_scheduler
from diffdistill.models.dit import eps_prediction, learns_sigma, load_dit, null_class
from diffdistill.runtime import autocast, derive_seed, setup, write_run_info
from diffdistill.train import model_source


def image_file(class_name: str, index: int) -> str:
    return f"{class_name}/{index:05d}.png"


def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, scale: float, channels: int | None) -> Tensor:
    """ε_u + s(ε_c − ε_u), on the first `channels` latent channels only if given (original DiT: 3)."""
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if channels is None:
        return guided
    return torch.cat([guided[:, :channels], eps_cond[:, channels:]], dim=1)


@torch.no_grad()
def sample_latents(model, scfg: SampleConfig, betas: Tensor, labels: Tensor, generators: list[torch.Generator],
                   latent_shape: tuple[int, int, int], device: torch.device, precision: str = "fp32") -> Tensor:
    """Latents [B, C, H, W] for model labels `labels` [B], one generator per image. A learned-sigma model's
    variance (of the conditional half, as in DiT) drives DDPM's noise; other samplers use ε̂ only."""
    from diffusers.utils.torch_utils import randn_tensor

    c = latent_shape[0]
    learned = learns_sigma(model) and scfg.scheduler == "ddpm"
    scheduler = make_scheduler(scfg.scheduler, betas, learned, scfg.timestep_spacing)
    scheduler.set_timesteps(scfg.steps)
    b = labels.shape[0]
    x = randn_tensor((b, *latent_shape), generator=generators, device=torch.device("cpu")).to(device)
    x = x * scheduler.init_noise_sigma
    guide = scfg.guidance != 1.0
    y = torch.cat([labels, torch.full_like(labels, null_class(model))]) if guide else labels
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guide else x_in
        with autocast(device, precision):
            out = model(x_in, t.expand(x_in.shape[0]).to(device), y.to(device)).sample
        out = out.float()  # [B or 2B, C or 2C, H, W]
        eps, var = eps_prediction(out, c), out[:b, c:]
        if guide:
            eps = guided_eps(*eps.chunk(2), scfg.guidance, scfg.guidance_channels)
        x = scheduler.step(torch.cat([eps, var], 1) if learned else eps, t, x, generator=generators).prev_sample
    return x


def sample_stage(cfg: Config, force: bool = False) -> Path:
    """Write max(sample.ipc) PNGs per class under <run>/samples/<class>/ plus manifest.json."""
    scfg = cfg.sample
    device = setup(cfg)
    final = cfg.run_dir / "samples"
    source = model_source(cfg, scfg.checkpoint, scfg.weights)
    classes = data_classes(cfg.data)
    cond, _ = condition_ids(classes, cfg.model.class_ids)
    ipc = max(scfg.ipc)
    with staged_dir(final, force) as out:
        model = load_dit(source, key="sample.checkpoint").to(device).eval()
        ae = build_decoder(cfg.autoencoder).to(device)
        latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        betas = NoiseSchedule.from_config(cfg.diffusion).betas
        jobs = [(c, i) for c in range(len(classes)) for i in range(ipc)]
        records = []
        for c in classes:
            (out / c).mkdir()
        bar = tqdm(total=len(jobs), desc="sample", unit="img", dynamic_ncols=True)
        for start in range(0, len(jobs), scfg.batch_size):
            batch = jobs[start : start + scfg.batch_size]
            seeds = [derive_seed(cfg.seed, "sample", classes[c], i) for c, i in batch]
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            labels = torch.tensor([cond[c] for c, _ in batch])
            z = sample_latents(model, scfg, betas, labels, gens, latent_shape, device, cfg.precision)
            images = to_uint8(ae.decode(z)).cpu()  # [B, C, H, W]
            for (c, i), seed, img in zip(batch, seeds, images):
                arr = img.permute(1, 2, 0).numpy()
                Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(out / image_file(classes[c], i))
                records.append({"file": image_file(classes[c], i), "class": classes[c], "label": c,
                                "condition_id": cond[c], "index": i, "seed": seed})
            bar.update(len(batch))
        bar.close()
        atomic_write_json(out / "manifest.json", {
            "checkpoint": source, "weights": scfg.weights, "classes": classes, "ipc": ipc,
            "sampler": {"scheduler": scfg.scheduler, "steps": scfg.steps, "guidance": scfg.guidance,
                        "guidance_channels": scfg.guidance_channels,
                        "timestep_spacing": scfg.timestep_spacing or DEFAULT_SPACING[scfg.scheduler],
                        "learned_sigma": learns_sigma(model)},
            "images": records,
        })
        write_run_info(out, cfg, "sample", {"checkpoint": source, "num_images": len(records)})
    return final
