"""Class-balanced sampling with classifier-free guidance over any diffusers scheduler.

Image i of class c starts from noise (and draws its ancestral noise) from its own generator seeded by
(seed, class name, i): any class or image can be regenerated alone, the set does not depend on the batch
size, and the first k images of a class are exactly what a run with IPC = k would make (from noise; modes are
k-means with k = the largest IPC, so with them the smaller IPCs of one run are its prefixes). Draw k ≥ 1 of
image i has a seed of its own (seed, class, i, k): with `sample.redraw` an image the generator check's
classifier rejects is drawn again; with `sample.candidates` = K every image is drawn K times and the classifier
keeps one (herding in its features, image by image: image i's pick depends on images 0..i−1 only, so the
prefixes hold). The manifest records the seed of the draw that was kept.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from diffdistill import distributed as dist
from diffdistill.autoencoders import build_decoder
from diffdistill.config import DEFAULT_SPACING, Config, SampleConfig, to_dict
from diffdistill.data.classes import condition_ids
from diffdistill.data.datasets import data_classes, to_uint8
from diffdistill.data.pixels import resize_uint8, to_unit
from diffdistill.diffusion import NoiseSchedule, make_scheduler, mode_guided_eps, noised_start
from diffdistill.errors import StageError
from diffdistill.files import atomic_write_bytes, atomic_write_json, check_output_free, replace_dir
from diffdistill.latents import RealLatents, cache_key
from diffdistill.models.classifiers import build_classifier
from diffdistill.models.dit import eps_prediction, learns_sigma, load_dit, null_class
from diffdistill.progress import progress
from diffdistill.runs import (
    CLASS_MEANS,
    JUDGE_OFF,
    check_classifier_file,
    judge_missing,
    judge_setting,
    model_source,
    samples_partial,
    stage_dir,
)
from diffdistill.runtime import (
    autocast,
    compiled,
    derive_seed,
    sample_batch,
    sample_batches,
    setup,
    write_run_info,
)
from diffdistill.select import herd_slots, herding, kmeans, nearest


def image_file(class_name: str, index: int) -> str:
    return f"{class_name}/{index:05d}.png"


def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, scale: float, channels: int | None) -> Tensor:
    """ε_u + s(ε_c − ε_u), on the first `channels` latent channels only if given (original DiT: 3)."""
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if channels is None:
        return guided
    return torch.cat([guided[:, :channels], eps_cond[:, channels:]], dim=1)


def start_step(steps: int, scfg: SampleConfig) -> int:
    """Index of the first sampling step run: 0 from noise; with a prototype start the last
    round(steps × prototype_strength) steps (at least one) are run, as img2img pipelines do."""
    if scfg.start == "noise":
        return 0
    return steps - max(1, round(steps * scfg.prototype_strength))


@torch.no_grad()
def sample_latents(model, scfg: SampleConfig, betas: Tensor, labels: Tensor, generators: list[torch.Generator],
                   latent_shape: tuple[int, int, int], device: torch.device, precision: str = "fp32",
                   data_range: float = 1.0, modes: Tensor | None = None) -> Tensor:
    """Latents [B, C, H, W] for model labels `labels` [B], one generator per image. A learned-sigma model's
    variance (of the conditional half, as in DiT) drives DDPM's noise; other samplers use ε̂ only.
    `sample.clip_denoised` clips x̂0 to [−data_range, data_range]. `modes` [B, C, H, W] (each image's own
    mode) are needed by mode guidance and the prototype start."""
    from diffusers.utils.torch_utils import randn_tensor

    channels = latent_shape[0]
    learned = learns_sigma(model) and scfg.scheduler == "ddpm"
    scheduler = make_scheduler(scfg.scheduler, betas, learned, scfg.timestep_spacing, scfg.ddpm_variance,
                               data_range if scfg.clip_denoised else None)
    scheduler.set_timesteps(scfg.steps)
    alpha_bar = torch.cumprod(1 - betas.double(), 0).float()  # ᾱ_t [T]
    first = start_step(len(scheduler.timesteps), scfg)
    timesteps = scheduler.timesteps[first:]
    if first and hasattr(scheduler, "set_begin_index"):  # multistep solvers count their steps from here
        scheduler.set_begin_index(first)
    guided = round(len(timesteps) * scfg.mode_guidance.stop) if scfg.mode_guidance.scale > 0 else 0
    prototype = scfg.start == "prototype"
    if (guided or prototype) and modes is None:
        raise ValueError("mode guidance and the prototype start need each image's mode")
    b = labels.shape[0]
    x = randn_tensor((b, *latent_shape), generator=generators, device=torch.device("cpu")).to(device)
    if prototype:  # [B, C, H, W] prototypes noised to the first step run (strength 1: the first step of all)
        x = noised_start(modes.to(device), x, alpha_bar[int(timesteps[0])])
    else:
        x = x * scheduler.init_noise_sigma
    guide = scfg.guidance != 1.0
    y = torch.cat([labels, torch.full_like(labels, null_class(model))]) if guide else labels
    y, on_device = y.to(device), timesteps.to(device)  # copied once, not at every step
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guide else x_in
        with autocast(device, precision):
            out = model(x_in, on_device[i].expand(x_in.shape[0]), y).sample
        out = out.float()  # [B or 2B, C or 2C, H, W]
        eps, var = eps_prediction(out, channels), out[:b, channels:]
        if guide:
            eps = guided_eps(*eps.chunk(2), scfg.guidance, scfg.guidance_channels)
        if i < guided:  # stop guidance: the last steps run unguided
            eps = mode_guided_eps(eps, x, modes.to(device), alpha_bar[int(t)], scfg.mode_guidance.scale)
        x = scheduler.step(torch.cat([eps, var], 1) if learned else eps, t, x, generator=generators).prev_sample
    return x


def sample_images(model, decoder, cfg: Config, labels: Tensor, generators: list[torch.Generator],
                  device: torch.device, modes: Tensor | None = None) -> Tensor:
    """uint8 images [B, C, H, W] on the CPU for model labels `labels` [B] with the run's sampler, decoded."""
    latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    betas = NoiseSchedule.from_config(cfg.diffusion).betas
    # pixel space: images in [−1, 1] times the identity autoencoder's scaling factor
    z = sample_latents(model, cfg.sample, betas, labels, generators, latent_shape, device, cfg.precision,
                       cfg.autoencoder.scaling_factor or 1.0, modes)
    return to_uint8(decoder.decode(z)).cpu()


