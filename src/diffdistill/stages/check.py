"""`diffdistill check`: is the pretrained generator good enough to distill from?

Right after pretraining (before fine-tuning and sampling are spent on it), sample `pretrain.check_images`
images per class from the pretrained EMA model with the run's sampler (from noise), train the first evaluation net on
the real train set (the full-data recipe, `evaluate.full_epochs`), and report the share of generated images
it assigns to their class: a fidelity estimate on a small sample. The result goes to
<run>/pretrain/check.json and to the terminal, with a hint when it is below the report's fidelity goal; the
classifier is kept (<run>/pretrain/check-classifier.safetensors) with each real class's mean feature:
`sample.redraw` and `sample.candidates` judge samples by it. Where pretraining checked itself on the way
(pretrain.max_steps), it trained the same classifier (same settings, seed and pixels) and kept it in
pretrain/probe-classifier.safetensors: the check takes that one instead of training it again.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from diffdistill import distributed as dist
from diffdistill.autoencoders import build_decoder
from diffdistill.config import Config, to_dict
from diffdistill.data.classes import condition_ids
from diffdistill.data.datasets import ImageSet, load_data
from diffdistill.data.pixels import channel_stats, pixel_sha256
from diffdistill.errors import StageError
from diffdistill.files import atomic_write_bytes, atomic_write_json
from diffdistill.metrics import FIDELITY_GOAL, fidelity_goal
from diffdistill.models.classifiers import build_classifier
from diffdistill.models.dit import load_dit
from diffdistill.runs import (
    PROBE_CLASSIFIER,
    check_classifier_file,
    generator_check_file,
    input_tokens,
    judge_settings,
    model_source,
    probe_classifier_file,
    stage_dir,
)
from diffdistill.runtime import derive_seed, package_versions, sample_batch, setup
from diffdistill.stages.evaluate import accuracy, class_means, on_device, train_classifier
from diffdistill.stages.report import goal_text
from diffdistill.stages.sample import Judge, sample_images


@torch.no_grad()
def _generate(cfg: Config, model, classes: list[str], per_class: int, device: torch.device) -> ImageSet:
    """`per_class` images of each class from the DiT `model`, uint8 at data.image_size: the run's sampler from
    pure noise, without mode guidance (a prototype start or modes would lend the generator the real images they
    come from)."""
    plain = replace(cfg.sample, start="noise", mode_guidance=replace(cfg.sample.mode_guidance, scale=0.0))
    cfg = replace(cfg, sample=plain)
    decoder = build_decoder(cfg.autoencoder).to(device)
    cond, _ = condition_ids(classes, cfg.model.class_ids)
    jobs = [(c, i) for c in range(len(classes)) for i in range(per_class)]
    images = []
    size = sample_batch(cfg.sample.batch_size, device)
    for lo in range(0, len(jobs), size):
        batch = jobs[lo : lo + size]
        generators = [torch.Generator().manual_seed(derive_seed(cfg.seed, "check", classes[c], i)) for c, i in batch]
        images.append(sample_images(model, decoder, cfg, torch.tensor([cond[c] for c, _ in batch]), generators,
                                    device))
    return ImageSet(torch.cat(images), torch.tensor([c for c, _ in jobs]), classes)


def _train_judge(cfg: Config, real_xy, generated: ImageSet, norm, num_classes: int):
    """The check's classifier: the first evaluation net on the real train set (the full-data recipe, the check's
    seed); `generated` is its validation set (read, never trained on)."""
    ecfg = cfg.evaluate
    size = ecfg.image_size or cfg.data.image_size
    return train_classifier(ecfg.nets[0], *real_xy, *on_device(generated, size, real_xy[1].device), norm,
                            num_classes, ecfg.full_epochs, derive_seed(cfg.seed, "check", "classifier"), ecfg,
                            cfg.data.hflip)


def _judge_key(cfg: Config, train, device: torch.device) -> str:
    """What the check's classifier is made from: its settings, the real train set's pixels, and what trains it
    (the code's and torch's versions, the device type, torch's threads)."""
    versions = package_versions()
    return json.dumps({"settings": judge_settings(cfg), "train_sha256": pixel_sha256(train),
                       "versions": [versions["diffdistill"], versions["torch"]], "device": device.type,
                       "threads": torch.get_num_threads()}, sort_keys=True)


def _kept_judge(cfg: Config, train, device: torch.device):
    """The classifier the checks on the way kept (`FidelityProbe.keep`), if it was made from what this check's
    would be (`_judge_key`: the train set is hashed only when there is such a file); else None."""
    path = probe_classifier_file(cfg.run_dir)
    if not path.is_file():
        return None
    ecfg = cfg.evaluate
    try:
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") != _judge_key(cfg, train, device):
                return None
            state = {k: f.get_tensor(k) for k in f.keys()}
        model = build_classifier(ecfg.nets[0], train.channels, len(train.classes),
                                 ecfg.image_size or cfg.data.image_size, ecfg.width, ecfg.norm)
        model.load_state_dict(state)
    except (OSError, RuntimeError, ValueError) as e:  # unreadable or another architecture: train one instead
        print(f"generator check: not reusing {path} ({e.__class__.__name__}); training its classifier", flush=True)
        return None
    return model.to(device).eval()


def _trained_steps(cfg: Config) -> int:
    """The steps pretraining ran: pretrain.steps, or more where the checks on the way made it go on."""
    info = stage_dir(cfg.run_dir, "pretrain") / "run_info.json"
    return json.loads(info.read_text()).get("steps", cfg.pretrain.steps) if info.is_file() else cfg.pretrain.steps


class FidelityProbe:
    """The generator check on the way (`pretrain.max_steps`): the share (%) of a model's check samples (the
    check's seeds, from noise) that the check's classifier assigns their class. The classifier is trained at the
    first call (it then scores what the check will find, from the same seeds) and kept for the later ones; its
    accuracy on real val images (where data.val is given) caps the goal (`fidelity_goal`), as the check's."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.judge, self.key, self.goal = cfg, None, "", FIDELITY_GOAL

    def __call__(self, model) -> float:
        cfg = self.cfg
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):  # training goes on with the random state it had
            if self.judge is None:
                train, val = load_data(cfg.data, need_val=cfg.data.val is not None)
                self.classes = train.classes
                self.size = cfg.evaluate.image_size or cfg.data.image_size
                self.norm = channel_stats(train, self.size, device)
                self.key = _judge_key(cfg, train, device) if dist.is_main() else ""  # only rank 0 keeps it
            generated = _generate(self.cfg, model.eval(), self.classes, cfg.pretrain.check_images, device)
            if self.judge is None:
                self.judge = _train_judge(cfg, on_device(train, self.size, device), generated, self.norm,
                                          len(self.classes)).model
                if val is not None:
                    real = accuracy(self.judge, *on_device(val, self.size, device), self.norm)
                    self.goal = fidelity_goal(real)
                    if self.goal < FIDELITY_GOAL and dist.is_main():
                        print(f"generator checks on the way: their classifier scores {real:.1f} % on real val "
                              f"images, so the goal is {real:.1f} % instead of {FIDELITY_GOAL:.0f} %", flush=True)
            return accuracy(self.judge, *on_device(generated, self.size, device), self.norm)

    def keep(self, folder: Path) -> None:
        """Save the classifier, if a check trained it, into pretraining's output `folder` (not yet in place), for
        the check after pretraining (`_kept_judge`)."""
        if self.judge is None or not self.key:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in self.judge.state_dict().items()}
        try:
            atomic_write_bytes(folder / PROBE_CLASSIFIER, safetensors_save(state, metadata={"key": self.key}))
        except OSError as e:  # an optional file: the finished pretraining matters more
            print(f"pretrain: could not keep the check's classifier ({e}); the check will train it again", flush=True)


def generator_check(cfg: Config) -> Path:
    """Write <run>/pretrain/check.json (see the module doc) and print its line; returns the file."""
    per_class = cfg.pretrain.check_images
    if per_class <= 0:
        raise StageError("pretrain.check_images is 0: nothing to check (set it to e.g. 10)")
    out = generator_check_file(cfg.run_dir)
    model = model_source(cfg.run_dir, "pretrain")  # no pretrained model: say so before reading any data
    if not dist.is_main():  # under torchrun one process checks; the others go on to the next stage
        return out
    device, ecfg, t0 = setup(cfg), cfg.evaluate, time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the stages after this one see the random state they always saw
        train, val = load_data(cfg.data, need_val=True)
        dit = load_dit(model, key="pretrain").to(device).eval()
        generated = _generate(cfg, dit, train.classes, per_class, device)
        size, net = ecfg.image_size or cfg.data.image_size, ecfg.nets[0]
        norm = channel_stats(train, size, device)
        real_xy = on_device(train, size, device)
        judge = _kept_judge(cfg, train, device)
        reused = judge is not None
        if reused:  # the checks on the way trained this very classifier
            fidelity = accuracy(judge, *on_device(generated, size, device), norm)
        else:
            res = _train_judge(cfg, real_xy, generated, norm, len(train.classes))
            judge, fidelity = res.model, res.final
        real = accuracy(judge, *on_device(val, size, device), norm)  # how far the judge itself can be trusted
        means = class_means(judge, *real_xy, norm, len(train.classes))  # candidates' aim
        Judge.save(check_classifier_file(cfg.run_dir), judge, net, ecfg.width, ecfg.norm, size, norm,
                   train.classes, means)  # sample.redraw and sample.candidates judge by it
    goal = fidelity_goal(real)
    trained = _trained_steps(cfg)
    went_on = f" or pretrain.max_steps (now {cfg.pretrain.max_steps}; pretraining went on to {trained} steps)" \
        if trained != cfg.pretrain.steps else ""
    hint = ""
    if fidelity < goal:
        hint = (f"; below {goal_text(goal)}: the generator underfits — raise pretrain.steps (now "
                f"{cfg.pretrain.steps}){went_on} or model.size (now {cfg.model.size}) before distilling")
    elif fidelity < FIDELITY_GOAL:  # the goal was lowered to the classifier's own accuracy, and is met
        hint = (f"; below {FIDELITY_GOAL:.0f} %, but not below the classifier's own {real:.1f} % on real val images: "
                "the check sees no shortfall")
    line = (f"generator check: {fidelity:.1f} % of {len(generated)} images sampled after pretraining are assigned "
            f"their class by a {net} trained on the real train set (which scores {real:.1f} % on real val "
            f"images){hint}")
    atomic_write_json(out, {
        "fidelity": fidelity, "classifier_val_accuracy": real, "goal": goal,
        "images_per_class": per_class, "num_images": len(generated),
        "classifier": f"{net}, {ecfg.full_epochs} epochs on the real train set",
        "classifier_from": f"the checks on the way ({PROBE_CLASSIFIER})" if reused else "trained here",
        "sampler": {"scheduler": cfg.sample.scheduler, "steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
                    "clip_denoised": cfg.sample.clip_denoised},
        "seconds": round(time.perf_counter() - t0, 1),
        "config": to_dict(cfg),  # what `run --resume` compares (runs.changed_settings, runs.remade_inputs)
        "made": uuid.uuid4().hex, "reads": input_tokens(cfg, "check")})
    print(line, flush=True)
    return out
