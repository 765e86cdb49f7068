"""The evaluation protocol: train a small classifier from scratch on a set, score it on real val images.

For each IPC: the distilled set (first IPC images per class of the sampled set) and a seeded random-real
subset (IPC real images per class) are trained under the identical recipe, over `evaluate.seeds` seeds;
optionally the full real train set too. Final-epoch accuracy is the headline; the best-epoch accuracy is
kept beside it and labelled as selected on the validation set. Fidelity = share of the distilled images
that the full-data classifiers assign to their intended class.

Each (net, set, IPC, seed) job is saved under <run>/evaluate-jobs/ as it finishes, keyed by everything
that determines its result, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from diffdistill import distributed as dist
from diffdistill.augment import color_jitter, cutmix, lighting, random_resized_crop
from diffdistill.config import Config, EvalConfig, build_config, epochs_for_ipc, to_dict
from diffdistill.data.datasets import (
    ImageFiles,
    ImageSet,
    data_classes,
    list_images,
    list_train,
    list_val,
    load_data,
    peek_channels,
    read_images,
)
from diffdistill.data.pixels import (
    Pixels,
    batches,
    channel_stats,
    eval_batch,
    pixel_sha256,
    place,
    read_or_list,
    read_whole,
    resident_budget,
    to_unit,
)
from diffdistill.errors import StageError
from diffdistill.files import atomic_write_bytes, atomic_write_json, check_output_free, staged_dir
from diffdistill.losses import soft_label_loss, soft_targets
from diffdistill.metrics import dd_ranking, diversity, per_class_metrics
from diffdistill.models.classifiers import DEFAULT_NORM, build_classifier
from diffdistill.plots import EXAMPLE_CLASSES, EXAMPLES_PER_CLASS
from diffdistill.progress import progress
from diffdistill.runs import REAL_EXAMPLES, evaluate_jobs, stage_dir
from diffdistill.runtime import autocast, derive_seed, resolve_device, setup, write_run_info
from diffdistill.teachers import IMAGENET_MEAN, IMAGENET_STD, Teacher, check_teacher, load_teacher, renormalize

BEST_LABEL = "best epoch, selected on the validation set (optimistic)"
# part of every job record's key: bump when the protocol's arithmetic changes, so old records are not reused
# (2: sets held as uint8 at the classifier size, resized sets rounded to uint8; 3: baselines keyed without the
# distilled set, every full-data net's weights kept, fidelity scored from them; 4: statistics of large samples
# by shard, scoring batches by pixel count, torch threads per job in the key)
RECIPE_VERSION = 4
# the jobs each label protocol trains (a soft job's teacher labels every batch; see train_classifier)
KINDS = {"hard": ("distilled", "random_real"), "soft": ("distilled_soft", "random_real_soft")}
BASELINES = ("random_real", "random_real_soft", "full")  # jobs that do not depend on the distilled set: shareable
# without the full-data baseline the train set is only listed; its normalization statistics come from a sample
NORM_IMAGES_PER_CLASS = 10


def lr_milestones(epochs: int) -> list[int]:
    """lr × 0.2 at 2/3 and 5/6 of the epochs."""
    return [epochs * 2 // 3, epochs * 5 // 6]


@dataclass
class TrainResult:
    final: float  # val accuracy (%) after the last epoch
    best: float  # max over evaluated epochs (selected on val)
    best_epoch: int
    curve: list[tuple[int, float]]
    model: torch.nn.Module


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Pixels, y: Tensor, norm: tuple[Tensor, Tensor]) -> float:
    """Top-1 (%) of `model` on uint8 images x, normalized batch by batch (sets stay uint8 on the device)."""
    model.eval()
    order = torch.arange(len(y)).split(eval_batch(x.shape[-1]))
    correct = sum(int((model((to_unit(xb) - norm[0]) / norm[1]).argmax(1) == y[idx.to(y.device)]).sum())
                  for idx, xb in zip(order, batches(x, order)))
    return 100.0 * correct / max(len(y), 1)


def rded_cosine(epochs: int) -> Callable[[int], float]:
    """RDED's learning-rate factor per epoch: ½ (1 + cos(π e / (2 E))), from 1 down to ½ at the last epoch."""
    return lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs / 2)) if e <= epochs else 0.0