class Judge:
    """The generator check's classifier (trained on the real train set) as `sample.redraw` and
    `sample.candidates` ask it: does it assign each generated image its class, with what probability, and
    where its features lie; beside it each real class's mean feature. Saved by `save`, read back by the
    constructor; the class list must match the run's."""

    def __init__(self, path: Path, scfg: SampleConfig, classes: list[str], device: torch.device) -> None:
        why = judge_missing(path, scfg)
        if why:
            key, value = judge_setting(scfg)
            raise StageError(f"{key}={value} needs the generator check's classifier {path}, which {why}: run "
                             f"`diffdistill check` with this config (pretrain.check_images > 0), or set "
                             f"{key}={JUDGE_OFF[key]}")
        with safe_open(path, "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if json.loads(meta["classes"]) != classes:
            raise StageError(f"{path} was trained on other classes than this run's; run `diffdistill check` again")
        self.size, self.device = int(meta["image_size"]), device
        self.mean, self.std = tensors.pop("mean").to(device), tensors.pop("std").to(device)
        self.class_means = tensors.pop(CLASS_MEANS, None)  # [classes, F] float64 on the CPU
        self.model = build_classifier(meta["net"], self.mean.shape[1], len(classes), self.size, int(meta["width"]),
                                      meta["norm"] or None).to(device).eval()
        self.model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()})

    @staticmethod
    def save(path: Path, model: torch.nn.Module, net: str, width: int, norm_layer: str | None, size: int,
             norm: tuple[Tensor, Tensor], classes: list[str], means: Tensor) -> None:
        """`means` [classes, F]: each real class's mean feature of `model`."""
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tensors.update(mean=norm[0].detach().cpu().contiguous(), std=norm[1].detach().cpu().contiguous())
        tensors[CLASS_MEANS] = means.double().cpu().contiguous()
        meta = {"net": net, "width": str(width), "norm": norm_layer or "", "image_size": str(size),
                "classes": json.dumps(classes)}
        atomic_write_bytes(path, safetensors_save(tensors, metadata=meta))

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 images [B, C, H, W] and their labels [B] -> (assigned [B] bool, own-class probability [B],
        penultimate features [B, F] float64), on the CPU."""
        x = (to_unit(resize_uint8(images.to(self.device), self.size)) - self.mean) / self.std
        feats = self.model.features(x).flatten(1)  # [B, F]
        probs = self.model.classifier(feats).float().softmax(1).cpu()  # [B, K]
        return probs.argmax(1) == labels, probs.gather(1, labels[:, None])[:, 0], feats.double().cpu()

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(assigned [B] bool, own-class probability [B]) of uint8 images [B, C, H, W] with labels [B]."""
        return self.score(images, labels)[:2]

    def choose(self, images: Tensor, jobs: list[tuple[int, int]], k: int) -> tuple[Tensor, list[dict]]:
        """`sample.candidates`: images [len(jobs) · k, C, H, W], the k draws of each job (class, index) in turn,
        jobs of a class in index order and starting at index 0 -> (the kept image of each job [len(jobs), C, H,
        W], a record per job: {kept: the draw kept, draws: k, assigned: whether the kept draw is assigned its
        class, assigned_draws: how many of its k draws are})."""
        labels = torch.tensor([c for c, _ in jobs]).repeat_interleave(k)
        parts = [self.score(x, y) for x, y in zip(images.split(JUDGE_BATCH), labels.split(JUDGE_BATCH))]
        ok, feats = torch.cat([p[0] for p in parts]), torch.cat([p[2] for p in parts])
        ok, feats = ok.view(len(jobs), k), feats.view(len(jobs), k, -1)  # [J, k], [J, k, F]
        picks = torch.zeros(len(jobs), dtype=torch.long)
        for c in dict.fromkeys(c for c, _ in jobs):
            rows = torch.tensor([n for n, (cls, _) in enumerate(jobs) if cls == c])
            picks[rows] = herd_slots(feats[rows], self.class_means[c], ok[rows])
        kept = images.view(len(jobs), k, *images.shape[1:])[torch.arange(len(jobs)), picks]
        return kept, [{"kept": int(p), "draws": k, "assigned": bool(row[p]), "assigned_draws": int(row.sum())}
                      for p, row in zip(picks, ok)]


