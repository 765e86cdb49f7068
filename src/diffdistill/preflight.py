"""Everything `run` can know before the first training step: checked up front, described for `--dry-run`.

A mistake that would stop the run after hours of training (no val set, too few real images for an IPC,
an init model that is not there, an output folder that cannot be written) fails here with one line, before
any stage folder is created. Only listings are read (and a few image headers for the channel count): no
image is decoded except those of the small built-in set.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffdistill.config import Config, epochs_for_ipc
from diffdistill.data.datasets import data_classes, list_images, peek_sides, train_listing
from diffdistill.errors import StageError
from diffdistill.runs import JUDGE_OFF, TRAINING_STAGES, check_classifier_file, judge_missing, judge_setting, stage_dir
from diffdistill.teachers import check_teacher

# how many classifier trainings evaluation runs per (net, seed): distilled and random real per IPC, + full
SETS_PER_IPC = 2


@dataclass
class Preflight:
    """What the checks found: the lines `--dry-run` prints."""

    lines: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.lines.append(text)


def _val_count(cfg: Config, names: list[str]) -> int | None:
    data = cfg.data
    if data.train is None:
        return None  # the built-in set's val split is made from it
    if data.val is None:
        raise StageError("data.val is not set: evaluation (and the generator check) scores on a folder of real "
                         "validation images with the same class subfolders; set data.val=DIR")
    if data.val_labels is not None:  # ImageNet's flat val layout: its contents are checked when it is read
        if not Path(data.val).is_dir():
            raise StageError(f"data.val: folder {data.val} does not exist")
        if not Path(data.val_labels).is_file():
            raise StageError(f"data.val_labels: file {data.val_labels} does not exist (one 'image wnid' per line, "
                             "or ImageNet's LOC_val_solution.csv)")
        return None
    files, _ = list_images(data.val, names, "data.val")
    return len(files)


def _local_exists(spec: str | None, key: str) -> None:
    """A model given as a local path must exist (a hub id, `owner/name`, is found when it is loaded)."""
    if not spec or spec in TRAINING_STAGES:
        return
    if spec.startswith(("/", ".", "~")) or spec.endswith((".pt", ".pth")):
        if not Path(spec).expanduser().exists():
            raise StageError(f"{key}: {spec} does not exist (expected a diffusers model folder, an original DiT "
                             ".pt file, or a hub id such as facebook/DiT-XL-2-256)")


def _writable(folder: Path) -> Path:
    """The nearest existing folder above the run folder, which must be writable (nothing is created here)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise StageError(f"cannot write the output folder {folder}: {probe} is not a writable folder; "
                         "set out_dir to another place")
    return probe


def planned_bytes(cfg: Config, order: list[str], classes: int, channels: int) -> int | None:
    """About how much the planned stages write into the run folder: per trained DiT its raw and EMA weights
    plus `keep_checkpoints` checkpoints (weights, EMA, two AdamW moments), and the sampled PNGs (at most
    raw size). None when the DiT is loaded from elsewhere (its size is not known without loading it)."""
    from diffdistill.models.dit import SIZES

    total = 0
    training = [s for s in TRAINING_STAGES if s in order]
    if training:
        if any(getattr(cfg, s).init not in (None, "pretrain") for s in training) or cfg.model.size not in SIZES:
            return None
        spec = SIZES[cfg.model.size]
        width = spec["num_attention_heads"] * spec["attention_head_dim"]
        # per block: attention 4w², MLP 8w², adaLN-zero modulation 6w² (DiT-XL/2: 669 M of its 675 M)
        params = 18 * spec["num_layers"] * width * width
        total += sum(4 * params * (2 + 4 * getattr(cfg, s).keep_checkpoints) for s in training)
    if "sample" in order:
        total += max(cfg.sample.ipc) * classes * channels * cfg.data.image_size ** 2
    return total