def train_classifier(net: str, x: Pixels, y: Tensor, x_val: Pixels, y_val: Tensor, norm: tuple[Tensor, Tensor],
                     num_classes: int, epochs: int, seed: int, ecfg: EvalConfig, flip: bool,
                     teacher: torch.nn.Module | None = None) -> TrainResult:
    """Hard labels: SGD + momentum, lr × 0.2 at 2/3 and 5/6 of the epochs, cross-entropy (CutMix mixes the two
    labels' losses). Soft labels (`teacher` given): AdamW with RDED's cosine factor, and the teacher labels the
    very batch the student sees (after crop, flip, jitter and CutMix): KL at `evaluate.soft.temperature`.
    x and x_val: uint8 images at the classifier's size, on the device or streamed (data/pixels.py); `norm` =
    (mean, std) applied to each (augmented) batch."""
    torch.manual_seed(seed)
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    model = build_classifier(net, x.shape[1], num_classes, x.shape[-1], ecfg.width, ecfg.norm).to(x.device)
    layout = torch.channels_last if x.device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=layout)
    if teacher is None:
        opt = torch.optim.SGD(model.parameters(), lr=ecfg.lr, momentum=ecfg.momentum,
                              weight_decay=ecfg.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, lr_milestones(epochs), gamma=0.2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=ecfg.soft.lr, betas=(0.9, 0.999),
                                weight_decay=ecfg.soft.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rded_cosine(epochs))
        teacher = teacher.to(memory_format=layout)
    crop = ecfg.crop_scale != (1.0, 1.0) or flip
    curve = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=generator).split(ecfg.batch_size)
        for idx, xb in zip(order, batches(x, order)):
            xb, yb = to_unit(xb), y[idx]
            if crop:
                xb = random_resized_crop(xb, ecfg.crop_scale, flip, generator)
            if ecfg.color_jitter > 0:
                xb = color_jitter(xb, ecfg.color_jitter, generator)
            if ecfg.lighting > 0:
                xb = lighting(xb, ecfg.lighting, generator)
            xb = (xb - norm[0]).div_(norm[1])
            mixed = ecfg.cutmix_prob > 0 and rng.random() < ecfg.cutmix_prob
            if mixed:
                xb, perm, lam = cutmix(xb, ecfg.cutmix_beta, generator, rng)
            xb = xb.contiguous(memory_format=layout)
            with autocast(x.device, ecfg.precision):
                out = model(xb).float()
                labels = None if teacher is None else soft_targets(teacher(xb), ecfg.soft.temperature)
            if labels is not None:
                loss = soft_label_loss(out, labels, ecfg.soft.temperature)
            elif mixed:
                loss = lam * F.cross_entropy(out, yb) + (1 - lam) * F.cross_entropy(out, yb[perm])
            else:
                loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if epoch % ecfg.eval_every == 0 or epoch == epochs:
            curve.append((epoch, accuracy(model, x_val, y_val, norm)))
    best_epoch, best = max(curve, key=lambda p: p[1])
    return TrainResult(curve[-1][1], best, best_epoch, curve, model)


def per_class_indices(labels: Tensor, names: list[str], ipc: int, generator: torch.Generator | None,
                      where: str) -> Tensor:
    """`ipc` indices per class, classes in order: the first ones (generator None) or a seeded random draw."""
    picks = []
    for c, name in enumerate(names):
        pool = (labels == c).nonzero().squeeze(1)
        if len(pool) < ipc:
            raise StageError(f"{where}: class {name} has {len(pool)} images, IPC {ipc} needs at least {ipc}")
        picks.append(pool[:ipc] if generator is None
                     else pool[torch.randperm(len(pool), generator=generator)[:ipc]].sort().values)
    return torch.cat(picks)


def summarize(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "runs": [round(v, 2) for v in values]}


def _result(records: list[dict]) -> dict:
    out = summarize([r["final"] for r in records])
    out["best_epoch"] = {**summarize([r["best"] for r in records]), "label": BEST_LABEL}
    out["epochs"] = records[0]["epochs"]
    out["curves"] = [r["curve"] for r in records]
    return out


