"""The one training loop, shared by `pretrain` (from scratch) and `finetune` (memory losses, DiffFit).

Per step: z0 = s·encode(x) (or from the latent cache); t ~ U{0..T-1}; z_t = q(z0, t, ε);
ε̂ = DiT(z_t, t, y with label dropout); L = MSE(ε̂, ε) [+ the variational bound for learned-sigma models]
+ Σ_c a_c(x̂0); then the real memory takes z0 and the generated memory takes x̂0 (detached).
All randomness comes from one CPU generator seeded from (seed, stage), so a run is reproducible.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from diffdistill import distributed as dist
from diffdistill.autoencoders import build_autoencoder, sample_latent
from diffdistill.checkpoint import (
    StageError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_free,
    replace_dir,
    staged_dir,
)
from diffdistill.config import Config, TrainConfig, to_dict
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


class BatchOrder:
    """Endless shuffled epochs of indices; the last partial batch of an epoch is dropped if n > batch.
    Its position (this epoch's permutation and the offset in it) is part of a checkpoint."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator) -> None:
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.perm: Tensor | None = None
        self.pos = 0

    def __next__(self) -> Tensor:
        stop = self.n - self.n % self.batch_size if self.n >= self.batch_size else self.n
        if self.perm is None or self.pos >= max(stop, 1):
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm if self.perm is not None else torch.empty(0, dtype=torch.long), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm = state["perm"] if state["perm"].numel() else None
        self.pos = int(state["pos"])


# keys that may change between a checkpoint and its resumption (they do not change the result)
_RESUME_FREE = {"steps", "checkpoint_every", "keep_checkpoints", "log_every"}


def _resume_spec(cfg: Config, stage: str) -> dict:
    """The part of the config a checkpoint must match to be resumed bit-identically."""
    d = to_dict(cfg)
    return {"seed": cfg.seed, "precision": cfg.precision, "data": d["data"], "autoencoder": d["autoencoder"],
            "model": d["model"], "diffusion": d["diffusion"], "prepare": d["prepare"],
            stage: {k: v for k, v in d[stage].items() if k not in _RESUME_FREE}}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def checkpoint_root(cfg: Config, stage: str) -> Path:
    return cfg.run_dir / "checkpoints" / stage


def _valid_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (state.json is written last), newest first."""
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name, reverse=True)


def train_stage(cfg: Config, stage: str, force: bool = False, resume: bool = False) -> Path:
    """Run `pretrain` or `finetune` per the config; returns the stage's output folder. Under torchrun every
    rank trains (DDP) and rank 0 writes the outputs."""
    tcfg: TrainConfig = getattr(cfg, stage)
    final = cfg.run_dir / stage
    device = dist.init(setup(cfg))
    world = dist.world_size()
    if tcfg.steps <= 0:
        raise StageError(f"{stage}.steps is {tcfg.steps}: nothing to train")
    if tcfg.batch_size % world:
        raise StageError(f"{stage}.batch_size {tcfg.batch_size} is not divisible by the {world} processes; "
                         f"the global batch is split evenly")
    ckpt_root = checkpoint_root(cfg, stage)
    found = _valid_checkpoints(ckpt_root)
    if resume and final.exists() and not found:
        raise StageError(f"{final} is complete and has no checkpoint to resume; pass --force to train it again")
    if found and not (resume or force):
        raise StageError(f"{ckpt_root} holds checkpoints of an unfinished {stage} (newest: {found[0].name}); "
                         f"pass --resume to continue it or --force to start over")
    if force and not resume:
        dist.barrier()
        if dist.is_main():
            shutil.rmtree(ckpt_root, ignore_errors=True)
        found = []
    init = model_source(cfg, tcfg.init) if tcfg.init else None
    check_output_free(final, force or resume)  # on every rank, before any collective
    with _main_staged_dir(final, force or resume) as out:
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
        loop = TrainLoop(cfg, stage, model, trainable, source, latent, torch.tensor(cond), device)
        if resume and found:
            loop.load(found[0], _resume_spec(cfg, stage))
        log = loop.run(out, ckpt_root)
        if dist.is_main():
            save_model_folder(out / "raw", model, trainable.folded_state_dict(model))
            save_model_folder(out / "ema", model, trainable.folded_state_dict(model, loop.ema.shadow))
        _save_banks(loop.banks, out)
        if dist.is_main():
            write_run_info(out, cfg, stage, {
                "init": init, "classes": source.classes, "condition_ids": cond, "latent_shape": list(latent),
                **source.describe(), "num_train_images": len(source), "learned_sigma": learns_sigma(model),
                "trainable_parameters": sum(p.numel() for p in trainable.params), "world_size": world,
                "per_rank_batch_size": tcfg.batch_size // world, **log,
            })
        dist.barrier()  # every rank's files are in place before rank 0 renames the folder
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the stage's output supersedes its checkpoints
        if ckpt_root.parent.is_dir() and not any(ckpt_root.parent.iterdir()):
            ckpt_root.parent.rmdir()
    return final


@contextmanager
def _main_staged_dir(final: Path, force: bool) -> Iterator[Path]:
    """`staged_dir` on rank 0; every rank gets the same temp folder path (shared file system)."""
    if not dist.enabled():
        with staged_dir(final, force) as out:
            yield out
        return
    if dist.is_main():
        with staged_dir(final, force) as out:
            dist.broadcast_object(str(out))
            yield out
    else:
        yield Path(dist.broadcast_object(None))


def _save_banks(banks: dict[str, MemoryBank], out: Path) -> None:
    """memory.safetensors from rank 0; with per-rank banks each other rank adds memory-rank<r>.safetensors."""
    if not banks:
        return
    name = "memory.safetensors" if dist.is_main() else f"memory-rank{dist.rank()}.safetensors"
    if dist.is_main() or banks["real"].sync is None:
        save_file({f"{bank_name}.{k}": v.contiguous().cpu() for bank_name, bank in banks.items()
                   for k, v in bank.state_dict().items()}, str(out / name))


class TrainLoop:
    """Everything a step changes — weights, EMA, optimizer, lr schedule, loss scale, memories, the
    generator and data order of this rank, running log sums — so that a checkpoint can restore it exactly."""

    def __init__(self, cfg: Config, stage: str, model, trainable: Trainable, source, latent, cond: Tensor,
                 device: torch.device) -> None:
        self.cfg, self.stage, self.tcfg = cfg, stage, getattr(cfg, stage)
        self.model, self.trainable, self.source, self.latent = model, trainable, source, latent
        self.cond, self.device = cond, device
        tcfg, mem = self.tcfg, self.tcfg.memory
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)
        seed = derive_seed(cfg.seed, stage) if not dist.enabled() else derive_seed(cfg.seed, stage, "rank",
                                                                                  dist.rank())
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.AdamW(trainable.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        warmup = max(tcfg.warmup_steps, 1)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warmup))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.ema = EMA(trainable.params, tcfg.ema)
        dim, bank_dtype = math.prod(latent), getattr(torch, mem.dtype)
        self.banks: dict[str, MemoryBank] = {} if mem.policy == "none" else {
            "real": MemoryBank(len(source.classes), mem.size_real, dim, mem.policy, device, bank_dtype),
            "gen": MemoryBank(len(source.classes), mem.size_gen, dim, mem.policy, device, bank_dtype),
        }
        for bank in self.banks.values():
            bank.sync = dist.all_gather_rows if mem.sync == "allgather" and dist.enabled() else None
        self.order = BatchOrder(len(source), tcfg.batch_size // dist.world_size(), self.gen)
        self.step, self.sums, self.rows = 0, {}, []
        if dist.enabled():
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.net = model

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self, root: Path) -> None:
        """<root>/step-<N>/: trainable weights + EMA (safetensors), optimizer / schedule / scaler, and one
        file per rank (generator, data order, memories, log sums); state.json last marks it complete."""
        final = root / f"step-{self.step:08d}"
        tmp = root / f".step-{self.step:08d}.tmp"
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        rank_state = {"generator": self.gen.get_state(), "order": self.order.state_dict(), "sums": self.sums,
                      "banks": {k: {n: v.cpu() for n, v in b.state_dict().items()} for k, b in self.banks.items()}}
        _torch_save(rank_state, tmp / f"rank-{dist.rank()}.pt")
        if dist.is_main():
            tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.trainable.params)}
            tensors.update({f"ema.{i}": v.cpu().contiguous() for i, v in enumerate(self.ema.shadow)})
            save_file(tensors, str(tmp / "trainable.safetensors"))
            _torch_save({"optimizer": self.opt.state_dict(), "lr_scheduler": self.lr_sched.state_dict(),
                         "scaler": self.scaler.state_dict()}, tmp / "optimizer.pt")
            atomic_write_text(tmp / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        dist.barrier()
        if dist.is_main():
            atomic_write_json(tmp / "state.json", {"step": self.step, "world_size": dist.world_size(),
                                                   "config": _resume_spec(self.cfg, self.stage)})
            replace_dir(tmp, final)
            for old in _valid_checkpoints(root)[self.tcfg.keep_checkpoints :]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, folder: Path, spec: dict) -> None:
        state = json.loads((folder / "state.json").read_text())
        if state["world_size"] != dist.world_size():
            raise StageError(f"{folder} was written by {state['world_size']} processes, this run has "
                             f"{dist.world_size()}: resume with the same number (torchrun --nproc_per_node)")
        if state["config"] != spec:
            old, new = _flat(state["config"]), _flat(spec)
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise StageError(f"{folder} was made with a different config ({', '.join(keys[:6])} differ); "
                             f"resume with the same config or pass --force to start over")
        try:
            tensors = load_file(str(folder / "trainable.safetensors"))
            opt_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
            rank_state = torch.load(folder / f"rank-{dist.rank()}.pt", map_location="cpu", weights_only=True)
        except Exception as err:  # damaged files: name them, never resume from half a state
            raise StageError(f"checkpoint {folder} cannot be read ({str(err).splitlines()[0]}); delete it to "
                             f"resume from an older one, or pass --force to start over") from None
        n = len(self.trainable.params)
        if any(f"param.{i}" not in tensors for i in range(n)) or f"param.{n}" in tensors:
            raise StageError(f"checkpoint {folder} holds a different set of trainable parameters than "
                             f"{self.stage}.trainable={self.tcfg.trainable} on this model")
        with torch.no_grad():
            for i, p in enumerate(self.trainable.params):
                if tensors[f"param.{i}"].shape != p.shape:
                    raise StageError(f"checkpoint {folder}: parameter {i} has shape "
                                     f"{tuple(tensors[f'param.{i}'].shape)}, the model {tuple(p.shape)}")
                p.copy_(tensors[f"param.{i}"])
                self.ema.shadow[i].copy_(tensors[f"ema.{i}"])
        self.opt.load_state_dict(opt_state["optimizer"])
        self.lr_sched.load_state_dict(opt_state["lr_scheduler"])
        self.scaler.load_state_dict(opt_state["scaler"])
        self.gen.set_state(rank_state["generator"])
        self.order.load_state_dict(rank_state["order"])
        self.sums = dict(rank_state["sums"])
        for name, bank in self.banks.items():
            bank.load_state_dict({k: v.to(bank.rows.device) for k, v in rank_state["banks"][name].items()})
        self.rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        self.step = state["step"]
        print(f"resumed {self.stage} from {folder} (step {self.step})", flush=True)

    # -- training ----------------------------------------------------------------------------------------
    def run(self, out: Path, ckpt_root: Path) -> dict:
        tcfg = self.tcfg
        log_file = (out / "log.jsonl").open("w") if dist.is_main() else None
        if log_file:  # the log of the steps before a resumed checkpoint
            log_file.writelines(json.dumps(r) + "\n" for r in self.rows)
        t_start, self.mem_seconds = time.perf_counter(), 0.0
        bar = tqdm(range(self.step + 1, tcfg.steps + 1), desc=self.stage, unit="step", dynamic_ncols=True,
                   initial=self.step, total=tcfg.steps, disable=not dist.is_main())
        row: dict = self.rows[-1] if self.rows else {}
        try:
            for step in bar:
                self.step = step
                for k, v in self._step().items():
                    self.sums[k] = self.sums.get(k, 0.0) + v
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    row = self._log_row(step)
                    self.rows.append(row)
                    if log_file:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                    bar.set_postfix(loss=f"{row['diffusion']:.4f}")
                if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < tcfg.steps:
                    self.save(ckpt_root)
        finally:
            if log_file:
                log_file.close()
        seconds = time.perf_counter() - t_start
        return {"steps": tcfg.steps, "seconds": round(seconds, 2), "memory_seconds": round(self.mem_seconds, 3),
                "last_log": row}

    def _log_row(self, step: int) -> dict:
        n = (step - 1) % self.tcfg.log_every + 1
        sums = self.sums
        if dist.enabled():  # the mean over ranks; and a check that the ranks still hold the same weights
            every = dist.all_gather_object(sums)
            sums = {k: sum(s[k] for s in every) / len(every) for k in sums}
        row = {"step": step, **{k: v / n for k, v in sums.items()}, "lr": self.lr_sched.get_last_lr()[0]}
        if self.banks:
            row.update(real_bank_similarity=self.banks["real"].mean_similarity(),
                       gen_bank_similarity=self.banks["gen"].mean_similarity())
        if dist.enabled():
            checksums = dist.all_gather_object(float(sum(p.detach().double().sum() for p in self.trainable.params)))
            row["rank_checksums"] = checksums
            if len(set(checksums)) > 1:
                raise StageError(f"{self.stage}: the ranks' weights differ at step {step} ({checksums})")
        self.sums = {}
        return row

    def _step(self) -> dict[str, float]:
        cfg, tcfg, mem, banks, device = self.cfg, self.tcfg, self.tcfg.memory, self.banks, self.device
        gen, schedule, c = self.gen, self.schedule, self.latent[0]
        idx = next(self.order)
        z0 = self.source.sample(idx, gen, device)  # [B, C, H, W]
        y = self.source.labels[idx]  # [B] dataset-local class ids
        t = torch.randint(0, schedule.num_steps, (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        y_model = drop_labels(self.cond[y], null_class(self.model), cfg.model.class_dropout, gen).to(device)
        t, y_dev = t.to(device), y.to(device)
        zt = schedule.q_sample(z0, t, noise)
        with autocast(device, cfg.precision):
            out_model = self.net(zt, t, y_model, return_dict=False)[0]  # [B, C or 2C, H, W]
        eps = eps_prediction(out_model.float(), c)
        loss_diff = F.mse_loss(eps, noise)
        loss, parts = loss_diff, {"diffusion": loss_diff.item()}
        if learns_sigma(self.model):  # hybrid loss: the bound trains the variance channels only (ε̂ detached)
            loss_vb = schedule.vb_bits(z0, zt, t, eps.detach(), out_model[:, c:].float()).mean()
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
            parts.update(representativeness=reps.mean().item(), diversity=divs.mean().item(), memory=loss_mem.item())
            self.mem_seconds += time.perf_counter() - tm
        if dist.any_rank(not torch.isfinite(loss).item(), device):
            last = _valid_checkpoints(checkpoint_root(cfg, self.stage))
            keep = f"; the last good checkpoint is {last[0]} (--resume)" if last else ""
            raise StageError(f"{self.stage}: the loss is not finite at step {self.step} ({float(loss)} on rank "
                             f"{dist.rank()}); lower {self.stage}.lr or check the data{keep}")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tcfg.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.trainable.params, tcfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        self.ema.update()
        if banks:
            tm = time.perf_counter()
            banks["real"].push(z0.flatten(1), y_dev)
            if mem.push_max_t is None:
                banks["gen"].push(x0_hat.detach(), y_dev)
            else:
                keep = t <= mem.push_max_t
                banks["gen"].push(x0_hat.detach()[keep], y_dev[keep])
            self.mem_seconds += time.perf_counter() - tm
        return parts


def _torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