def _sample_fitting(make: Callable[[list], Tensor], batch: list, fits: list[int]) -> Tensor:
    """make(batch) in chunks of at most fits[0] images; a chunk that runs out of GPU memory is tried again at
    half the size, and fits[0] keeps the size that fit for the batches after it (each image has its own
    generator: the same images whatever the chunks)."""
    out, lo = [], 0
    while lo < len(batch):
        chunk = batch[lo : lo + fits[0]]
        try:
            out.append(make(chunk))
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise
        else:
            lo += len(chunk)
            continue
        torch.cuda.empty_cache()  # outside the handler: the failed attempt's tensors are freed by now
        fits[0] = len(chunk) // 2
        print(f"sample: a batch of {len(chunk)} images does not fit in GPU memory; sampling {fits[0]} at a time "
              f"(set sample.batch_size={fits[0]} to start there)", flush=True)
    return torch.cat(out)


def needs_modes(scfg: SampleConfig) -> bool:
    return scfg.mode_guidance.scale > 0 or scfg.start == "prototype"


class Modes:
    """Per class the k-means centroids (k = the IPC made, k-means++ start seeded by (seed, class)) of its
    real latents, or with `sample.prototype: medoid` for each centroid in k-means' order the nearest real latent
    not taken by an earlier one; in herding order, image i of a class gets mode i. Computed when a batch first
    needs the class."""

    def __init__(self, cfg: Config, classes: list[str], k: int, device: torch.device) -> None:
        self.real, self.cfg, self.classes, self.k = RealLatents(cfg, device), cfg, classes, k
        self.cached: dict[int, Tensor] = {}

    def of_class(self, c: int) -> Tensor:
        if c not in self.cached:
            z = self.real.of_class(c)  # [n, C, H, W]
            if len(z) < self.k:
                raise StageError(f"sample: class {self.classes[c]} has {len(z)} real images; {self.k} modes "
                                 f"(IPC {self.k}) need at least {self.k}")
            points = z.flatten(1)  # [n, D]
            modes, _ = kmeans(points, self.k, derive_seed(self.cfg.seed, "modes", self.classes[c]))  # [k, D]
            if self.cfg.sample.prototype == "medoid":
                modes = points[nearest(points, modes)]
            # herding order: the first j modes track the class mean, so a smaller IPC (a prefix) still covers
            # the class (IPC 1 gets the mode nearest the mean, not k-means++'s random first pick)
            modes = modes[herding(modes, self.k, target=points.mean(0))]
            if len(self.cached) > 1:  # batches run class by class: keep the last two
                self.cached.pop(next(iter(self.cached)))
            self.cached[c] = modes.view(self.k, *z.shape[1:])  # [k, C, H, W]
        return self.cached[c]

    def batch(self, jobs: list[tuple[int, int]]) -> Tensor:
        return torch.stack([self.of_class(c)[i] for c, i in jobs])  # [B, C, H, W]


