"""The one training loop, shared by `pretrain` (from scratch) and `finetune` (memory losses, DiffFit).

Per step: z0 = s·encode(x) (or from the latent cache); t ~ U{0..T-1}; z_t = q(z0, t, ε);
ε̂ = DiT(z_t, t, y with label dropout); L = MSE(ε̂, ε) [+ the variational bound for learned-sigma models]
+ Σ_c a_c(x̂0); then the real memory takes z0 and the generated memory takes x̂0 (detached).
All randomness comes from one CPU generator seeded from (seed, stage), so a run is reproducible.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from diffdistill.autoencoders import build_autoencoder, sample_latent
from diffdistill.checkpoint import StageError, staged_dir
from diffdistill.config import Config, TrainConfig
from diffdistill.data.classes import condition_ids
from diffdistill.data.datasets import ImageSet, load_data
from diffdistill.diffusion import NoiseSchedule
from diffdistill.losses import combine_terms, memory_loss_terms_dense
from diffdistill.memory import MemoryBank
from diffdistill.models.adapters import Trainable, make_trainable
from diffdistill.models.dit import (
    build_dit,
    check_compatible,
    drop_labels,
    eps_prediction,
    learns_sigma,
    load_dit,
    null_class,
)
from diffdistill.runtime import autocast, derive_seed, setup, write_run_info

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' file name: folders load with from_pretrained


class EMA:
    """Exponential moving average of the trainable parameters (frozen ones never change)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.decay)


def model_source(cfg: Config, spec: str, weights: str = "ema") -> str:
    """A stage name of this run ("pretrain", "finetune") -> its saved model folder; else `spec` as given."""
    if spec in ("pretrain", "finetune"):
        folder = cfg.run_dir / spec / weights
        if not folder.is_dir():
            raise StageError(f"{folder} does not exist: run `diffdistill {spec}` with this config first")
        return str(folder)
    return spec


def save_model_folder(folder: Path, model, state: dict[str, Tensor]) -> None:
    """A diffusers model folder (config.json + safetensors) holding `state` for `model`'s architecture."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    # clone: tied parameters share storage, which safetensors refuses
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))


class ImageLatents:
    """Train latents made by encoding each batch with the autoencoder (the VAE runs every step)."""

    def __init__(self, data: ImageSet, ae, hflip: bool) -> None:
        self.data, self.ae, self.hflip = data, ae, hflip
        self.labels, self.classes = data.labels, data.classes

    def __len__(self) -> int:
        return len(self.data)

    def describe(self) -> dict:
        return {"latents": "encoded every step", "data_sha256": self.data.sha256()}

    def sample(self, idx: Tensor, gen: torch.Generator, device: torch.device) -> Tensor:
        x = self.data.images[idx].to(device).float().div_(127.5).sub_(1)  # [B, C, H, W] in [-1, 1]
        if self.hflip:
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return sample_latent(*self.ae.moments(x), self.ae.scaling_factor, gen)  # [B, C', H', W']


class CachedLatents:
    """Train latents drawn from the posterior moments that `diffdistill prepare` stored (no VAE here)."""

    def __init__(self, cache, scaling_factor: float | None, hflip: bool) -> None:
        self.cache, self.hflip = cache, hflip
        self.scaling_factor = scaling_factor or cache.manifest["scaling_factor"]
        self.labels, self.classes = cache.labels, cache.classes

    def __len__(self) -> int:
        return len(self.cache)

    def describe(self) -> dict:
        return {"latents": f"cache {self.cache.folder}", "data_sha256": self.cache.manifest["data_sha256"]}

    def sample(self, idx: Tensor, gen: torch.Generator, device: torch.device) -> Tensor:
        flip = torch.rand(len(idx), generator=gen) < 0.5 if self.hflip else None
        mean, std = self.cache.moments(idx, flip)
        return sample_latent(mean.to(device), None if std is None else std.to(device), self.scaling_factor, gen)


def latent_source(cfg: Config, tcfg: TrainConfig, device: torch.device):
    """(source, latent shape) for `tcfg.latents`: the autoencoder on the images, or the latent cache."""
    if tcfg.latents == "cache":
        from diffdistill.latents import open_cache

        cache = open_cache(cfg)
        return CachedLatents(cache, cfg.autoencoder.scaling_factor, cfg.data.hflip), cache.latent_shape
    data, _ = load_data(cfg.data, need_val=False)
    ae = build_autoencoder(cfg.autoencoder).to(device)
    return ImageLatents(data, ae, cfg.data.hflip), ae.latent_shape(data.channels, cfg.data.image_size)


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled epochs of indices; the last partial batch of an epoch is dropped if n > batch."""
    while True:
        perm = torch.randperm(n, generator=gen)
        stop = n - n % batch_size if n >= batch_size else n
        for i in range(0, max(stop, 1), batch_size):
            yield perm[i : i + batch_size]


