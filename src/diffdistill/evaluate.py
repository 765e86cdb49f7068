"""The evaluation protocol: train a small classifier from scratch on a set, score it on real val images.

For each IPC: the distilled set (first IPC images per class of the sampled set) and a seeded random-real
subset (IPC real images per class) are trained under the identical recipe, over `evaluate.seeds` seeds;
optionally the full real train set too. Final-epoch accuracy is the headline; the best-epoch accuracy is
kept beside it and labelled as selected on the validation set. Fidelity = share of the distilled images
that the full-data classifiers assign to their intended class.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from diffdistill.checkpoint import StageError, atomic_write_json, staged_dir
from diffdistill.config import Config, EvalConfig, to_dict
from diffdistill.data.datasets import ImageSet, load_data, load_image_folder
from diffdistill.models.classifiers import build_classifier
from diffdistill.runtime import derive_seed, setup, write_run_info

BEST_LABEL = "best epoch, selected on the validation set (optimistic)"


def random_resized_crop(x: Tensor, scale: tuple[float, float], flip: bool, gen: torch.Generator) -> Tensor:
    """Batched RandomResizedCrop(scale, ratio 3/4–4/3) + optional horizontal flip, one affine warp."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=gen)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1)  # crop width / image width
    h = (area / log_ratio.exp()).sqrt().clamp(max=1)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class TrainResult:
    final: float  # val accuracy (%) after the last epoch
    best: float  # max over evaluated epochs (selected on val)
    best_epoch: int
    curve: list[tuple[int, float]]
    model: torch.nn.Module


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    return 100.0 * correct / max(len(y), 1)