def sample_stage(cfg: Config, force: bool = False) -> Path:
    """Write max(sample.ipc) PNGs per class under <run>/samples/<class>/ plus manifest.json.

    Work happens in <run>/.samples.partial/, which survives an interruption: a rerun with the same sampling
    settings skips the batches whose images all exist. Batches are cut from the global image list (whole
    classes with `sample.candidates`; runtime.sample_batches) and dealt to torchrun ranks round-robin, so every
    image is computed in the same batch whatever the number of processes and the set is identical for any
    world size."""
    scfg = cfg.sample
    device = dist.init(setup(cfg))
    final = stage_dir(cfg.run_dir, "sample")
    check_output_free(final, force)
    source = model_source(cfg.run_dir, scfg.checkpoint, scfg.weights)
    classes = data_classes(cfg.data)
    cond, _ = condition_ids(classes, cfg.model.class_ids)
    ipc = max(scfg.ipc)
    work = samples_partial(cfg.run_dir)
    full = to_dict(cfg)
    spec = {"checkpoint": source, "checkpoint_files": _fingerprint(source), "sample": full["sample"],
            "seed": cfg.seed, "classes": classes, "class_ids": cfg.model.class_ids,
            "autoencoder": full["autoencoder"], "diffusion": full["diffusion"], "precision": cfg.precision}
    if scfg.judged:  # another judge keeps other draws
        spec["judge_files"] = _fingerprint(str(check_classifier_file(cfg.run_dir)))
    if needs_modes(scfg):  # the modes come from the real train set: another set, other images
        spec["modes_from"] = cache_key(cfg)
        spec["modes_order"] = "herding"  # image i gets mode i: an older order made other images
    if dist.is_main():
        _open_work_dir(work, spec, classes)
    dist.barrier()
    model = compiled(load_dit(source, key="sample.checkpoint").to(device).eval(), cfg)
    ae = build_decoder(cfg.autoencoder).to(device)
    modes = Modes(cfg, classes, ipc, device) if needs_modes(scfg) else None
    jobs = [(c, i) for c in range(len(classes)) for i in range(ipc)]
    seeds = {job: derive_seed(cfg.seed, "sample", classes[job[0]], job[1]) for job in jobs}
    size = sample_batch(scfg.batch_size, device)
    fits = [size]  # the images per forward that fit in memory (lowered on an out-of-memory error)
    draws = scfg.candidates
    batches = sample_batches(len(classes), ipc, draws, size)
    mine = [b for n, b in enumerate(batches) if n % dist.world_size() == dist.rank()
            and not all((work / image_file(classes[c], i)).is_file() for c, i in b)]
    bar = progress(total=sum(map(len, mine)), desc="sample", unit="img", disable=not dist.is_main())
    judge = Judge(check_classifier_file(cfg.run_dir), scfg, classes, device) if scfg.judged else None
    if judge and dist.is_main():
        (work / CHOICES).mkdir(exist_ok=True)
    dist.barrier()

    def draw(part: list[tuple[tuple[int, int], int]], part_modes: Tensor | None) -> Tensor:
        """images of the draws `part`, pairs (job, draw number) (their modes `part_modes` [len(part), C, H, W])"""
        row = {pair: k for k, pair in enumerate(part)}
        return _sample_fitting(lambda chunk: sample_images(
            model, ae, cfg, torch.tensor([cond[c] for (c, _), _ in chunk]),
            [torch.Generator().manual_seed(draw_seed(job, k)) for job, k in chunk], device,
            None if part_modes is None else part_modes[[row[pair] for pair in chunk]]), part, fits)

    def draw_seed(job: tuple[int, int], attempt: int) -> int:
        """draw 0 is the image's own seed; draw k ≥ 1 (a redraw or a candidate) has one of its own"""
        return seeds[job] if attempt == 0 else derive_seed(cfg.seed, "sample", classes[job[0]], job[1], "redraw",
                                                           attempt)

    # PNG encoding runs in threads while the device samples the next batch; one batch of writes in flight
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending: list[Future] = []
        for batch in mine:
            batch_modes = modes.batch(batch) if modes else None  # once per batch: redraws reuse them
            files = [image_file(classes[c], i) for c, i in batch]
            if draws > 1:  # every image drawn `draws` times; the judge keeps one (see SampleConfig.candidates)
                every = draw([(job, k) for job in batch for k in range(draws)],
                             None if batch_modes is None else batch_modes.repeat_interleave(draws, 0))
                images, kept = judge.choose(every, batch, draws)
                atomic_write_json(work / CHOICES / f"{batch[0][0]}-{batch[0][1]}.json", dict(zip(files, kept)))
            else:
                images = draw([(job, 0) for job in batch], batch_modes)
            if scfg.redraw:  # redraw the images the classifier assigns to another class (see SampleConfig.redraw)
                labels = torch.tensor([c for c, _ in batch])
                records = {f: {"kept": 0, "draws": 1} for f in files}  # kept: the draw kept, 0 = the first
                ok, best = judge(images, labels)
                for attempt in range(1, scfg.redraw + 1):
                    redo = (~ok).nonzero()[:, 0]
                    if len(redo) == 0:
                        break
                    again = draw([(batch[k], attempt) for k in redo.tolist()],
                                 None if batch_modes is None else batch_modes[redo])
                    ok_again, prob = judge(again, labels[redo])
                    better = ok_again | (prob > best[redo])  # assigned, or closer to it than any earlier draw
                    for j, (k, take) in enumerate(zip(redo.tolist(), better.tolist())):
                        records[files[k]]["draws"] = attempt + 1
                        if take:
                            images[k], best[k], ok[k] = again[j], prob[j], ok_again[j]
                            records[files[k]]["kept"] = attempt
                for f, assigned in zip(files, ok.tolist()):
                    records[f]["assigned"] = assigned
                atomic_write_json(work / CHOICES / f"{batch[0][0]}-{batch[0][1]}.json", records)
            for future in pending:
                future.result()
            pending = [pool.submit(save_png, hwc(img), work / image_file(classes[c], i))
                       for (c, i), img in zip(batch, images)]
            bar.update(len(batch))
        for future in pending:
            future.result()
    bar.close()
    dist.barrier()
    if dist.is_main():
        missing = [image_file(classes[c], i) for c, i in jobs if not (work / image_file(classes[c], i)).is_file()]
        if missing:
            raise StageError(f"sample: {len(missing)} images were not written (first: {work / missing[0]})")
        judged = {}  # the judge's records of every batch, this rank's and the others'
        for f in sorted((work / CHOICES).glob("*.json")) if scfg.judged else []:
            judged.update(json.loads(f.read_text()))
        lost = [image_file(classes[c], i) for c, i in jobs if scfg.judged and image_file(classes[c], i) not in judged]
        if lost:
            raise StageError(f"sample: {len(lost)} images have no record of their draws in {work / CHOICES} (first: "
                             f"{lost[0]}); run `diffdistill sample --force`")
        choice = "redraw" if scfg.redraw else "candidates"  # the manifest's key for the judge's record
        records = []
        for c, i in jobs:
            record = {"file": image_file(classes[c], i), "class": classes[c], "label": c, "condition_id": cond[c],
                      "index": i, "seed": draw_seed((c, i), judged.get(image_file(classes[c], i), {}).get("kept", 0))}
            if scfg.judged:
                record[choice] = judged[image_file(classes[c], i)]
            records.append(record)
        atomic_write_json(work / "manifest.json", {
            "checkpoint": source, "weights": scfg.weights, "classes": classes, "ipc": ipc,
            "sampler": {"scheduler": scfg.scheduler, "steps": scfg.steps, "guidance": scfg.guidance,
                        "guidance_channels": scfg.guidance_channels, "ddpm_variance": scfg.ddpm_variance,
                        "timestep_spacing": scfg.timestep_spacing or DEFAULT_SPACING[scfg.scheduler],
                        "clip_denoised": scfg.clip_denoised, "learned_sigma": learns_sigma(model),
                        "mode_guidance": full["sample"]["mode_guidance"], "start": scfg.start,
                        "prototype_strength": scfg.prototype_strength, "candidates": scfg.candidates,
                        "modes": f"k-means (k = {ipc}) of each class's real latents, {scfg.prototype}s "
                                 f"({modes.real.source})" if modes else None},
            "images": records,
        })
        (work / SPEC_FILE).unlink()
        shutil.rmtree(work / CHOICES, ignore_errors=True)
        for tmp in work.glob("*/.*.tmp"):  # left by an interrupted run
            tmp.unlink()
        summary = {}
        if scfg.redraw:  # how often the classifier disagreed, for the report and the reader
            summary["redraw"] = {"redrawn": sum(r["redraw"]["draws"] > 1 for r in records),
                                 "replaced": sum(r["redraw"]["kept"] > 0 for r in records),  # a later draw kept
                                 "assigned": sum(r["redraw"]["assigned"] for r in records), "of": len(records)}
        if draws > 1:  # how the judge chose, for the report: all draws assigned = the generator's own fidelity
            summary["candidates"] = {"draws": draws, "first_kept": sum(r["candidates"]["kept"] == 0 for r in records),
                                     "assigned": sum(r["candidates"]["assigned"] for r in records),
                                     "assigned_draws": sum(r["candidates"]["assigned_draws"] for r in records),
                                     "of": len(records)}
        write_run_info(work, cfg, "sample", {"checkpoint": source, "num_images": len(records),
                                             "world_size": dist.world_size(), **summary})
        replace_dir(work, final)
    dist.barrier()
    return final


