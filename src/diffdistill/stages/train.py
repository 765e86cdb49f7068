"""The one training loop, shared by `pretrain` (from scratch) and `finetune` (memory losses, DiffFit).

Per step: z0 = s·encode(x) (or from the latent cache); t ~ U{0..T-1}; z_t = q(z0, t, ε);
ε̂ = DiT(z_t, t, y with label dropout); L = MSE(ε̂, ε) [+ the variational bound for learned-sigma models]
+ Σ_c a_c(x̂0); then the real memory takes z0 and the generated memory takes x̂0 (detached).
All randomness of a process comes from one CPU generator seeded from (seed, stage[, rank]) — under torchrun
the data order from a second one seeded alike on every rank; on a GPU timesteps and noise from a generator
there — so a run is reproducible and a checkpoint can restore it exactly (checkpoint.py). Between two log
steps nothing is read back from the device: loss parts, the non-finite check and the memories stay there
(precision=fp16 excepted: its loss scaler reads its overflow check every step; fp32 and bf16 need none).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from diffdistill import distributed as dist
from diffdistill.checkpoint import (
    Checkpoint,
    load_checkpoint,
    remove_checkpoints,
    resume_spec,
    save_checkpoint,
    valid_checkpoints,
)
from diffdistill.config import Config, TrainConfig
from diffdistill.data.classes import condition_ids
from diffdistill.diffusion import NoiseSchedule
from diffdistill.errors import StageError
from diffdistill.files import check_output_free, staged_dir
from diffdistill.latents import BatchOrder, latent_source
from diffdistill.losses import memory_loss_dense
from diffdistill.memory import MemoryBank
from diffdistill.metrics import goal_number
from diffdistill.models.adapters import EMA, Trainable, make_trainable
from diffdistill.models.dit import (
    build_dit,
    check_compatible,
    drop_labels,
    eps_prediction,
    learns_sigma,
    load_dit,
    null_class,
    save_dit,
)
from diffdistill.progress import progress
from diffdistill.runs import checkpoint_root, model_source, stage_dir
from diffdistill.runtime import (
    AUTOCAST_DTYPES,
    CastOnce,
    DeviceTimer,
    autocast,
    compiled,
    derive_seed,
    setup,
    to_device,
    write_run_info,
)


class Probe(Protocol):
    """What pretraining asks where it may go on (pretrain.max_steps): a model's fidelity (%) and its goal;
    stages.check.FidelityProbe, handed in by api.py (training does not import the check stage)."""

    goal: float

    def __call__(self, model) -> float: ...

    def keep(self, folder: Path) -> None:
        """Save what the stage after pretraining can reuse (the check's classifier) into the stage's folder."""


def train_stage(cfg: Config, stage: str, force: bool = False, resume: bool = False,
                probe: Probe | None = None) -> Path:
    """Run `pretrain` or `finetune` per the config; returns the stage's output folder. Under torchrun every
    rank trains (DDP) and rank 0 writes the outputs. `probe` scores the EMA model where training may go on past
    `steps` (pretrain.max_steps); every rank calls it and all follow rank 0's answer."""
    tcfg: TrainConfig = getattr(cfg, stage)
    final = stage_dir(cfg.run_dir, stage)
    device = dist.init(setup(cfg))
    world = dist.world_size()
    if tcfg.steps <= 0:
        raise StageError(f"{stage}.steps is {tcfg.steps}: nothing to train")
    if tcfg.batch_size % world:
        raise StageError(f"{stage}.batch_size {tcfg.batch_size} is not divisible by the {world} processes; "
                         f"the global batch is split evenly")
    ckpt_root = checkpoint_root(cfg.run_dir, stage)
    found = valid_checkpoints(ckpt_root)
    if resume and final.exists() and not found:
        raise StageError(f"{final} is complete and has no checkpoint to resume; pass --force to train it again")
    if found and not (resume or force):
        raise StageError(f"{ckpt_root} holds checkpoints of an unfinished {stage} (newest: {found[0].name}); "
                         f"pass --resume to continue it or --force to start over")
    if force and not resume:
        dist.barrier()
        remove_checkpoints(ckpt_root)
        found = []
    init = model_source(cfg.run_dir, tcfg.init) if tcfg.init else None
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
            loop.load(found[0])
        try:
            summary = loop.run(out, ckpt_root, probe)
        finally:
            source.close()  # the latent cache's reader thread
        if dist.is_main():
            save_dit(out / "raw", model, trainable.folded_state_dict(model))
            save_dit(out / "ema", model, trainable.folded_state_dict(model, loop.ema.shadow))
            if probe is not None:
                probe.keep(out)
        _save_banks(loop.banks, out)
        if dist.is_main():
            write_run_info(out, cfg, stage, {
                "init": init, "classes": source.classes, "condition_ids": cond, "latent_shape": list(latent),
                **source.describe(), "num_train_images": len(source), "learned_sigma": learns_sigma(model),
                "trainable_parameters": sum(p.numel() for p in trainable.params), "world_size": world,
                "per_rank_batch_size": tcfg.batch_size // world, **summary,
            })
        dist.barrier()  # every rank's files are in place before rank 0 renames the folder
    dist.barrier()
    remove_checkpoints(ckpt_root)
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


def most_per_class(labels: Tensor) -> int | None:
    """The most rows any one class has in a batch's labels, read on the host (None for labels on a device).
    The labels come from the data order, which is drawn on the host, so this reads nothing back from a GPU;
    each memory push then makes room for that many new rows per class instead of one per row of the batch, and
    the adaptive rule runs that many pruning rounds."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return None
    return int(torch.bincount(labels).max())


@dataclass
class Batch:
    """One step's draws: clean latents, their classes, timesteps, noise and the DiT's inputs."""

    z0: Tensor  # [B, C, H, W] clean latents
    labels: Tensor  # [B] dataset-local class ids (memories are per class)
    t: Tensor  # [B] timesteps
    noise: Tensor  # [B, C, H, W] ε
    zt: Tensor  # [B, C, H, W] z_t = q(z0, t, ε)
    model_labels: Tensor  # [B] the DiT's condition ids after label dropout
    most: int | None = None  # the most rows of one class in the batch, counted on the host (memory pushes)


class TrainLoop:
    """Everything a step changes — weights, EMA, optimizer, lr schedule, loss scale, memories, the
    generator and data order of this rank, running log sums — so that a checkpoint can restore it exactly."""

    def __init__(self, cfg: Config, stage: str, model, trainable: Trainable, source, latent: tuple[int, int, int],
                 cond: Tensor, device: torch.device) -> None:
        self.cfg, self.stage, self.tcfg = cfg, stage, getattr(cfg, stage)
        self.model, self.trainable, self.source, self.latent = model, trainable, source, latent
        self.cond, self.device = cond, device
        tcfg, mem = self.tcfg, self.tcfg.memory
        self.schedule = NoiseSchedule.from_config(cfg.diffusion).to(device)
        rank_part = ("rank", dist.rank()) if dist.enabled() else ()
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, stage, *rank_part))
        # timesteps and noise: drawn where they are used. On the CPU that is the run's generator itself (the
        # draws of every earlier version); on a GPU a generator there, so nothing crosses from the host
        self.device_generator = self.generator if device.type == "cpu" else torch.Generator(device).manual_seed(
            derive_seed(cfg.seed, stage, *rank_part, "device"))
        # fused: one kernel for all parameters on CUDA (the same update; CPU keeps the reference loop)
        self.opt = torch.optim.AdamW(trainable.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                     fused=device.type == "cuda" or None)
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
            if cfg.compile:  # each push one graph (a CUDA graph with reduce-overhead), as the loss terms below
                bank.compile(cfg.compile_mode)
        self.memory_loss = torch.compile(memory_loss_dense, mode=cfg.compile_mode, dynamic=False) \
            if cfg.compile and self.banks else memory_loss_dense
        if dist.enabled():  # ranks share one permutation per epoch and take disjoint slices of it
            order_generator = torch.Generator().manual_seed(derive_seed(cfg.seed, stage, "order"))
            self.order = BatchOrder(len(source), tcfg.batch_size, order_generator, dist.rank(),
                                    dist.world_size(), owns_generator=True)
        else:  # one process: the order is drawn from the run's generator (the order of every earlier version)
            self.order = BatchOrder(len(source), tcfg.batch_size, self.generator)
        # running log sums stay on the device (float64) and are read at log steps only: no host sync per step;
        # window: the steps they hold
        self.step, self.sums, self.window, self.log_rows = 0, {}, 0, []
        # where training stops now: `steps`, moved on by pretrain.max_steps while the checks on the way are low
        self.target, self.checks = self.tcfg.steps, []
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
        self.bad_loss = torch.zeros((), device=device)
        self.mem_timer = DeviceTimer(device)  # the memory work (loss terms and pushes)
        if dist.enabled():
            ids = [device.index] if device.type == "cuda" else None
            self.net = compiled(torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), cfg)
        elif cfg.compile or cfg.precision == "fp32":  # torch.compile fuses autocast's casts itself
            self.net = compiled(model, cfg)
        else:
            self.net = CastOnce(model, AUTOCAST_DTYPES[cfg.precision])

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self, root: Path) -> None:
        """A resumable checkpoint of this step under `root` (see checkpoint.py). Every rank calls it."""
        tensors, optimizer = {}, {}
        if dist.is_main():  # the shared part: only rank 0 writes it, so only rank 0 copies it to the host
            tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.trainable.params)}
            tensors.update({f"ema.{i}": v.cpu().contiguous() for i, v in enumerate(self.ema.shadow)})
            optimizer = {"optimizer": self.opt.state_dict(), "lr_scheduler": self.lr_sched.state_dict(),
                         "scaler": self.scaler.state_dict()}
        sums = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.sums.items()}
        rank_state = {"generator": self.generator.get_state(), "device_generator": self.device_generator.get_state(),
                      "order": self.order.state_dict(), "sums": sums, "window": self.window,
                      "extension": {"target": self.target, "checks": self.checks},
                      "banks": {k: {n: v.cpu() for n, v in b.state_dict().items()} for k, b in self.banks.items()}}
        save_checkpoint(root, Checkpoint(self.step, tensors, optimizer, rank_state, self.log_rows),
                        self._spec(), self.tcfg.keep_checkpoints)

    def _spec(self) -> dict:
        """What a checkpoint must match; the device type too: a GPU draws timesteps and noise from a generator
        of its own, whose state a CPU checkpoint does not hold."""
        return {**resume_spec(self.cfg, self.stage), "device": self.device.type}

    def load(self, folder: Path) -> None:
        ckpt = load_checkpoint(folder, self._spec())
        n = len(self.trainable.params)
        if any(f"param.{i}" not in ckpt.tensors for i in range(n)) or f"param.{n}" in ckpt.tensors:
            raise StageError(f"checkpoint {folder} holds a different set of trainable parameters than "
                             f"{self.stage}.trainable={self.tcfg.trainable} on this model")
        with torch.no_grad():
            for i, p in enumerate(self.trainable.params):
                saved = ckpt.tensors[f"param.{i}"]
                if saved.shape != p.shape:
                    raise StageError(f"checkpoint {folder}: parameter {i} has shape {tuple(saved.shape)}, "
                                     f"the model {tuple(p.shape)}")
                p.copy_(saved)
                self.ema.shadow[i].copy_(ckpt.tensors[f"ema.{i}"])
        self.opt.load_state_dict(ckpt.optimizer["optimizer"])
        self.lr_sched.load_state_dict(ckpt.optimizer["lr_scheduler"])
        self.scaler.load_state_dict(ckpt.optimizer["scaler"])
        self.generator.set_state(ckpt.rank["generator"])
        if self.device_generator is not self.generator:  # on a CPU they are one generator (the spec holds the device)
            self.device_generator.set_state(ckpt.rank["device_generator"])
        self.order.load_state_dict(ckpt.rank["order"])
        self.sums = {k: torch.as_tensor(v, dtype=torch.float64, device=self.device)
                     for k, v in ckpt.rank["sums"].items()}
        for name, bank in self.banks.items():
            bank.load_state_dict({k: v.to(bank.rows.device) for k, v in ckpt.rank["banks"][name].items()})
        self.log_rows, self.step = ckpt.log, ckpt.step
        # checkpoints from before these were kept: a window from the last multiple of log_every, no checks yet
        self.window = ckpt.rank.get("window", (self.step - 1) % self.tcfg.log_every + 1 if self.sums else 0)
        # a round's end as saved, within this run's max_steps (a run resumed with a lower one stops sooner)
        extension = ckpt.rank.get("extension", {"target": self.tcfg.steps, "checks": []})
        most = max(self.tcfg.max_steps, self.tcfg.steps)
        self.target, self.checks = max(self.step, self.tcfg.steps, min(extension["target"], most)), extension["checks"]
        print(f"resumed {self.stage} from {folder} (step {self.step})", flush=True)

    # -- training ----------------------------------------------------------------------------------------
    def run(self, out: Path, ckpt_root: Path, probe: Probe | None = None) -> dict:
        """Train to `steps`; where pretrain.max_steps allows, go on in rounds of steps / 2 while the generator
        check on the way (`probe`) is below its goal."""
        log_file = (out / "log.jsonl").open("w") if dist.is_main() else None
        if log_file:  # the log of the steps before a resumed checkpoint
            log_file.writelines(json.dumps(r) + "\n" for r in self.log_rows)
        t_start = self.t_log = time.perf_counter()  # this session's share
        self.timed_steps = 0  # steps since t_log (after a resume, fewer than the log row's mean covers)
        self.check_seconds = 0.0  # this session's checks on the way
        row: dict = self.log_rows[-1] if self.log_rows else {}
        try:
            row = self._train_to(self.target, ckpt_root, log_file, row)
            while self._go_on(probe, ckpt_root):
                row = self._train_to(self.target, ckpt_root, log_file, row)
            if self.window:  # the last step's row, as a run of exactly these steps writes it
                row = self._write_row(self.step, log_file)
        finally:
            if log_file:
                log_file.close()
        seconds = time.perf_counter() - t_start
        memory = self.mem_timer.seconds()  # device time of the memory work (CUDA events on a GPU)
        went_on = {}
        if probe is not None and self.tcfg.max_steps:  # a resumed session may make no check: the last one's goal
            goal = self.checks[-1].get("goal", probe.goal) if self.checks else probe.goal
            went_on = {"extension": {"max_steps": self.tcfg.max_steps, "goal": goal, "checks": self.checks}}
        training = seconds - self.check_seconds  # the share of the steps' time, not of the checks'
        return {"steps": self.step, "seconds": round(seconds, 2), "memory_seconds": round(memory, 3),
                "memory_share_percent": round(100 * memory / max(training, 1e-9), 2), "last_log": row, **went_on}

    def _train_to(self, target: int, ckpt_root: Path, log_file, row: dict) -> dict:
        """Steps up to `target`, a log row at every multiple of log_every (the stage's last step gets one in
        `run`, so that a round's end writes no extra row); returns the last log row."""
        tcfg = self.tcfg
        bar = progress(range(self.step + 1, target + 1), desc=self.stage, unit="step",
                       initial=self.step, total=target, disable=not dist.is_main())
        for step in bar:
            self.step = step
            for k, v in self.train_step().items():
                self.sums[k] = self.sums.get(k, 0.0) + v.detach().double()
            self.window += 1
            self.timed_steps += 1
            log_now = step % tcfg.log_every == 0
            save_now = bool(tcfg.checkpoint_every) and step % tcfg.checkpoint_every == 0 and step < target
            if log_now or save_now or step == target:  # the only host reads: before a row, checkpoint or check
                self._check_finite()
            if log_now:
                row = self._write_row(step, log_file)
                bar.set_postfix(loss=f"{row['diffusion']:.4f}")
            if save_now:
                self.save(ckpt_root)
        return row

    def _write_row(self, step: int, log_file) -> dict:
        row = self._log_row(step)
        self.log_rows.append(row)
        if log_file:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        return row

    def _go_on(self, probe: Probe | None, ckpt_root: Path) -> bool:
        """At the end of a round: check the EMA model and, below the goal, set the next round's end (and save the
        checkpoint a run of that many steps saves here, so a resumption does not check again). Every rank checks
        (none waits for hours in a collective while one trains the classifier); rank 0's answer counts. The last
        round ends at max_steps unchecked: the generator check after the stage scores that model."""
        most = self.tcfg.max_steps
        if probe is None or not most or self.step >= most:
            return False
        t0 = time.perf_counter()
        ema = self._ema_model()
        fidelity = probe(ema)
        fidelity, goal = dist.broadcast_object((fidelity, probe.goal))  # the goal is set by the first call
        del ema
        took = time.perf_counter() - t0
        self.checks.append({"step": self.step, "fidelity": fidelity, "goal": goal, "seconds": round(took, 1)})
        self.check_seconds += took
        self.t_log += took  # the check's time is not the steps' (ms_per_step of the next row)
        shown = goal_number(goal)
        if fidelity >= goal:
            say = f"reaches the {shown} % goal: pretraining stops here"
        else:
            self.target = min(most, self.step + max(1, self.tcfg.steps // 2))
            say = f"below the {shown} % goal: pretraining goes on to step {self.target} (max_steps {most})"
        if dist.is_main():
            print(f"{self.stage}: generator check at step {self.step}: {fidelity:.1f} % {say}", flush=True)
        every = self.tcfg.checkpoint_every
        if fidelity < goal and every and self.step % every == 0:
            self.save(ckpt_root)
        return fidelity < goal

    def _ema_model(self):
        """A copy of the model holding the EMA weights, for sampling (the training model is left as it is)."""
        ema = copy.deepcopy(self.model)
        ema.load_state_dict(self.trainable.folded_state_dict(self.model, self.ema.shadow))
        return ema.eval()

    def _log_row(self, step: int) -> dict:
        n = max(self.window, 1)
        sums = {k: float(v) for k, v in self.sums.items()}
        now, k = time.perf_counter(), max(self.timed_steps, 1)
        speed = {"ms_per_step": round(1000 * (now - self.t_log) / k, 2),
                 "images_per_s": round(k * self.tcfg.batch_size / max(now - self.t_log, 1e-9), 1)}
        self.t_log, self.timed_steps = now, 0
        self.mem_timer.seconds()  # folds the recorded events in (this is a sync point anyway)
        if dist.enabled():  # the mean over ranks; and a check that the ranks still hold the same weights
            every = dist.all_gather_object(sums)
            sums = {k: sum(s[k] for s in every) / len(every) for k in sums}
        row = {"step": step, **{k: v / n for k, v in sums.items()}, "lr": self.lr_sched.get_last_lr()[0], **speed}
        if self.banks:
            row.update(real_bank_similarity=self.banks["real"].mean_similarity(),
                       gen_bank_similarity=self.banks["gen"].mean_similarity())
        if dist.enabled():
            checksums = dist.all_gather_object(float(sum(p.detach().double().sum() for p in self.trainable.params)))
            row["rank_checksums"] = checksums
            if len(set(checksums)) > 1:
                raise StageError(f"{self.stage}: the ranks' weights differ at step {step} ({checksums})")
        self.sums, self.window = {}, 0
        return row

    def train_step(self) -> dict[str, Tensor]:
        """One optimizer step: draw a batch, compute the losses, update, then push into the memories."""
        batch = self.draw()
        loss, parts, x0_hat = self.losses(batch)
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)  # remembered on the device, read later
        self.first_bad = torch.where(bad, self.step, self.first_bad)
        self.bad_loss = torch.where(bad, loss.detach().float(), self.bad_loss)
        self._update(loss)
        if self.banks:
            self._remember(batch, x0_hat)
        return parts

    def _check_finite(self) -> None:
        """Stop, naming the first step whose loss was not finite and the last good checkpoint (checked before
        every log row and checkpoint, so no checkpoint holds weights updated by a non-finite loss)."""
        first = int(self.first_bad)
        if not dist.any_rank(first >= 0, self.device):
            return
        last = valid_checkpoints(checkpoint_root(self.cfg.run_dir, self.stage))
        keep = f"; the last good checkpoint is {last[0]} (--resume)" if last else ""
        where = f"step {first} ({float(self.bad_loss)} on rank {dist.rank()})" if first >= 0 else "another rank"
        raise StageError(f"{self.stage}: the loss is not finite at {where}; lower {self.stage}.lr or check the "
                         f"data{keep}")

    def draw(self) -> Batch:
        """The step's random draws in a fixed order: data order, mirrors and label dropout from this rank's
        generator (CPU); the latent's ε, timesteps and noise from the device generator (the same one on a CPU).
        Host tensors reach the device by asynchronous copies: the host never waits for the GPU here."""
        generator, device, drawn = self.generator, self.device, self.device_generator
        idx = next(self.order)
        z0 = self.source.sample(idx, generator, device, drawn, upcoming=self.order.peek())  # [B, C, H, W]
        labels = self.source.labels[idx]  # [B] host data, like the data order
        most = most_per_class(labels) if self.tcfg.memory.policy != "none" else None  # sizes the memory pushes
        t = torch.randint(0, self.schedule.num_steps, (len(idx),), generator=drawn, device=drawn.device)
        noise = torch.randn(z0.shape, generator=drawn, device=drawn.device)
        model_labels = drop_labels(self.cond[labels], null_class(self.model), self.cfg.model.class_dropout,
                                   generator)
        t, noise = t.to(device), noise.to(device)  # no-ops: drawn there
        return Batch(z0, to_device(labels, device), t, noise, self.schedule.q_sample(z0, t, noise),
                     to_device(model_labels, device), most)

    def losses(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """(total loss, its parts for the log, x̂0 [B, D] when there are memories)."""
        channels, schedule, mem = self.latent[0], self.schedule, self.tcfg.memory
        with autocast(self.device, self.cfg.precision):
            out = self.net(batch.zt, batch.t, batch.model_labels, return_dict=False)[0]  # [B, C or 2C, H, W]
        eps = eps_prediction(out.float(), channels)
        loss_diff = F.mse_loss(eps, batch.noise)
        loss, parts = loss_diff, {"diffusion": loss_diff}
        if learns_sigma(self.model):  # hybrid loss: the bound trains the variance channels only (ε̂ detached)
            loss_vb = schedule.vb_bits(batch.z0, batch.zt, batch.t, eps.detach(), out[:, channels:].float()).mean()
            loss = loss + loss_vb
            parts["vb"] = loss_vb
        if not self.banks:
            return loss, parts, None
        timing = self.mem_timer.start()
        x0_hat = schedule.x0_from_eps(batch.zt, batch.t, eps).flatten(1)  # [B, D], gradient flows through ε̂
        real, generated = self.banks["real"], self.banks["gen"]
        loss_mem, reps, divs = self.memory_loss(x0_hat, batch.labels, real.rows, real.counts, generated.rows,
                                                generated.counts, mem.lambda_real, mem.lambda_gen,
                                                mem.loss_accumulation)
        parts.update(representativeness=reps, diversity=divs, memory=loss_mem)
        self.mem_timer.stop(timing)
        return loss + loss_mem, parts, x0_hat

    def _update(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tcfg.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.trainable.params, self.tcfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        self.ema.update()

    def _remember(self, batch: Batch, x0_hat: Tensor) -> None:
        """The real memory takes z0; the generated memory takes x̂0 (only from t <= push_max_t if set)."""
        timing = self.mem_timer.start()
        push_max_t = self.tcfg.memory.push_max_t
        self.banks["real"].push(batch.z0.flatten(1), batch.labels, most=batch.most)
        accept = None if push_max_t is None else batch.t <= push_max_t  # a mask, not a gather: no sync
        self.banks["gen"].push(x0_hat.detach(), batch.labels, accept, most=batch.most)
        self.mem_timer.stop(timing)