def train_classifier(net: str, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, num_classes: int,
                     epochs: int, seed: int, ecfg: EvalConfig, flip: bool) -> TrainResult:
    """SGD + momentum, lr × 0.2 at 2/3 and 5/6 of the epochs; x, y already on the device, normalized."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_classifier(net, x.shape[1], num_classes, x.shape[-1], ecfg.width, ecfg.norm).to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=ecfg.lr, momentum=ecfg.momentum, weight_decay=ecfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs * 2 // 3, epochs * 5 // 6], gamma=0.2)
    augment = ecfg.crop_scale != (1.0, 1.0) or flip
    curve = []
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(ecfg.batch_size):
            xb = x[idx]
            if augment:
                xb = random_resized_crop(xb, ecfg.crop_scale, flip, gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if epoch % ecfg.eval_every == 0 or epoch == epochs:
            curve.append((epoch, accuracy(model, x_val, y_val)))
    best_epoch, best = max(curve, key=lambda p: p[1])
    return TrainResult(curve[-1][1], best, best_epoch, curve, model)


def random_real_indices(labels: Tensor, num_classes: int, ipc: int, gen: torch.Generator) -> Tensor:
    """IPC random indices per class (sorted within class), classes in order."""
    picks = []
    for c in range(num_classes):
        pool = (labels == c).nonzero().squeeze(1)
        if len(pool) < ipc:
            raise StageError(f"random-real baseline: class {c} has {len(pool)} real train images, IPC is {ipc}")
        picks.append(pool[torch.randperm(len(pool), generator=gen)[:ipc]].sort().values)
    return torch.cat(picks)


def first_per_class(data: ImageSet, ipc: int, where: str) -> ImageSet:
    """The first `ipc` images of each class (file order = sample index order)."""
    picks = []
    for c, name in enumerate(data.classes):
        idx = (data.labels == c).nonzero().squeeze(1)
        if len(idx) < ipc:
            raise StageError(f"{where}: class {name} has {len(idx)} images, IPC {ipc} needs at least {ipc}")
        picks.append(idx[:ipc])
    return data.subset(torch.cat(picks))


def summarize(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "runs": [round(v, 2) for v in values]}


def _result(runs: list[TrainResult]) -> dict:
    out = summarize([r.final for r in runs])
    out["best_epoch"] = {**summarize([r.best for r in runs]), "label": BEST_LABEL}
    out["curves"] = [r.curve for r in runs]
    return out


def evaluate_stage(cfg: Config, force: bool = False, distilled: str | None = None) -> Path:
    """Score the distilled set (default: <run>/samples) -> <run>/evaluate/results.json."""
    ecfg = cfg.evaluate
    device = setup(cfg)
    final = cfg.run_dir / "evaluate"
    syn_dir = Path(distilled) if distilled else cfg.run_dir / "samples"
    if not syn_dir.is_dir():
        raise StageError(f"distilled set {syn_dir} does not exist: run `diffdistill sample` first")
    with staged_dir(final, force) as out:
        t0 = time.perf_counter()
        train, val = load_data(cfg.data, need_val=True)
        syn = load_image_folder(syn_dir, train.classes, cfg.data.image_size, train.channels, "distilled set")
        # normalize every set with the real train set's per-channel statistics
        real = train.as_float()
        mean, std = real.mean((0, 2, 3), keepdim=True), real.std((0, 2, 3), keepdim=True).clamp_min(1e-3)

        def prep(s: ImageSet) -> tuple[Tensor, Tensor]:
            return ((s.as_float() - mean) / std).to(device), s.labels.to(device)

        x_val, y_val = prep(val)
        n_cls, flip = len(train.classes), cfg.data.hflip
        ipcs = sorted(set(cfg.sample.ipc))
        jobs = [(net, kind, ipc, s) for net in ecfg.nets for ipc in ipcs for kind in ("distilled", "random_real")
                for s in range(ecfg.seeds)]
        if ecfg.full:
            jobs += [(net, "full", None, s) for net in ecfg.nets for s in range(ecfg.seeds)]
        results: dict = {}
        picked: dict = {}
        bar = tqdm(jobs, desc="evaluate", unit="model", dynamic_ncols=True)
        for net, kind, ipc, s in bar:
            bar.set_postfix_str(f"{net} {kind} ipc={ipc} seed={s}")
            seed = derive_seed(cfg.seed, "evaluate", net, kind, ipc, s)
            if kind == "distilled":
                subset = first_per_class(syn, ipc, f"distilled set {syn_dir}")
            elif kind == "random_real":
                idx = random_real_indices(train.labels, n_cls, ipc, torch.Generator().manual_seed(seed))
                picked.setdefault(str(ipc), []).append(idx.tolist())
                subset = train.subset(idx)
            else:
                subset = train
            epochs = ecfg.full_epochs if kind == "full" else ecfg.epochs
            res = train_classifier(net, *prep(subset), x_val, y_val, n_cls, epochs, seed, ecfg, flip)
            results.setdefault(net, {}).setdefault(kind, {}).setdefault(ipc, []).append(res)
        primary = ecfg.nets[0]
        report = {"net": primary, "norm": ecfg.norm, "ipc": {}, "full": None, "fidelity": None}
        by_net = {}
        for net, kinds in results.items():
            entry = {"ipc": {str(ipc): {kind: _result(kinds[kind][ipc]) for kind in ("distilled", "random_real")}
                             for ipc in ipcs}}
            for ipc in ipcs:
                e = entry["ipc"][str(ipc)]
                e["gap_over_random_real"] = round(e["distilled"]["mean"] - e["random_real"]["mean"], 2)
            if "full" in kinds:
                full_runs = kinds["full"][None]
                entry["full"] = _result(full_runs)
                x_syn, y_syn = prep(syn)
                entry["fidelity"] = {**summarize([accuracy(r.model, x_syn, y_syn) for r in full_runs]),
                                     "num_images": len(syn), "classifier": f"{net} trained on the full real train set"}
            by_net[net] = entry
        report.update({k: v for k, v in by_net[primary].items()})
        report["by_net"] = by_net
        report["random_real_indices"] = {
            ipc: {"note": "indices into the real train set, one list per seed", "indices": idx}
            for ipc, idx in picked.items()
        }
        report["data"] = {"train_sha256": train.sha256(), "val_sha256": val.sha256(), "distilled_sha256": syn.sha256(),
                          "num_train": len(train), "num_val": len(val), "classes": train.classes,
                          "distilled_set": str(syn_dir), "ipc_handling": "first IPC images per class of the set"}
        report["protocol"] = {"epochs": ecfg.epochs, "full_epochs": ecfg.full_epochs, "seeds": ecfg.seeds,
                              "headline": "final-epoch accuracy (%), mean ± std over seeds",
                              "augmentation": {"crop_scale": list(ecfg.crop_scale), "hflip": flip}}
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["config"] = to_dict(cfg)
        atomic_write_json(out / "results.json", report)
        write_run_info(out, cfg, "evaluate", {"data": report["data"]})
    return final
