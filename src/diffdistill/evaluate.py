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
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from diffdistill import distributed as dist
from diffdistill.augment import color_jitter, cutmix, lighting, random_resized_crop
from diffdistill.checkpoint import StageError, atomic_write_bytes, atomic_write_json, check_output_free, staged_dir
from diffdistill.config import Config, EvalConfig, to_dict
from diffdistill.data.datasets import (
    ImageFiles,
    ImageSet,
    data_classes,
    list_train,
    load_data,
    load_image_folder,
    load_val,
    to_uint8,
)
from diffdistill.metrics import dd_ranking, per_class_metrics
from diffdistill.models.classifiers import DEFAULT_NORM, build_classifier
from diffdistill.runtime import derive_seed, setup, write_run_info

BEST_LABEL = "best epoch, selected on the validation set (optimistic)"
# part of every job record's key: bump when the protocol's arithmetic changes, so old records are not reused
# (2: sets held as uint8 at the classifier size, resized sets rounded to uint8)
RECIPE_VERSION = 2
# without the full-data baseline the train set is only listed; its normalization statistics come from a sample
NORM_IMAGES_PER_CLASS = 10


# (largest IPC, epochs): the recipe of the field's tables; above the last bound EPOCHS_ABOVE
EPOCHS_BY_IPC = ((1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500))
EPOCHS_ABOVE = 300


def epochs_for_ipc(ipc: int) -> int:
    return next((epochs for bound, epochs in EPOCHS_BY_IPC if ipc <= bound), EPOCHS_ABOVE)


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


def to_unit(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [0, 1] (via [-1, 1], the arithmetic every stage uses for pixels)."""
    return (x.float() / 127.5 - 1) / 2 + 0.5


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, norm: tuple[Tensor, Tensor], batch: int = 512) -> float:
    """Top-1 (%) of `model` on uint8 images x, normalized batch by batch (sets stay uint8 on the device)."""
    model.eval()
    correct = sum(int((model((to_unit(x[i : i + batch]) - norm[0]) / norm[1]).argmax(1) == y[i : i + batch]).sum())
                  for i in range(0, len(y), batch))
    return 100.0 * correct / max(len(y), 1)


def train_classifier(net: str, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, norm: tuple[Tensor, Tensor],
                     num_classes: int, epochs: int, seed: int, ecfg: EvalConfig, flip: bool) -> TrainResult:
    """SGD + momentum, lr × 0.2 at 2/3 and 5/6 of the epochs. x and x_val: uint8 images on the device at the
    classifier's size; `norm` = (mean, std) applied to each (augmented) batch."""
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    model = build_classifier(net, x.shape[1], num_classes, x.shape[-1], ecfg.width, ecfg.norm).to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=ecfg.lr, momentum=ecfg.momentum, weight_decay=ecfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, lr_milestones(epochs), gamma=0.2)
    crop = ecfg.crop_scale != (1.0, 1.0) or flip
    curve = []
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(ecfg.batch_size):
            xb, yb = to_unit(x[idx]), y[idx]
            if crop:
                xb = random_resized_crop(xb, ecfg.crop_scale, flip, gen)
            if ecfg.color_jitter > 0:
                xb = color_jitter(xb, ecfg.color_jitter, gen)
            if ecfg.lighting > 0:
                xb = lighting(xb, ecfg.lighting, gen)
            xb = (xb - norm[0]).div_(norm[1])
            if ecfg.cutmix_prob > 0 and rng.random() < ecfg.cutmix_prob:
                xb, perm, lam = cutmix(xb, ecfg.cutmix_beta, gen, rng)
                out = model(xb)
                loss = lam * F.cross_entropy(out, yb) + (1 - lam) * F.cross_entropy(out, yb[perm])
            else:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if epoch % ecfg.eval_every == 0 or epoch == epochs:
            curve.append((epoch, accuracy(model, x_val, y_val, norm)))
    best_epoch, best = max(curve, key=lambda p: p[1])
    return TrainResult(curve[-1][1], best, best_epoch, curve, model)