def train_stage(cfg: Config, stage: str, force: bool = False) -> Path:
    """Run `pretrain` or `finetune` per the config; returns the stage's output folder."""
    tcfg: TrainConfig = getattr(cfg, stage)
    final = cfg.run_dir / stage
    device = setup(cfg)
    if tcfg.steps <= 0:
        raise StageError(f"{stage}.steps is {tcfg.steps}: nothing to train")
    init = model_source(cfg, tcfg.init) if tcfg.init else None
    with staged_dir(final, force) as out:
        model = load_dit(init, tcfg.revision, f"{stage}.init") if init else None  # missing weights: fail first
        source, latent = latent_source(cfg, tcfg, device)  # latent: (C, H, W)
        cond, num_embeds = condition_ids(source.classes, cfg.model.class_ids)
        if model is None:
            torch.manual_seed(derive_seed(cfg.seed, stage, "init"))  # weight init uses torch's global RNG
            model = build_dit(cfg.model.size, latent[0], latent[1], num_embeds, cfg.model.learn_sigma)
        else:
            check_compatible(model, latent, num_embeds, init)
        model.to(device).train()
        trainable = make_trainable(model, tcfg.trainable, tcfg.difffit_blocks)
        log = _loop(cfg, stage, tcfg, model, trainable, source, latent, torch.tensor(cond), device, out)
        save_model_folder(out / "raw", model, trainable.folded_state_dict(model))
        save_model_folder(out / "ema", model, trainable.folded_state_dict(model, log.pop("ema_values")))
        banks = log.pop("banks")
        if banks:
            save_file({f"{name}.{k}": v.contiguous().cpu() for name, bank in banks.items()
                       for k, v in bank.state_dict().items()}, str(out / "memory.safetensors"))
        n_trainable = sum(p.numel() for p in trainable.params)
        write_run_info(out, cfg, stage, {
            "init": init, "classes": source.classes, "condition_ids": cond, "latent_shape": list(latent),
            **source.describe(), "num_train_images": len(source), "learned_sigma": learns_sigma(model),
            "trainable_parameters": n_trainable, **log,
        })
    return final


def _loop(cfg: Config, stage: str, tcfg: TrainConfig, model, trainable: Trainable, source, latent,
          cond: Tensor, device: torch.device, out: Path) -> dict:
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, stage))
    opt = torch.optim.AdamW(trainable.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    warmup = max(tcfg.warmup_steps, 1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMA(trainable.params, tcfg.ema)
    mem = tcfg.memory
    dim = math.prod(latent)
    bank_dtype = getattr(torch, mem.dtype)
    banks = {} if mem.policy == "none" else {
        "real": MemoryBank(len(source.classes), mem.size_real, dim, mem.policy, device, bank_dtype),
        "gen": MemoryBank(len(source.classes), mem.size_gen, dim, mem.policy, device, bank_dtype),
    }
    null_id, labels, sigma = null_class(model), source.labels, learns_sigma(model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    batches = _batches(len(source), tcfg.batch_size, gen)
    with (out / "log.jsonl").open("w") as log_file:
        sums: dict[str, float] = {}
        t_start, mem_seconds = time.perf_counter(), 0.0
        bar = tqdm(range(1, tcfg.steps + 1), desc=stage, unit="step", dynamic_ncols=True)
        for step in bar:
            idx = next(batches)
            z0 = source.sample(idx, gen, device)  # [B, C, H, W]
            y = labels[idx]  # [B] dataset-local class ids
            t = torch.randint(0, schedule.num_steps, (len(idx),), generator=gen)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            y_model = drop_labels(cond[y], null_id, cfg.model.class_dropout, gen).to(device)
            t, y_dev = t.to(device), y.to(device)
            zt = schedule.q_sample(z0, t, noise)
            with autocast(device, cfg.precision):
                out_model = model(zt, t, y_model).sample  # [B, C or 2C, H, W]
            eps = eps_prediction(out_model.float(), latent[0])
            loss_diff = F.mse_loss(eps, noise)
            loss, parts = loss_diff, {"diffusion": loss_diff.item()}
            if sigma:  # hybrid loss: the bound trains the variance channels only (ε̂ detached)
                loss_vb = schedule.vb_bits(z0, zt, t, eps.detach(), out_model[:, latent[0]:].float()).mean()
                loss = loss + loss_vb
                parts["vb"] = loss_vb.item()
            if banks:
                tm = time.perf_counter()
                x0_hat = schedule.x0_from_eps(zt, t, eps).flatten(1)  # [B, D]
                real, gen_bank = banks["real"], banks["gen"]
                _, reps, divs = memory_loss_terms_dense(x0_hat, y_dev, real.rows, real.counts, gen_bank.rows,
                                                        gen_bank.counts)
                loss_mem = combine_terms(reps, divs, mem.lambda_real, mem.lambda_gen, mem.loss_accumulation)
                loss = loss + loss_mem
                parts.update(representativeness=reps.mean().item(), diversity=divs.mean().item(),
                             memory=loss_mem.item())
                mem_seconds += time.perf_counter() - tm
            if not torch.isfinite(loss):
                raise StageError(f"{stage}: loss is {float(loss)} at step {step}; lower {stage}.lr or check the data")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tcfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(trainable.params, tcfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            lr_sched.step()
            ema.update()
            if banks:
                tm = time.perf_counter()
                banks["real"].push(z0.flatten(1), y_dev)
                banks["gen"].push(x0_hat.detach(), y_dev)
                mem_seconds += time.perf_counter() - tm
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                n = (step - 1) % tcfg.log_every + 1
                row = {"step": step, **{k: v / n for k, v in sums.items()}, "lr": lr_sched.get_last_lr()[0]}
                if banks:
                    row.update(real_bank_similarity=banks["real"].mean_similarity(),
                               gen_bank_similarity=banks["gen"].mean_similarity())
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{row['diffusion']:.4f}")
                sums = {}
    seconds = time.perf_counter() - t_start
    return {"steps": tcfg.steps, "seconds": round(seconds, 2), "memory_seconds": round(mem_seconds, 3),
            "last_log": row, "ema_values": ema.shadow, "banks": banks}