def _seconds_per_call(fn: Callable[[], object], repeats: int = 2) -> float:
    fn()  # the first call pays for allocation and kernel selection
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def estimate(cfg: Config, order: list[str], counts: dict[str, int], channels: int) -> str:
    """Minutes per stage from a few timed steps of fresh models of the planned size on the run's device: the
    DiT (pixel space, trained here) for training and sampling, the first evaluation net for the classifiers.
    Stages it cannot time are left out and said."""
    import torch

    from diffdistill.runtime import setup

    device, classes, total = setup(cfg), len(counts), sum(counts.values())
    minutes: dict[str, float] = {}
    untimed = []
    with torch.random.fork_rng(devices=[]):
        dit_stages = [s for s in order if s in (*TRAINING_STAGES, "sample")]
        if dit_stages and (cfg.autoencoder.kind != "identity" or any(
                getattr(cfg, s).init not in (None, "pretrain") for s in TRAINING_STAGES if s in order)):
            untimed += dit_stages  # a VAE or a loaded model: not built just to time it
        elif dit_stages:
            minutes.update(_dit_minutes(cfg, order, classes, channels, device))
        if {"check", "evaluate"} & set(order):
            per_image = _classifier_seconds(cfg, channels, classes, device)
            if "check" in order:
                minutes["check"] = cfg.evaluate.full_epochs * total * per_image / 60
            if "evaluate" in order:
                passes = sum((cfg.evaluate.epochs or epochs_for_ipc(ipc)) * ipc * classes * SETS_PER_IPC
                             for ipc in eval_ipcs(cfg)) * len(cfg.evaluate.labels)  # each kind of label: a training
                passes += cfg.evaluate.full_epochs * total if cfg.evaluate.full else 0
                minutes["evaluate"] = passes * cfg.evaluate.seeds * len(cfg.evaluate.nets) * per_image / 60
    pre = cfg.pretrain
    more = ""
    if "pretrain" in minutes and pre.max_steps > pre.steps:
        extra = minutes["pretrain"] * (pre.max_steps / pre.steps - 1)  # the steps past `steps`
        more = f", up to ~{sum(minutes.values()) + extra:.0f} if pretraining goes on to pretrain.max_steps"
        if "check" in minutes:  # the first check on the way trains the check's classifier; the check reuses it
            minutes["pretrain"], minutes["check"] = minutes["pretrain"] + minutes["check"], 0.0
    parts = ", ".join(f"{s} ~{minutes[s]:.1f}" for s in order if s in minutes)
    skipped = f" (not timed: {', '.join(untimed)}, a VAE or a loaded model)" if untimed else ""
    return (f"time (from a few timed steps on {device.type}, minutes): {parts or 'nothing timed'}; "
            f"total ~{sum(minutes.values()):.0f}{more}{skipped}")