def per_class_indices(labels: Tensor, names: list[str], ipc: int, gen: torch.Generator | None, where: str) -> Tensor:
    """`ipc` indices per class, classes in order: the first ones (gen None) or a seeded random draw."""
    picks = []
    for c, name in enumerate(names):
        pool = (labels == c).nonzero().squeeze(1)
        if len(pool) < ipc:
            raise StageError(f"{where}: class {name} has {len(pool)} images, IPC {ipc} needs at least {ipc}")
        picks.append(pool[:ipc] if gen is None else pool[torch.randperm(len(pool), generator=gen)[:ipc]].sort().values)
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


def _resize(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def evaluate_stage(cfg: Config, force: bool = False, distilled: str | None = None) -> Path:
    """Score the distilled set (default: <run>/samples) -> <run>/evaluate/results.json."""
    ecfg = cfg.evaluate
    device = dist.init(setup(cfg))
    final = cfg.run_dir / "evaluate"
    syn_dir = Path(distilled) if distilled else cfg.run_dir / "samples"
    if not syn_dir.is_dir():
        raise StageError(f"distilled set {syn_dir} does not exist: run `diffdistill sample` first")
    check_output_free(final, force)  # on every rank, before any work
    t0 = time.perf_counter()
    names = data_classes(cfg.data)
    if cfg.data.train is not None and not ecfg.full:  # only IPC-sized real subsets are needed: list, don't read
        val = load_val(cfg.data, names, cfg.data.channels)
        train = list_train(cfg.data, val.channels)
        k = min(NORM_IMAGES_PER_CLASS, int(torch.bincount(train.labels).min()))
        stats = train.subset(per_class_indices(train.labels, names, k, torch.Generator().manual_seed(
            derive_seed(cfg.seed, "evaluate", "normalization")), "data.train"))
        stats_from = f"{len(stats)} train images ({k} per class, seeded draw)"
    else:
        train, val = load_data(cfg.data, need_val=True)
        stats, stats_from = train, "the whole train set"
    syn = load_image_folder(syn_dir, names, cfg.data.image_size, val.channels, "distilled set")
    size = ecfg.image_size or cfg.data.image_size
    # every set is normalized with the real train set's per-channel statistics
    real01 = _resize(stats.as_float() / 2 + 0.5, size)
    norm = (real01.mean((0, 2, 3), keepdim=True).to(device),
            real01.std((0, 2, 3), keepdim=True).clamp_min(1e-3).to(device))

    def prep(s: ImageSet) -> tuple[Tensor, Tensor]:  # uint8 pixels at the classifier size, on the device
        x = s.images if s.images.shape[-1] == size else to_uint8(_resize(s.as_float(), size))
        return x.to(device), s.labels.to(device)

    x_val, y_val = prep(val)
    syn_xy = prep(syn) if ecfg.full else None  # only the full-data classifiers score it (fidelity)
    flip = cfg.data.hflip
    ipcs = sorted(set(ecfg.ipc or cfg.sample.ipc))
    for labels, where in ((syn.labels, "distilled set"), (train.labels, "random-real baseline (real train set)")):
        per_class_indices(labels, names, max(ipcs), None, where)  # too few images: say so before any training
    jobs = [(net, kind, ipc, s) for net in ecfg.nets for ipc in ipcs for kind in ("distilled", "random_real")
            for s in range(ecfg.seeds)]
    if ecfg.full:
        jobs += [(net, "full", None, s) for net in ecfg.nets for s in range(ecfg.seeds)]
    cache = cfg.run_dir / "evaluate-jobs"
    common = {"recipe": RECIPE_VERSION, "evaluate": to_dict(cfg)["evaluate"], "hflip": flip, "seed": cfg.seed,
              "train": train.sha256(), "normalization": stats_from,
              "val": val.sha256(), "distilled": syn.sha256(), "torch": torch.__version__}

    def job_record(net: str, kind: str, ipc: int | None, s: int) -> tuple[Path, int, dict | None]:
        key = derive_seed(json.dumps({**common, "job": [net, kind, ipc, s]}, sort_keys=True))
        file = cache / f"{net}_{kind}_ipc{ipc}_seed{s}.json"
        record = json.loads(file.read_text()) if file.is_file() else None
        if kind == "full" and s == 0 and not file.with_suffix(".safetensors").is_file():
            record = None  # the feature extractor of the metrics is kept beside this record
        return file, key, record if record is not None and record.get("key") == key else None

    # torchrun: jobs are dealt to the ranks round-robin; each writes its records, rank 0 merges them
    mine = [job for n, job in enumerate(jobs) if n % dist.world_size() == dist.rank()]
    bar = tqdm(mine, desc="evaluate", unit="model", dynamic_ncols=True, disable=not dist.is_main())
    for net, kind, ipc, s in bar:
        bar.set_postfix_str(f"{net} {kind} ipc={ipc} seed={s}")
        file, key, record = job_record(net, kind, ipc, s)
        if record is None:
            record, model = _run_job(cfg, net, kind, ipc, s, train, syn, prep, (x_val, y_val), syn_xy, norm)
            record["key"] = key
            if kind == "full" and s == 0:  # weights first: a record implies its weights exist
                atomic_write_bytes(file.with_suffix(".safetensors"), save(
                    {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
            atomic_write_json(file, record)
    dist.barrier()
    if not dist.is_main():
        return final
    records: dict = {}
    for net, kind, ipc, s in jobs:
        file, _, record = job_record(net, kind, ipc, s)
        if record is None:
            raise StageError(f"evaluate: the result {file} of another process is missing or stale")
        records.setdefault(net, {}).setdefault(kind, {}).setdefault(ipc, []).append(record)
    by_net = {}
    for net, kinds in records.items():
        entry: dict = {"norm": ecfg.norm or DEFAULT_NORM[net], "ipc": {}}
        for ipc in ipcs:
            e = {kind: _result(kinds[kind][ipc]) for kind in ("distilled", "random_real")}
            e["gap_over_random_real"] = round(e["distilled"]["mean"] - e["random_real"]["mean"], 2)
            e["random_real"]["indices"] = [r["indices"] for r in kinds["random_real"][ipc]]
            if ecfg.pool:
                e["distilled"]["indices"] = [r["indices"] for r in kinds["distilled"][ipc]]
            e["dd_ranking"] = dd_ranking([r["final"] for r in kinds["distilled"][ipc]],
                                         [r["final"] for r in kinds["random_real"][ipc]],
                                         [r["final"] for r in kinds["full"][None]] if "full" in kinds else None)
            entry["ipc"][str(ipc)] = e
        if "full" in kinds:
            runs = kinds["full"][None]
            entry["full"] = _result(runs)
            entry["fidelity"] = {**summarize([r["fidelity"] for r in runs]), "num_images": len(syn),
                                 "classifier": f"{net} trained on the full real train set"}
        by_net[net] = entry
    primary = ecfg.nets[0]
    report = {"net": primary, "full": None, "fidelity": None, **by_net[primary],
              "by_net": by_net}
    report["data"] = {"train_sha256": common["train"], "val_sha256": common["val"],
                      "distilled_sha256": common["distilled"], "num_train": len(train), "num_val": len(val),
                      "classes": names, "distilled_set": str(syn_dir), "normalization": f"per-channel mean "
                      f"and std of {stats_from}",
                      "ipc_handling": ("IPC per class drawn at random (seeded) from the set" if ecfg.pool
                                       else "the first IPC images per class of the set")}
    report["protocol"] = {
        "epochs": {str(ipc): ecfg.epochs or epochs_for_ipc(ipc) for ipc in ipcs}, "full_epochs": ecfg.full_epochs,
        "seeds": ecfg.seeds, "image_size": size, "headline": "final-epoch accuracy (%), mean ± std over seeds",
        "augmentation": {"crop_scale": list(ecfg.crop_scale), "hflip": flip, "color_jitter": ecfg.color_jitter,
                         "lighting": ecfg.lighting, "cutmix_prob": ecfg.cutmix_prob,
                         "cutmix_beta": ecfg.cutmix_beta}}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["config"] = to_dict(cfg)
    report["world_size"] = dist.world_size()
    if ecfg.full and ecfg.metrics:
        report["metrics"] = feature_metrics(cfg, names, train, syn, prep, norm, records, cache, ipcs)
    with staged_dir(final, force) as out:
        atomic_write_json(out / "results.json", report)
        write_run_info(out, cfg, "evaluate", {"data": report["data"]})
    return final


def _run_job(cfg: Config, net: str, kind: str, ipc: int | None, s: int, train: ImageSet | ImageFiles, syn: ImageSet,
             prep, val: tuple[Tensor, Tensor], syn_xy: tuple[Tensor, Tensor] | None,
             norm: tuple[Tensor, Tensor]) -> tuple[dict, torch.nn.Module]:
    """Train one classifier; the record holds what the report needs (and which images were used)."""
    ecfg = cfg.evaluate
    seed = derive_seed(cfg.seed, "evaluate", net, kind, ipc, s)
    gen = torch.Generator().manual_seed(seed)
    record: dict = {"net": net, "kind": kind, "ipc": ipc, "seed": s}
    if kind == "distilled":
        idx = per_class_indices(syn.labels, syn.classes, ipc, gen if ecfg.pool else None, "distilled set")
        subset = syn.subset(idx)
        if ecfg.pool:
            record["indices"] = idx.tolist()
    elif kind == "random_real":
        idx = per_class_indices(train.labels, train.classes, ipc, gen, "random-real baseline (real train set)")
        record["indices"] = idx.tolist()
        subset = train.subset(idx)
    else:
        subset = train
    epochs = ecfg.full_epochs if kind == "full" else ecfg.epochs or epochs_for_ipc(ipc)
    res = train_classifier(net, *prep(subset), *val, norm, len(train.classes), epochs, seed, ecfg, cfg.data.hflip)
    record.update(final=res.final, best=res.best, best_epoch=res.best_epoch, curve=res.curve, epochs=epochs)
    if kind == "full":
        record["fidelity"] = accuracy(res.model, *syn_xy, norm)
    return record, res.model


@torch.no_grad()
def features(model: torch.nn.Module, x: Tensor, norm: tuple[Tensor, Tensor], batch: int = 512) -> Tensor:
    """Penultimate-layer features [N, F] of uint8 images x (every classifier has .features / .classifier)."""
    model.eval()
    return torch.cat([model.features((to_unit(x[i : i + batch]) - norm[0]) / norm[1]).flatten(1).cpu()
                      for i in range(0, len(x), batch)])


def feature_metrics(cfg: Config, names: list[str], train: ImageSet, syn: ImageSet, prep,
                    norm: tuple[Tensor, Tensor], records: dict, cache: Path, ipcs: list[int]) -> dict:
    """Diversity and coverage of the distilled set and of the random-real subset (seed 0) at each IPC,
    against the real train set, in the features of the first net's full-data classifier (seed 0)."""
    ecfg, net = cfg.evaluate, cfg.evaluate.nets[0]
    x_train, y_train = prep(train)
    model = build_classifier(net, x_train.shape[1], len(names), x_train.shape[-1], ecfg.width, ecfg.norm)
    model.load_state_dict(load_file(str(cache / f"{net}_full_ipcNone_seed0.safetensors")))
    model.to(x_train.device)
    real, real_y = features(model, x_train, norm), y_train.cpu()
    x_syn, _ = prep(syn)
    fake_all = features(model, x_syn, norm)
    real_div = per_class_metrics(real, real_y, real, real_y, names, ecfg.knn)["overall"]["diversity"]
    out: dict = {
        "feature_space": f"penultimate layer of the {net} trained on the full real train set (seed 0)",
        "k": ecfg.knn, "reference": f"the real train set ({len(train)} images)", "real_train_diversity": real_div,
        "ipc": {},
    }
    for ipc in ipcs:
        drawn = records[net]["distilled"][ipc][0].get("indices")  # --pool: seed 0's draw
        d_idx = torch.tensor(drawn) if drawn is not None else per_class_indices(syn.labels, names, ipc, None, "")
        r_idx = torch.tensor(records[net]["random_real"][ipc][0]["indices"])
        out["ipc"][str(ipc)] = {
            "distilled": per_class_metrics(real, real_y, fake_all[d_idx], syn.labels[d_idx], names, ecfg.knn),
            "random_real": per_class_metrics(real, real_y, real[r_idx], real_y[r_idx], names, ecfg.knn),
        }
    return out