JUDGE_BATCH = 256  # images per judge forward when it chooses among candidates (a class's draws can be many)
SPEC_FILE = ".spec.json"  # what the partial folder's images were made with
CHOICES = ".choices"  # in the partial folder: each batch's records of the judge's choices, into manifest.json


def _fingerprint(source: str) -> list:
    """(file, size, mtime) of a local model folder: a retrained checkpoint invalidates partial samples."""
    root = Path(source)
    files = sorted(root.rglob("*")) if root.is_dir() else [root] if root.is_file() else []
    return [[str(f.relative_to(root) if root.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns]
            for f in files if f.is_file()]


def _open_work_dir(work: Path, spec: dict, classes: list[str]) -> None:
    """Create the partial folder, or keep it if it was made with the same settings (resume)."""
    spec_file = work / SPEC_FILE
    if work.is_dir():
        old = json.loads(spec_file.read_text()) if spec_file.is_file() else None
        if old == spec:
            done = sum(1 for _ in work.glob("*/*.png"))
            print(f"sample: resuming in {work} ({done} images already there)", flush=True)
            return
        print(f"sample: {work} holds images made with other settings; starting over", flush=True)
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True)
        for c in classes:
            (work / c).mkdir()
    except OSError as err:
        raise StageError(f"cannot write the sample folder {work}: {err.strerror or err}") from None
    atomic_write_json(spec_file, spec)


def hwc(img: Tensor):
    """uint8 [C, H, W] -> the array PIL takes: [H, W] for one channel, [H, W, C] otherwise."""
    arr = img.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_png(arr, path: Path) -> None:
    """A PNG written to a temp name and renamed: an interruption never leaves a truncated image."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