def _dit_minutes(cfg: Config, order: list[str], classes: int, channels: int, device) -> dict[str, float]:
    import torch

    from diffdistill.autoencoders import IdentityAutoencoder
    from diffdistill.models.dit import build_dit
    from diffdistill.runtime import sample_batch, sample_batches

    latent = IdentityAutoencoder(cfg.autoencoder.unshuffle).latent_shape(channels, cfg.data.image_size)
    dit = build_dit(cfg.model.size, *latent[:2], classes, cfg.model.learn_sigma).to(device)
    opt = torch.optim.AdamW(dit.parameters())

    def step(batch: int) -> None:
        x = torch.randn(batch, *latent, device=device)
        t, y = torch.randint(0, 1000, (batch,), device=device), torch.randint(0, classes, (batch,), device=device)
        dit(x, timestep=t, class_labels=y).sample.float().square().mean().backward()
        opt.step()
        opt.zero_grad()

    @torch.no_grad()
    def guided_forward(batch: int) -> None:  # a guided sampling step runs the model on 2 × the batch
        dit(torch.randn(2 * batch, *latent, device=device), timestep=torch.zeros(2 * batch, device=device),
            class_labels=torch.zeros(2 * batch, dtype=torch.long, device=device))

    out = {s: getattr(cfg, s).steps * _seconds_per_call(lambda s=s: step(getattr(cfg, s).batch_size)) / 60
           for s in TRAINING_STAGES if s in order}
    if "sample" in order:
        size, ipc, draws = sample_batch(cfg.sample.batch_size, device), max(cfg.sample.ipc), cfg.sample.candidates
        batches = sample_batches(classes, ipc, draws, size)
        forwards = sum(-(-len(b) * draws // size) for b in batches)
        batch = min(size, max(len(b) for b in batches) * draws)  # the largest forward
        out["sample"] = _seconds_per_call(lambda: guided_forward(batch)) * cfg.sample.steps * forwards / 60
    return out


def _classifier_seconds(cfg: Config, channels: int, classes: int, device) -> float:
    """Seconds per image of a training pass of the first evaluation net."""
    import torch

    from diffdistill.models.classifiers import build_classifier

    size, batch = cfg.evaluate.image_size or cfg.data.image_size, cfg.evaluate.batch_size
    net = build_classifier(cfg.evaluate.nets[0], channels, classes, size, cfg.evaluate.width, cfg.evaluate.norm)
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(batch, channels, size, size, device=device), torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()

    return _seconds_per_call(step) / batch


def eval_ipcs(cfg: Config) -> list[int]:
    return sorted(cfg.evaluate.ipc or cfg.sample.ipc)


PEEK = 64  # files whose headers --dry-run reads for the images' own size
SIDE_STEP = 16  # a size it suggests is a multiple of this (the SD VAE's factor 8 times a DiT patch of 2)


def check_plan(cfg: Config, order: list[str], distilled: str | None = None, timed: bool = False) -> Preflight:
    """Check `order` (stage names, as `runs.run_order` gives them) for `cfg`; one-line StageError on the first
    problem, else the plan described (`timed`: with a time estimate from a few timed steps)."""
    out = Preflight()
    probe = _writable(cfg.run_dir)
    if cfg.autoencoder.kind == "kl":
        _local_exists(cfg.autoencoder.pretrained, "autoencoder.pretrained")
        _local_exists(cfg.autoencoder.decoder, "autoencoder.decoder")
    names = data_classes(cfg.data)
    counts, channels, files = train_listing(cfg.data)
    total = sum(counts.values())
    where = cfg.data.train or f"the built-in {cfg.data.builtin} set"
    lo, hi = min(counts.values()), max(counts.values())
    size = cfg.data.image_size
    least, most = peek_sides(files, PEEK) if files else (0, 0)  # the files' own size, from a few headers
    sides = f" (the images: {least if least == most else f'{least}–{most}'} px, a peek at up to {PEEK} files)" \
        if files else ""
    out.say(f"data: {where}: {total} train images in {len(names)} classes "
            f"({lo if lo == hi else f'{lo}–{hi}'} per class), {size} px{sides}")
    larger = SIDE_STEP * (min(least, 4 * size) // SIDE_STEP)  # at most 4x: slower by 16x or more
    if least >= 2 * size and larger > size:  # a large image read small is said
        out.say(f"      every peeked image is at least {least} px and is read at data.image_size {size} px, and so "
                f"is the distilled set; data.image_size={larger} keeps more of their detail (slower per step)")
    if {"check", "evaluate"} & set(order):
        val = _val_count(cfg, names)
        if val is not None:
            out.say(f"      {cfg.data.val}: {val} val images")
    for stage in order:
        if stage in TRAINING_STAGES:
            _check_training(cfg, stage, order, total, out)
        elif stage == "check":
            by = " (by the first check on the way, during pretraining)" if cfg.pretrain.max_steps and \
                "pretrain" in order else ""
            out.say(f"check: {cfg.pretrain.check_images} images per class, one {cfg.evaluate.nets[0]} trained on "
                    f"the train set{by}")
        elif stage == "sample":
            _check_sampling(cfg, len(names), order, out)
        elif stage == "evaluate":
            _check_evaluation(cfg, counts, order, distilled, out)
    need, free = planned_bytes(cfg, order, len(names), channels), shutil.disk_usage(probe).free
    if need is not None and need > free:
        raise StageError(f"not enough disk space under {probe}: the plan writes about {need / 1e9:.1f} GB (model "
                         f"weights, checkpoints, samples), {free / 1e9:.1f} GB are free; free space or set out_dir")
    out.say(f"disk: about {need / 1e6:.0f} MB planned, {free / 1e9:.0f} GB free" if need is not None
            else f"disk: {free / 1e9:.0f} GB free (the size of a loaded model is not known here)")
    if timed:
        out.say(estimate(cfg, order, counts, channels))
    return out


def _check_training(cfg: Config, stage: str, order: list[str], total: int, out: Preflight) -> None:
    tcfg = getattr(cfg, stage)
    _local_exists(tcfg.init, f"{stage}.init")
    if tcfg.init in TRAINING_STAGES and tcfg.init not in order and not stage_dir(cfg.run_dir, tcfg.init).is_dir():
        raise StageError(f"{stage}.init is {tcfg.init}, but {stage_dir(cfg.run_dir, tcfg.init)} does not exist and "
                         f"this command does not make it: run `diffdistill {tcfg.init}` with this config first")
    more = f"; up to {tcfg.max_steps} while the generator checks on the way are below their goal" \
        if tcfg.max_steps > tcfg.steps else ""
    out.say(f"{stage}: {tcfg.steps} steps of batch {tcfg.batch_size} "
            f"({tcfg.steps * min(tcfg.batch_size, total) / total:.0f} epochs){more}")


def _check_sampling(cfg: Config, classes: int, order: list[str], out: Preflight) -> None:
    source = cfg.sample.checkpoint
    if source in TRAINING_STAGES and source not in order and not stage_dir(cfg.run_dir, source).is_dir():
        raise StageError(f"sample.checkpoint is {source}, but {stage_dir(cfg.run_dir, source)} does not exist "
                         f"and this command does not make it: run `diffdistill {source}` with this config first")
    judge = check_classifier_file(cfg.run_dir)
    why = judge_missing(judge, cfg.sample) if cfg.sample.judged and "check" not in order else None
    if why:
        key, value = judge_setting(cfg.sample)
        how = ("run `diffdistill check` with this config first (pretrain.check_images > 0, evaluate.full)"
               if stage_dir(cfg.run_dir, "pretrain").is_dir() or "pretrain" in order else
               "the check needs this run's pretraining, and there is none")
        raise StageError(f"{key}={value}, but the generator check's classifier {judge} {why} and this "
                         f"command does not make it: {how}; or set {key}={JUDGE_OFF[key]}")
    per = max(cfg.sample.ipc)
    choice = (f"; up to {cfg.sample.redraw} redraws of an image the check's classifier assigns to another class"
              if cfg.sample.redraw else f"; each image the check's classifier's pick of {cfg.sample.candidates} "
              f"draws" if cfg.sample.candidates > 1 else "")
    out.say(f"sample: {per * classes} images ({per} per class), {cfg.sample.scheduler} {cfg.sample.steps} steps, "
            f"guidance {cfg.sample.guidance}{choice}")


def _check_evaluation(cfg: Config, counts: dict[str, int], order: list[str], distilled: str | None,
                      out: Preflight) -> None:
    ecfg, ipcs = cfg.evaluate, eval_ipcs(cfg)
    small = min(counts, key=counts.get)
    if counts[small] < ipcs[-1]:  # the random-real baseline draws IPC real images per class
        raise StageError(f"data.train: class {small} has {counts[small]} images, IPC {ipcs[-1]} needs at least "
                         f"{ipcs[-1]} (the random-real baseline draws IPC real images per class); lower "
                         f"evaluate.ipc / sample.ipc or add images")
    if distilled is None and "sample" in order and max(cfg.sample.ipc) < ipcs[-1]:
        raise StageError(f"evaluate.ipc {ipcs[-1]} is larger than the {max(cfg.sample.ipc)} images per class that "
                         f"sample makes (sample.ipc); raise sample.ipc or lower evaluate.ipc")
    if distilled is not None and not Path(distilled).is_dir():
        raise StageError(f"--distilled {distilled}: no such folder (expected a folder of class subfolders)")
    if distilled is None and "sample" not in order and not stage_dir(cfg.run_dir, "sample").is_dir():
        raise StageError(f"distilled set {stage_dir(cfg.run_dir, 'sample')} does not exist: run `diffdistill sample` "
                         "with this config first, or score another folder with --distilled DIR")
    check_teacher(ecfg)  # the teacher is needed last: a missing one must fail before the first stage
    jobs = len(ecfg.nets) * ecfg.seeds * (SETS_PER_IPC * len(ipcs) * len(ecfg.labels) + int(ecfg.full))
    labels = f" × {' / '.join(ecfg.labels)} labels" if ecfg.labels != ("hard",) else ""
    out.say(f"evaluate: {jobs} classifier trainings ({', '.join(ecfg.nets)} × {ecfg.seeds} seeds × "
            f"IPC {', '.join(map(str, ipcs))} × distilled / random real{labels}"
            f"{' + full data' if ecfg.full else ''})")