def on_device(s: ImageSet | ImageFiles, size: int, device: torch.device,
              budget: int = sys.maxsize) -> tuple[Pixels, Tensor]:
    """Pixels at the classifier size (on the device within `budget` bytes, else streamed; see data/pixels.py) and
    the labels on the device."""
    return place(s, size, device, budget), s.labels.to(device)


Job = tuple[str, str, "int | None", int]  # (net, kind: distilled | random_real | full, IPC, seed index)


@dataclass
class Plan:
    """What every classifier job of one evaluation shares: the sets, their normalization and the job list."""

    cfg: Config
    names: list[str]  # class names, in label order
    train: ImageSet | ImageFiles  # the real train set (listed only when no full-data job needs it)
    val: ImageSet | ImageFiles  # listed when larger than `budget` (ImageNet-1K)
    syn: ImageSet | ImageFiles  # the distilled set, likewise
    syn_dir: Path
    stats_from: str  # which real images gave the normalization statistics
    size: int  # classifier input size (px)
    norm: tuple[Tensor, Tensor]  # per-channel (mean, std) [1, C, 1, 1] on the device
    device: torch.device
    budget: int  # bytes a set may take on the device at the classifier size (evaluate.resident_gb); else streamed
    ipcs: list[int]
    jobs: list[Job]
    key_parts: dict  # everything besides the job itself that determines a job's result
    baselines_dir: Path  # where random-real and full-data records live (shared by `compare`'s methods)
    teacher_file: tuple[torch.nn.Module, list[int] | None, str] | None = None  # evaluate.soft.teacher, loaded

    def prepare(self, s: ImageSet | ImageFiles) -> tuple[Pixels, Tensor]:
        return on_device(s, self.size, self.device, self.budget)

    def job_file(self, job: Job) -> Path:
        net, kind, ipc, s = job
        folder = self.baselines_dir if kind in BASELINES else evaluate_jobs(self.cfg.run_dir)
        return folder / f"{net}_{kind}_ipc{ipc}_seed{s}.json"

    def record(self, job: Job) -> dict | None:
        """The saved result of `job` if it was made with everything this plan would use, else None."""
        file = self.job_file(job)
        record = json.loads(file.read_text()) if file.is_file() else None
        if record is None or record.get("key") != self.key(job):
            return None
        if job[1] == "full" and _weights_key(file.with_suffix(".safetensors")) != str(record["key"]):
            return None  # fidelity and the metrics' features come from the weights kept beside the record
        return record

    def key(self, job: Job) -> int:
        parts = {k: v for k, v in self.key_parts.items() if not (job[1] in BASELINES and k == "distilled")}
        if job[1].endswith("_soft"):  # the soft recipe and the teacher's identity (its file, or its record)
            teacher = self.teacher_file[2] if self.teacher_file else self.key((job[0], "full", None, job[3]))
            parts["soft"] = {**to_dict(self.cfg)["evaluate"]["soft"], "teacher": teacher}
        return derive_seed(json.dumps({**parts, "job": list(job)}, sort_keys=True))

    def teacher(self, net: str, s: int) -> Teacher:
        """The teacher of a soft job on `net` with seed index `s`: the file's net, or that job's full-data net."""
        if self.teacher_file is not None:
            model, columns, _ = self.teacher_file
            stats = tuple(torch.tensor(v, device=self.device).view(1, -1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
            return Teacher(model.to(self.device), columns, renormalize(self.norm, stats))
        return Teacher(self.full_model(net, s))

    def full_model(self, net: str, s: int) -> torch.nn.Module:
        """The full-data classifier of (net, seed index s), from its saved weights."""
        model = build_classifier(net, self.val.channels, len(self.names), self.size, self.cfg.evaluate.width,
                                 self.cfg.evaluate.norm)
        model.load_state_dict(load_file(str(self.job_file((net, "full", None, s)).with_suffix(".safetensors"))))
        return model.to(self.device)


def evaluate_stage(cfg: Config, force: bool = False, distilled: str | None = None,
                   baselines: Path | None = None) -> Path:
    """Score the distilled set (default: <run>/samples) -> <run>/evaluate/results.json. Under torchrun the
    classifier jobs are dealt to the ranks round-robin; rank 0 merges their records. `baselines`: a folder
    for the random-real and full-data records that other sets of the same data reuse (default: the run's)."""
    final = stage_dir(cfg.run_dir, "evaluate")
    syn_dir = Path(distilled) if distilled else stage_dir(cfg.run_dir, "sample")
    if not syn_dir.is_dir():
        raise StageError(f"distilled set {syn_dir} does not exist: run `diffdistill sample` first")
    check_output_free(final, force)  # on every rank, before any work
    if cfg.evaluate.workers > 1 and not dist.enabled() and resolve_device(cfg.device).type == "cpu":
        in_workers(cfg, force, distilled, baselines)
        return final
    device = dist.init(setup(cfg))
    t0 = time.perf_counter()
    plan = plan_evaluation(cfg, syn_dir, device, baselines)
    run_jobs(plan)
    dist.barrier()
    if not dist.is_main():
        return final
    records = collect_records(plan)
    results = aggregate(plan, records)
    if cfg.evaluate.full and cfg.evaluate.metrics:
        results["metrics"] = feature_metrics(plan, records)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    with staged_dir(final, force) as out:
        save_real_examples(plan, out)
        atomic_write_json(out / "results.json", results)
        write_run_info(out, cfg, "evaluate", {"data": results["data"]})
    return final


def in_workers(cfg: Config, force: bool, distilled: str | None, baselines: Path | None) -> None:
    """evaluate_stage in `evaluate.workers` local processes on the CPU, each with threads / workers torch threads
    (small classifiers use two threads poorly; two processes train two nets at once). It is the torchrun path
    on one machine (jobs dealt round-robin, gloo), so a job's result is that of one process with the same
    threads. Each worker is a fresh `python -c` process (a user's script is never imported again); a failing
    worker stops the others, and its one-line error is this stage's."""
    n = cfg.evaluate.workers
    threads = max(1, (cfg.threads or torch.get_num_threads()) // n)
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        args = Path(tmp) / "args.json"
        args.write_text(json.dumps({"cfg": to_dict(replace(cfg, threads=threads)), "auto": cfg.auto,
                                    "force": force, "distilled": distilled,
                                    "baselines": None if baselines is None else str(baselines)}))
        env = {**os.environ, "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(args), str(Path(tmp) / f"error-{r}")],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(n)]
        failed: list[int] = []  # ranks in the order their failures were seen
        try:
            while any(proc.poll() is None for proc in procs):
                failed += [r for r, proc in enumerate(procs) if proc.poll() and r not in failed]
                if failed:  # the others would wait for the failed one at a barrier
                    break
                time.sleep(0.2)
        finally:  # done, failed or interrupted: no worker outlives this call
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                proc.wait()
        failed += [r for r, proc in enumerate(procs) if proc.returncode and r not in failed]
        if failed:  # the first error in time: those of workers that lost their peer come after it
            told = [json.loads(f.read_text()) for f in (Path(tmp) / f"error-{r}" for r in failed) if f.is_file()]
            told.sort(key=lambda e: e["time"])
            raise StageError(told[0]["message"] if told else
                             f"evaluate: worker process {failed[0]} ended with exit code {procs[failed[0]].returncode}")


_WORKER = "import sys; from diffdistill.stages.evaluate import worker_main; worker_main(*sys.argv[1:])"


def worker_main(args: str, error_file: str) -> None:
    """One worker of `in_workers` (its rank in the environment): run the stage, or write its error and exit 1."""
    a = json.loads(Path(args).read_text())
    try:
        cfg = replace(build_config(a["cfg"]), auto=tuple(tuple(pair) for pair in a["auto"]))
        evaluate_stage(cfg, a["force"], a["distilled"], None if a["baselines"] is None else Path(a["baselines"]))
    except Exception as err:
        message = str(err) if isinstance(err, StageError) else \
            f"evaluate worker {os.environ.get('RANK')}: {type(err).__name__}: {err}"
        atomic_write_json(Path(error_file), {"time": time.time(), "message": message})
        sys.exit(1)


def plan_evaluation(cfg: Config, syn_dir: Path, device: torch.device, baselines: Path | None = None) -> Plan:
    """Read the sets, fix the normalization and list the jobs; too few images for an IPC fail here, before
    any training."""
    ecfg = cfg.evaluate
    names = data_classes(cfg.data)
    size = ecfg.image_size or cfg.data.image_size
    budget = resident_budget(ecfg.resident_gb, device)
    if cfg.data.train is not None and not ecfg.full:  # only IPC-sized real subsets are needed: list, don't read
        listed = list_val(cfg.data, names, cfg.data.channels or 3)
        if read_whole(listed, size, budget):  # the channels from every image, as load_val decides them
            val: ImageSet | ImageFiles = read_images(listed.files, listed.labels.tolist(), names,
                                                     cfg.data.image_size, cfg.data.channels, listed.root)
        else:  # ImageNet-1K's 50,000: streamed or moved to the device in shards
            val = replace(listed, channels=cfg.data.channels or peek_channels(listed.files))
        train: ImageSet | ImageFiles = list_train(cfg.data, val.channels)
        k = min(NORM_IMAGES_PER_CLASS, int(torch.bincount(train.labels).min()))
        stats = train.select(per_class_indices(train.labels, names, k, torch.Generator().manual_seed(
            derive_seed(cfg.seed, "evaluate", "normalization")), "data.train"))
        stats_from = f"{len(stats)} train images ({k} per class, seeded draw)"
    else:
        train, val = load_data(cfg.data, need_val=True)
        stats, stats_from = train, "the whole train set"
    files, labels = list_images(syn_dir, names, "distilled set")
    syn = read_or_list(ImageFiles(files, torch.tensor(labels, dtype=torch.long), names, syn_dir,
                                  cfg.data.image_size, val.channels), size, budget)
    norm = channel_stats(stats, size, device)  # every set is normalized with the real train set's statistics
    ipcs = sorted(set(ecfg.ipc or cfg.sample.ipc))
    for labels, where in ((syn.labels, "distilled set"), (train.labels, "random-real baseline (real train set)")):
        per_class_indices(labels, names, max(ipcs), None, where)  # too few images: say so before any training
    check_teacher(ecfg)
    teacher_file = None
    if "soft" in ecfg.labels and ecfg.soft.teacher != "full":  # a wrong teacher fails here, before any training
        teacher_file = load_teacher(ecfg.soft.teacher, ecfg.soft.teacher_net, names, val.channels)
    full = [(net, "full", None, s) for net in ecfg.nets for s in range(ecfg.seeds)] if ecfg.full else []
    # full-data jobs first: the soft jobs of a `full` teacher read their weights
    jobs: list[Job] = full + [(net, kind, ipc, s) for protocol in ecfg.labels for net in ecfg.nets
                              for ipc in ipcs for kind in KINDS[protocol] for s in range(ecfg.seeds)]
    # the IPC is part of each job; the label protocol is its kind; a soft job adds the soft recipe (Plan.key)
    # (where the sets live and how many processes train them are not part of it)
    protocol = {k: v for k, v in to_dict(cfg)["evaluate"].items()
                if k not in ("ipc", "labels", "soft", "resident_gb", "workers")}
    key_parts = {"recipe": RECIPE_VERSION, "evaluate": protocol, "hflip": cfg.data.hflip,
                 "seed": cfg.seed, "train": train.sha256(), "normalization": stats_from, "val": pixel_sha256(val),
                 "distilled": pixel_sha256(syn), "torch": torch.__version__,
                 # CPU results depend on the threads a job ran on (sums in another order); not so on a GPU
                 "threads": torch.get_num_threads() if device.type == "cpu" else None}
    return Plan(cfg, names, train, val, syn, syn_dir, stats_from, size, norm, device, budget, ipcs, jobs, key_parts,
                baselines or evaluate_jobs(cfg.run_dir), teacher_file)


def run_jobs(plan: Plan) -> None:
    """Train this rank's jobs that have no valid saved record; save each record as it finishes."""
    mine = [job for n, job in enumerate(plan.jobs) if n % dist.world_size() == dist.rank()]
    val_xy = plan.prepare(plan.val)
    saved = {job for job in plan.jobs if plan.record(job) is not None}  # each record read once
    if saved and dist.is_main():
        folders = " and ".join(sorted({str(plan.job_file(job).parent) for job in saved}))
        print(f"evaluate: {len(saved)} of {len(plan.jobs)} classifier results are reused from {folders}: each was "
              "made with the same data, set, recipe, seed and torch version, so training it again gives the same "
              "numbers; delete the folder to retrain them", flush=True)
    ecfg = plan.cfg.evaluate
    # with full-data teachers: every rank trains its share of the full-data nets, then all wait for all of them
    # (the soft jobs read their weights), then the rest; plan.jobs lists the full-data jobs first
    teachers = "soft" in ecfg.labels and ecfg.soft.teacher == "full"
    phases = [[j for j in mine if j[1] == "full"], [j for j in mine if j[1] != "full"]] if teachers else [mine]
    desc = f"evaluate (process 1 of {dist.world_size()})" if dist.enabled() else "evaluate"
    bar = progress(total=len(mine), desc=desc, unit="model", disable=not dist.is_main())
    for n, phase in enumerate(phases):
        if n:
            dist.barrier()
        for job in phase:
            bar.set_postfix_str("{} {} ipc={} seed={}".format(*job))
            _train_and_save(plan, job, val_xy, job in saved)
            bar.update()
    bar.close()


def _train_and_save(plan: Plan, job: Job, val_xy: tuple[Tensor, Tensor], saved: bool) -> None:
    """Train `job` (unless its record is `saved`) and write its record (and a full-data net's weights)."""
    if saved:
        return
    record, model = _run_job(plan, job, val_xy)
    record["key"] = plan.key(job)
    file = plan.job_file(job)
    if job[1] == "full":  # weights first (with the record's key): a record implies its weights exist
        atomic_write_bytes(file.with_suffix(".safetensors"), save(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            metadata={"key": str(record["key"])}))
    atomic_write_json(file, record)


def _run_job(plan: Plan, job: Job, val_xy: tuple[Tensor, Tensor]) -> tuple[dict, torch.nn.Module]:
    """Train one classifier; the record holds what the report needs (and which images were used)."""
    cfg, ecfg, (net, kind, ipc, s) = plan.cfg, plan.cfg.evaluate, job
    # hard and soft jobs of one (net, set, IPC, seed) share their seed: the same images, init and batches
    seed = derive_seed(cfg.seed, "evaluate", net, kind.removesuffix("_soft"), ipc, s)
    generator = torch.Generator().manual_seed(seed)
    record: dict = {"net": net, "kind": kind, "ipc": ipc, "seed": s}
    if kind.startswith("distilled"):
        idx = per_class_indices(plan.syn.labels, plan.names, ipc, generator if ecfg.pool else None, "distilled set")
        subset = plan.syn.select(idx)
        if ecfg.pool:
            record["indices"] = idx.tolist()
    elif kind.startswith("random_real"):
        idx = per_class_indices(plan.train.labels, plan.names, ipc, generator,
                                "random-real baseline (real train set)")
        record["indices"] = idx.tolist()
        subset = plan.train.select(idx)
    else:
        subset = plan.train
    epochs = ecfg.full_epochs if kind == "full" else ecfg.epochs or epochs_for_ipc(ipc)
    t0 = time.perf_counter()
    teacher = plan.teacher(net, s) if kind.endswith("_soft") else None
    res = train_classifier(net, *plan.prepare(subset), *val_xy, plan.norm, len(plan.names), epochs, seed, ecfg,
                           cfg.data.hflip, teacher)
    record.update(final=res.final, best=res.best, best_epoch=res.best_epoch, curve=res.curve, epochs=epochs,
                  seconds=round(time.perf_counter() - t0, 2), trained_in=str(cfg.run_dir))
    return record, res.model


def _weights_key(path: Path) -> str | None:
    """The job key stored in a kept classifier's weights file (None: no file, or one without a key)."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("key")


def collect_records(plan: Plan) -> dict:
    """records[net][kind][ipc] = the records of every seed (all ranks' jobs must be there)."""
    records: dict = {}
    for job in plan.jobs:
        record = plan.record(job)
        if record is None:
            raise StageError(f"evaluate: the result {plan.job_file(job)} of another process is missing or stale")
        net, kind, ipc, _ = job
        records.setdefault(net, {}).setdefault(kind, {}).setdefault(ipc, []).append(record)
    return records


def aggregate(plan: Plan, records: dict) -> dict:
    """results.json: per net and IPC the distilled and random-real summaries, gap and DD-Ranking scores;
    the full-data baseline and fidelity; the data, protocol and config they come from."""
    cfg, ecfg = plan.cfg, plan.cfg.evaluate
    by_net = {}
    for net, kinds in records.items():
        entry: dict = {"norm": ecfg.norm or DEFAULT_NORM[net], "ipc": {}}
        full = [r["final"] for r in kinds["full"][None]] if "full" in kinds else None
        for ipc in plan.ipcs:
            by_labels = {}
            for protocol in ecfg.labels:
                distilled, random_real = KINDS[protocol]
                e = {"distilled": _result(kinds[distilled][ipc]), "random_real": _result(kinds[random_real][ipc])}
                e["gap_over_random_real"] = round(e["distilled"]["mean"] - e["random_real"]["mean"], 2)
                e["random_real"]["indices"] = [r["indices"] for r in kinds[random_real][ipc]]
                if ecfg.pool:
                    e["distilled"]["indices"] = [r["indices"] for r in kinds[distilled][ipc]]
                e["dd_ranking"] = dd_ranking([r["final"] for r in kinds[distilled][ipc]],
                                             [r["final"] for r in kinds[random_real][ipc]], full)
                by_labels[protocol] = e
            # the first protocol's numbers at the top (what single-protocol readers use), every one by name
            entry["ipc"][str(ipc)] = {**by_labels[ecfg.labels[0]], "labels": ecfg.labels[0], "by_labels": by_labels}
        if "full" in kinds:
            runs = kinds["full"][None]
            entry["full"] = _result(runs)
            syn_xy = plan.prepare(plan.syn)  # fidelity: the share of the set each full-data net assigns its class
            fidelity = [accuracy(plan.full_model(net, r["seed"]), *syn_xy, plan.norm) for r in runs]
            entry["fidelity"] = {**summarize(fidelity), "num_images": len(plan.syn),
                                 "classifier": f"{net} trained on the full real train set"}
        by_net[net] = entry
    primary = ecfg.nets[0]
    results = {"net": primary, "full": None, "fidelity": None, **by_net[primary], "by_net": by_net}
    k = plan.key_parts
    results["data"] = {"train_sha256": k["train"], "val_sha256": k["val"], "distilled_sha256": k["distilled"],
                       "num_train": len(plan.train), "num_val": len(plan.val), "classes": plan.names,
                       "distilled_set": str(plan.syn_dir),
                       "normalization": f"per-channel mean and std of {plan.stats_from}",
                       "ipc_handling": ("IPC per class drawn at random (seeded) from the set" if ecfg.pool
                                        else "the first IPC images per class of the set")}
    results["protocol"] = {
        "epochs": {str(ipc): ecfg.epochs or epochs_for_ipc(ipc) for ipc in plan.ipcs},
        "full_epochs": ecfg.full_epochs, "seeds": ecfg.seeds, "image_size": plan.size, "precision": ecfg.precision,
        "headline": "final-epoch accuracy (%), mean ± std over seeds",
        "labels": {protocol: label_protocol(cfg, protocol, plan) for protocol in ecfg.labels},
        "augmentation": {"crop_scale": list(ecfg.crop_scale), "hflip": cfg.data.hflip,
                         "color_jitter": ecfg.color_jitter, "lighting": ecfg.lighting,
                         "cutmix_prob": ecfg.cutmix_prob, "cutmix_beta": ecfg.cutmix_beta}}
    results["config"] = to_dict(cfg)
    results["world_size"] = dist.world_size()
    return results


def label_protocol(cfg: Config, protocol: str, plan: Plan) -> str:
    """One line naming a label protocol's recipe, for results.json and every report row."""
    e = cfg.evaluate
    if protocol == "hard":
        return f"hard labels: cross-entropy, SGD lr {e.lr} momentum {e.momentum}, lr × 0.2 at 2/3 and 5/6"
    teacher = ("the full-data classifier of the same net and seed" if plan.teacher_file is None
               else f"{e.soft.teacher_net} from {e.soft.teacher} (sha256 {plan.teacher_file[2][:12]})")
    return (f"soft labels (RDED): teacher {teacher} labels every augmented batch; KL at temperature "
            f"{e.soft.temperature}, AdamW lr {e.soft.lr} weight decay {e.soft.weight_decay}, cosine to ½")


def save_real_examples(plan: Plan, out: Path) -> None:
    """The first real train images of the first classes, for the report's real-vs-distilled picture (so the
    report never reads the data set)."""
    idx = torch.cat([(plan.train.labels == c).nonzero().squeeze(1)[:EXAMPLES_PER_CLASS]
                     for c in range(min(len(plan.names), EXAMPLE_CLASSES))])
    real = plan.train.subset(idx)
    atomic_write_bytes(out / REAL_EXAMPLES, save({"images": real.images.contiguous(),
                                                  "labels": real.labels.contiguous()}))


@torch.no_grad()
def features(model: torch.nn.Module, x: Pixels, norm: tuple[Tensor, Tensor]) -> Tensor:
    """Penultimate-layer features [N, F] of uint8 images x (every classifier has .features / .classifier)."""
    model.eval()
    return torch.cat([model.features((to_unit(xb) - norm[0]) / norm[1]).flatten(1).cpu()
                      for xb in batches(x, torch.arange(len(x)).split(eval_batch(x.shape[-1])))])


@torch.no_grad()
def class_means(model: torch.nn.Module, x: Pixels, y: Tensor, norm: tuple[Tensor, Tensor], num_classes: int) -> Tensor:
    """Each class's mean penultimate feature [num_classes, F] (float64, on the CPU) of uint8 images x, batch by
    batch (a large set's features are never all held at once)."""
    model.eval()
    total, count = None, torch.zeros(num_classes, dtype=torch.float64)
    order = torch.arange(len(y)).split(eval_batch(x.shape[-1]))
    for idx, xb in zip(order, batches(x, order)):
        f = model.features((to_unit(xb) - norm[0]) / norm[1]).flatten(1).double().cpu()  # [b, F]
        labels = y[idx.to(y.device)].cpu()
        total = torch.zeros(num_classes, f.shape[1], dtype=torch.float64) if total is None else total
        total.index_add_(0, labels, f)
        count += torch.bincount(labels, minlength=num_classes)
    return total / count.clamp_min(1)[:, None]


def feature_metrics(plan: Plan, records: dict) -> dict:
    """Diversity and coverage of the distilled set and of the random-real subset (seed 0) at each IPC,
    against the real train set, in the features of the first net's full-data classifier (seed 0)."""
    ecfg, net, names = plan.cfg.evaluate, plan.cfg.evaluate.nets[0], plan.names
    x_train, y_train = plan.prepare(plan.train)
    model = plan.full_model(net, 0)
    real, real_y = features(model, x_train, plan.norm), y_train.cpu()
    x_syn, _ = plan.prepare(plan.syn)
    fake_all = features(model, x_syn, plan.norm)
    divs = [v for c in range(len(names)) if (v := diversity(real[real_y == c])) is not None]
    real_div = sum(divs) / len(divs) if divs else None  # the mean over classes, as per_class_metrics takes it
    out: dict = {
        "feature_space": f"penultimate layer of the {net} trained on the full real train set (seed 0)",
        "k": ecfg.knn, "reference": f"the real train set ({len(plan.train)} images)",
        "real_left_out": True,  # a sample that is a train image is not credited with its own ball (metrics.py)
        "real_train_diversity": real_div, "ipc": {},
    }
    distilled, random_real = KINDS[ecfg.labels[0]]  # the protocols share their images: any one will do
    for ipc in plan.ipcs:
        drawn = records[net][distilled][ipc][0].get("indices")  # --pool: seed 0's draw
        d_idx = torch.tensor(drawn) if drawn is not None else per_class_indices(plan.syn.labels, names, ipc,
                                                                                None, "")
        r_idx = torch.tensor(records[net][random_real][ipc][0]["indices"])
        out["ipc"][str(ipc)] = {
            "distilled": per_class_metrics(real, real_y, fake_all[d_idx], plan.syn.labels[d_idx], names, ecfg.knn),
            "random_real": per_class_metrics(real, real_y, real[r_idx], real_y[r_idx], names, ecfg.knn),
        }
    return out
