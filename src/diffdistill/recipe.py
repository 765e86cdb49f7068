"""The `auto` values: budgets that size themselves to the data (configs/own-data.yaml).

`resolve` is pure (numbers in, a config with numbers and the reasons out); `data_facts` is the one place that
looks at the data, and it only lists files (plus a peek at a few of them for the channel count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from diffdistill.config import AUTO, Config, ConfigError
from diffdistill.data.datasets import train_counts
from diffdistill.models.dit import SIZES

# pretrain.steps: enough passes over the data, within a floor and a ceiling that bound a CPU run; the generator
# check there says whether pretraining goes on
EPOCHS = 200
STEP_FLOOR, STEP_CEILING = 2000, 20000
# pretrain.max_steps: how far pretraining may go on while the generator check is below its goal: twice the steps,
# or, where many classes have few images each, twice enough steps per class (480: the demo's 4,800 steps of 64 on
# 1,437 digits of 10 classes, 214 epochs, which an earlier rule took as a floor of pretrain.steps)
MAX_STEPS_FACTOR = 2
STEPS_PER_CLASS = 480
# model.size: the tiny DiT while a token carries few values; a wider one for RGB tokens
TOKEN_VALUES_TINY = 64
SIZE_NARROW, SIZE_WIDE = "tiny", "small"
PATCH = SIZES[SIZE_NARROW]["patch_size"]  # the same for both (checked by the tests)
MIN_LATENT_SIDE = 8  # pixel-unshuffle: the latent side stays >= max(8, image_size / 4)


@dataclass(frozen=True)
class DataFacts:
    images: int  # in the train set
    classes: int
    image_size: int
    channels: int


def has_auto(cfg: Config) -> bool:
    return AUTO in (cfg.pretrain.steps, cfg.pretrain.max_steps, cfg.finetune.steps, cfg.model.size,
                    cfg.autoencoder.unshuffle)


def data_facts(cfg: Config) -> DataFacts:
    """The numbers the auto rules read: listed, not decoded (channels: `data.channels`, else a peek)."""
    counts, channels = train_counts(cfg.data)
    return DataFacts(sum(counts.values()), len(counts), cfg.data.image_size, channels)


def unshuffle_factor(image_size: int) -> tuple[int, str]:
    """The largest factor that keeps an even latent side of at least max(8, image_size / 4)."""
    least = max(MIN_LATENT_SIDE, image_size // 4)
    fits = [f for f in range(1, image_size + 1)
            if image_size % f == 0 and image_size // f >= least and (image_size // f) % PATCH == 0]
    if not fits:
        raise ConfigError(f"autoencoder.unshuffle auto: data.image_size {image_size} has no pixel-unshuffle "
                          f"factor that leaves an even latent side >= {least}; set data.image_size to a "
                          "multiple of 16 (images are resized) or autoencoder.unshuffle to a number")
    f = max(fits)
    side = image_size // f
    return f, f"{image_size} px -> {side}x{side} latent ({(side // PATCH) ** 2} tokens)"


def model_size(latent_channels: int) -> tuple[str, str]:
    values = latent_channels * PATCH * PATCH
    size = SIZE_NARROW if values <= TOKEN_VALUES_TINY else SIZE_WIDE
    return size, f"{latent_channels} latent channels x {PATCH}x{PATCH} patch = {values} values per token"


def pretrain_steps(images: int, batch_size: int) -> tuple[int, str]:
    steps = min(STEP_CEILING, max(STEP_FLOOR, 100 * math.ceil(EPOCHS * images / batch_size / 100)))
    return steps, f"{EPOCHS} epochs of {images} images at batch {batch_size}, within [{STEP_FLOOR}, {STEP_CEILING}]"


def max_pretrain_steps(steps: int, classes: int | None) -> tuple[int, str]:
    """How far the checks on the way may take pretraining: twice the steps, or where the steps were auto
    (`classes` given), twice 480 steps per class if that is more: a set of many small classes gets room by its
    classes (scenes100: 100 classes of 40 images, 12,500 steps, up to 40,000). A number set for pretrain.steps
    keeps twice itself (a short trial run stays short)."""
    why = "reached only while the generator checks on the way are below their goal"
    if classes is None:
        return MAX_STEPS_FACTOR * steps, f"{MAX_STEPS_FACTOR} x pretrain.steps, {why}"
    by_classes = min(STEP_CEILING, STEPS_PER_CLASS * classes)
    return MAX_STEPS_FACTOR * max(steps, by_classes), (
        f"{MAX_STEPS_FACTOR} x max(pretrain.steps, min({STEP_CEILING}, {STEPS_PER_CLASS} x {classes} classes) = "
        f"{by_classes}), {why}")


def resolve(cfg: Config, facts: DataFacts) -> Config:
    """`cfg` with every auto value replaced by the number the rules choose; `cfg.auto` says what and why."""
    if cfg.finetune.steps == AUTO:
        raise ConfigError("config key 'finetune.steps': auto is for pretrain.steps only; set a number")
    chosen: list[tuple[str, str]] = []
    ae = cfg.autoencoder
    if ae.unshuffle == AUTO:
        if ae.kind != "identity":
            raise ConfigError("config key 'autoencoder.unshuffle': auto is for the identity autoencoder only")
        factor, why = unshuffle_factor(facts.image_size)
        ae = dataclasses.replace(ae, unshuffle=factor)
        chosen.append(("autoencoder.unshuffle", f"{factor}: {why}"))
    model = cfg.model
    if model.size == AUTO:
        if ae.kind != "identity":
            raise ConfigError("config key 'model.size': auto is for the identity autoencoder (small images); "
                              "choose a DiT size, e.g. DiT-XL/2")
        size, why = model_size(facts.channels * ae.unshuffle ** 2)
        model = dataclasses.replace(model, size=size)
        chosen.append(("model.size", f"{size}: {why}"))
    pretrain = cfg.pretrain
    steps_auto = pretrain.steps == AUTO
    if steps_auto:
        steps, why = pretrain_steps(facts.images, pretrain.batch_size)
        pretrain = dataclasses.replace(pretrain, steps=steps)
        chosen.append(("pretrain.steps", f"{steps}: {why}"))
    if pretrain.max_steps == AUTO:
        why_not = {"pretrain.steps is 0": pretrain.steps == 0, "pretrain.check_images is 0": not pretrain.check_images,
                   "evaluate.full is false": not cfg.evaluate.full}  # the check needs a full-data classifier
        off = next((why for why, holds in why_not.items() if holds), None)
        most, why = (0, f"no generator check to go on by ({off})") if off else \
            max_pretrain_steps(pretrain.steps, facts.classes if steps_auto else None)
        pretrain = dataclasses.replace(pretrain, max_steps=most)
        chosen.append(("pretrain.max_steps", f"{most}: {why}"))
    elif 0 < pretrain.max_steps < pretrain.steps:
        raise ConfigError(f"config key 'pretrain.max_steps': expected 0, auto or at least pretrain.steps "
                          f"({pretrain.steps}), got {pretrain.max_steps}")
    return dataclasses.replace(cfg, autoencoder=ae, model=model, pretrain=pretrain, auto=cfg.auto + tuple(chosen))


def resolve_config(cfg: Config) -> Config:
    """`resolve` against the config's own data; a config without auto values is returned as it is."""
    return resolve(cfg, data_facts(cfg)) if has_auto(cfg) else cfg


def describe(cfg: Config) -> list[str]:
    """One line per auto value, for the terminal."""
    return [f"auto: {key} = {why}" for key, why in cfg.auto]

