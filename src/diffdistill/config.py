"""One frozen config tree for every stage: YAML file + dotted `key=value` overrides.

Unknown keys and wrong types are rejected with one line that names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# Each numeric key carries its range check beside it, as field metadata: (test, what is expected).
def _check(test: typing.Callable[[Any], bool], expected: str) -> dict:
    return {"check": (test, expected)}


POSITIVE = _check(lambda v: v > 0, "a positive number")
NON_NEGATIVE = _check(lambda v: v >= 0, "a number >= 0")
POSITIVE_OR_NULL = _check(lambda v: v is None or v > 0, "a positive number or null")
NON_NEGATIVE_OR_NULL = _check(lambda v: v is None or v >= 0, "a number >= 0 or null")
PROBABILITY = _check(lambda v: 0 <= v <= 1, "a number in [0, 1]")
BELOW_ONE = _check(lambda v: 0 <= v < 1, "a number in [0, 1)")
IPC_LIST = _check(lambda v: len(v) > 0 and all(i > 0 for i in v), "a non-empty list of positive integers")
AUTO = "auto"  # keys that accept it are sized from the data by diffdistill.recipe before any stage runs


def _num(default: Any, check: dict) -> Any:
    return field(default=default, metadata=check)


@dataclass(frozen=True)
class DataConfig:
    builtin: Literal["digits"] | None = "digits"  # used when `train` is not set (null: `train` must be set)
    train: str | None = None  # folder of class subfolders of images
    val: str | None = None  # same layout; for digits a seeded split is used instead
    # ImageNet val layout: `val` is a flat folder and this file maps image -> wnid, one per line
    # ("ILSVRC2012_val_00000001.JPEG n01751748", or the CSV "ImageId,PredictionString" of LOC_val_solution.csv)
    val_labels: str | None = None
    classes: str | tuple[str, ...] | None = None  # preset name, list of class names, or all
    image_size: int = _num(16, POSITIVE)
    # 1 or 3; None: 1 if every image is grayscale, else 3
    channels: int | None = _num(None, _check(lambda v: v is None or v in (1, 3), "1, 3 or null"))
    hflip: bool = True  # is a horizontal flip label-preserving for this data?
    val_fraction: float = _num(0.2, _check(lambda v: 0 < v < 1, "a number in (0, 1)"))  # builtin datasets only
    split_seed: int = _num(0, NON_NEGATIVE)  # builtin datasets only


@dataclass(frozen=True)
class AutoencoderConfig:
    kind: Literal["identity", "kl"] = "identity"
    # identity only: pixel-unshuffle factor (16 px gray, 2 -> 4x8x8 latent)
    # auto: the factor that makes the latent about 8×8 (diffdistill.recipe)
    unshuffle: int | Literal["auto"] = _num(1, _check(lambda v: v == AUTO or v >= 1, "an integer >= 1 or auto"))
    pretrained: str | None = None  # kl only: hub id or local folder (diffusers layout)
    subfolder: str | None = "vae"
    revision: str | None = None
    scaling_factor: float | None = _num(None, POSITIVE_OR_NULL)  # None: the VAE's own config value (identity: 1)
    # kl only: another VAE with the same latent space for decoding samples (the paper encodes with the SD
    # "ft-ema" VAE and decodes with "ft-mse"); None: decode with `pretrained`
    decoder: str | None = None
    decoder_subfolder: str | None = None
    decoder_revision: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    size: str = "tiny"  # a key of diffdistill.models.dit.SIZES, or auto (by resolution and channels)
    class_ids: Literal["local", "imagenet"] = "local"  # condition on 0..C-1 or on ImageNet-1K ids
    class_dropout: float = _num(0.1, BELOW_ONE)  # label dropout for classifier-free guidance, once per sample
    # new models only (a loaded model keeps its own): also predict the variance (DiT's 2C output channels),
    # trained with the hybrid loss MSE(ε̂, ε) + variational bound
    learn_sigma: bool = False


@dataclass(frozen=True)
class DiffusionConfig:
    train_steps: int = _num(1000, _check(lambda v: v > 1, "an integer > 1"))
    schedule: Literal["linear", "cosine"] = "linear"
    # linear schedule only (cosine is parameter-free); beta_start < beta_end is checked too
    beta_start: float = _num(1e-4, _check(lambda v: 0 < v < 1, "a number in (0, 1)"))
    beta_end: float = _num(0.02, _check(lambda v: 0 < v < 1, "a number in (0, 1)"))


@dataclass(frozen=True)
class MemoryConfig:
    policy: Literal["adaptive", "fifo", "none"] = "adaptive"
    size_real: int = _num(64, POSITIVE)  # N_R
    size_gen: int = _num(64, POSITIVE)  # N_G
    lambda_real: float = _num(0.002, NON_NEGATIVE)
    lambda_gen: float = _num(0.008, NON_NEGATIVE)
    # "per_class": Σ_c a_c as the paper writes it; "authors": the released code's running-sum weighting.
    loss_accumulation: Literal["per_class", "authors"] = "per_class"
    # storage of the banks; float16 halves their size (1000 classes × 64 × 4096: 0.5 GB per bank instead of 1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # several processes (torchrun): "none" = each rank keeps banks of its own batches (the released code);
    # "allgather" = every rank pushes every rank's rows, so all ranks hold the same banks
    sync: Literal["none", "allgather"] = "none"
    # push into the generated memory only the x̂0 predicted from t <= push_max_t (x̂0 from very noisy inputs
    # is scaled by 1/sqrt(ᾱ_t) and looks like an outlier, which adaptive pruning keeps); None: all t (paper)
    push_max_t: int | None = _num(None, NON_NEGATIVE_OR_NULL)


@dataclass(frozen=True)
class TrainConfig:
    # 0 skips the stage in `run`; pretrain only: auto (by the number of images and classes)
    steps: int | Literal["auto"] = _num(0, _check(lambda v: v == AUTO or v >= 0, "a number >= 0 or auto"))
    batch_size: int = _num(32, POSITIVE)  # global: split evenly over the processes of a torchrun launch
    lr: float = _num(1e-4, POSITIVE)
    weight_decay: float = _num(0.0, NON_NEGATIVE)
    ema: float = _num(0.9999, BELOW_ONE)
    grad_clip: float | None = _num(1.0, POSITIVE_OR_NULL)  # max gradient norm; None: no clipping
    warmup_steps: int = _num(0, NON_NEGATIVE)
    # None: random init; "pretrain": this run's pretrain output; else a diffusers folder or hub id
    init: str | None = None
    revision: str | None = None  # hub revision of `init`
    trainable: Literal["full", "difffit"] = "full"
    difffit_blocks: int | None = _num(None, NON_NEGATIVE_OR_NULL)  # blocks with DiffFit scale factors; None: half
    log_every: int = _num(50, POSITIVE)
    # steps between resumable checkpoints (<run>/checkpoints/<stage>/); 0: none
    checkpoint_every: int = _num(1000, NON_NEGATIVE)
    keep_checkpoints: int = _num(2, POSITIVE)  # the newest k are kept while training; all go when the stage ends
    # "images": encode each batch with the autoencoder every step; "cache": read the latents that
    # `diffdistill prepare` wrote (the VAE never runs during training)
    latents: Literal["images", "cache"] = "images"
    # pretrain only, in `run`: sample this many images per class from the new model and score them with a
    # classifier trained on the real train set (a fidelity estimate before fine-tuning); 0: no check
    check_images: int = _num(0, NON_NEGATIVE)
    # pretrain only, with the check: while a generator check made on the way (the check's classifier and seeds, on
    # the EMA model) is below the fidelity goal, pretraining goes on past `steps` in rounds of steps / 2, up to
    # max_steps in all; 0: it stops at `steps`; auto: 2 × steps (recipe.py: more for many classes). The same weights
    # as a run of that many steps
    max_steps: int | Literal["auto"] = _num(0, _check(lambda v: v == AUTO or v >= 0, "a number >= 0 or auto"))
    memory: MemoryConfig = field(default_factory=MemoryConfig)


# each sampler's timestep spacing when sample.timestep_spacing is null: DiT's respacing for ddpm ("linspace":
# 0, 20, 41, ..., 999 for 50 steps), diffusers' defaults for the others
DEFAULT_SPACING = {"ddpm": "linspace", "ddim": "leading", "dpm": "linspace"}


@dataclass(frozen=True)
class ModeGuidanceConfig:
    """MGD³'s mode guidance: each image is pulled toward its own mode (a k-means centroid of its class's real
    latents) during the first `stop` share of the sampling steps."""

    scale: float = _num(0.0, NON_NEGATIVE)  # λ; 0: off (MGD³: 0.1)
    stop: float = _num(0.5, PROBABILITY)  # share of the steps guided (MGD³: t_stop = 25 of 50)


@dataclass(frozen=True)
class SampleConfig:
    # the largest is generated; smaller IPCs are its per-class prefixes (with modes, k = the largest IPC)
    ipc: tuple[int, ...] = _num((10,), IPC_LIST)
    checkpoint: str = "finetune"  # "finetune", "pretrain", or a diffusers folder
    weights: Literal["ema", "raw"] = "ema"
    scheduler: Literal["ddpm", "ddim", "dpm"] = "ddpm"
    steps: int = _num(50, POSITIVE)
    guidance: float = _num(4.0, NON_NEGATIVE)
    guidance_channels: int | None = _num(None, POSITIVE_OR_NULL)  # None: all latent channels; 3: original DiT
    # None: DiT's respacing for ddpm ("linspace": 0, 20, 41, ..., 999 for 50 steps), diffusers' default otherwise
    timestep_spacing: Literal["linspace", "leading", "trailing"] | None = None
    # DDPM without learned sigma: "fixed_large" = β_t, as DiT's sampler; "fixed_small" = the posterior variance
    ddpm_variance: Literal["fixed_large", "fixed_small"] = "fixed_large"
    # ddpm / ddim: clip each step's x̂0 to the data range (pixel space only, improved-DDPM's default); the
    # cosine schedule needs it where sampling starts at t = T − 1, whose ᾱ ≈ 2e-9 magnifies ε̂'s error 20,000×
    clip_denoised: bool = False
    # images per batch (a guided batch runs the DiT on twice as many); auto: 64 on a CPU, 256 on a GPU (any
    # batch that runs out of GPU memory is split in halves: each image has its own generator, so the same set)
    batch_size: int | Literal["auto"] = _num(AUTO, _check(lambda v: v == AUTO or v > 0, "a positive number or auto"))
    mode_guidance: ModeGuidanceConfig = field(default_factory=ModeGuidanceConfig)
    # noise: pure noise at t = T − 1; prototype (D4M-style, adapted): image i of a class starts from its class's
    # i-th k-means prototype of the real latents, noised to `prototype_strength` of the schedule
    start: Literal["noise", "prototype"] = "noise"
    prototype_strength: float = _num(0.7, _check(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    # what a mode (prototype start, mode guidance) is: the k-means centroid itself (an average of the cluster's
    # latents, in pixel space a blurred, low-contrast image), or the medoid: the real latent nearest each centroid
    # (k distinct train images: a centroid whose nearest one an earlier centroid took gets the next nearest)
    prototype: Literal["centroid", "medoid"] = "centroid"
    # an image that the generator check's classifier (trained on the real train set right after pretraining)
    # assigns to another class is drawn again with a new seed, up to this many times: the first draw assigned
    # its class stays, else the draw that gives its class the highest probability. Needs the check (this run's
    # pretraining, pretrain.check_images > 0, evaluate.full). 0: every image is kept as first drawn
    redraw: int = _num(0, NON_NEGATIVE)
    # draws per image (1: one). With K > 1 every image of a class is drawn K times (draw 0 is the image a run
    # with 1 makes, draw k the seed redraw k would take) and the generator check's classifier keeps one per image
    # in its features: image i keeps the draw that brings the mean of the class's kept images 0..i closest to
    # the real class's mean (herding, one pick per image), among the draws it assigns their class if any.
    # Needs the check, as redraw does; not together with redraw
    candidates: int = _num(1, POSITIVE)

    @property
    def judged(self) -> bool:
        """Whether sampling reads the generator check's classifier."""
        return self.redraw > 0 or self.candidates > 1


@dataclass(frozen=True)
class SelectConfig:
    """Real-image coreset baselines (`diffdistill compare`: random, herding, kcenter, kmeans)."""

    # latents: the autoencoder's latents of the train images; features: penultimate features of the first
    # evaluation net trained on the full real train set (seed 0)
    space: Literal["latents", "features"] = "latents"


@dataclass(frozen=True)
class PrepareConfig:
    """The latent cache: train images encoded once (and their mirror images), read by `latents: cache`."""

    dir: str | None = None  # None: <out_dir>/latent-cache; each cache is a subfolder named by its key
    # images per safetensors shard (written atomically; a rerun skips finished ones)
    shard_size: int = _num(4096, POSITIVE)
    batch_size: int = _num(32, POSITIVE)  # images per VAE forward
    dtype: Literal["float32", "float16"] = "float16"  # storage of the posterior mean and std


# (largest IPC, epochs): the recipe of the field's tables; above the last bound EPOCHS_ABOVE
EPOCHS_BY_IPC = ((1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500))
EPOCHS_ABOVE = 300


def epochs_for_ipc(ipc: int) -> int:
    """evaluate.epochs when it is null."""
    return next((epochs for bound, epochs in EPOCHS_BY_IPC if ipc <= bound), EPOCHS_ABOVE)


@dataclass(frozen=True)
class SoftLabelConfig:
    """The soft-label protocol of RDED / SRe²L (evaluate.labels: soft): a teacher labels every augmented (and
    CutMix-ed) batch the student sees, and the student minimizes KL(teacher_T ‖ student_T), with AdamW and
    RDED's cosine schedule (configs/evaluate-imagenet1k-soft.yaml gives the sources)."""

    # full: the full-data classifier this tool trains (same net and seed as the student); else a file
    # (.safetensors, or a weights-only .pth / .pt) or a folder holding model.safetensors, with torchvision-layout
    # weights of `teacher_net` (1000 ImageNet classes are mapped to the data's wnids)
    teacher: str = "full"
    teacher_net: Literal["resnet18", "resnet50", "resnet101"] = "resnet18"
    temperature: float = _num(20.0, POSITIVE)  # RDED with CutMix
    lr: float = _num(0.001, POSITIVE)  # AdamW, betas (0.9, 0.999)
    weight_decay: float = _num(0.01, NON_NEGATIVE)


LABEL_PROTOCOLS = ("hard", "soft")


@dataclass(frozen=True)
class EvalConfig:
    nets: tuple[str, ...] = field(default=("convnet6",), metadata=_check(lambda v: len(v) > 0, "a non-empty list"))
    width: int = _num(128, POSITIVE)  # ConvNet width (ResNets keep their standard widths)
    norm: Literal["instance", "batch", "none"] | None = None  # None: each net's own (see classifiers.DEFAULT_NORM)
    seeds: int = _num(3, POSITIVE)
    # None: sample.ipc
    ipc: tuple[int, ...] | None = _num(None, _check(lambda v: v is None or IPC_LIST["check"][0](v),
                                                     "null or a non-empty list of positive integers"))
    pool: bool = False  # draw IPC per class at random (seeded) from a larger set, instead of the first IPC
    image_size: int | None = _num(None, POSITIVE_OR_NULL)  # classifier input size; None: data.image_size
    # None: by IPC (1: 3000, <=10: 2000, <=50: 1500, <=200: 1000, <=500: 500, else 300)
    epochs: int | None = _num(None, POSITIVE_OR_NULL)
    full: bool = True  # also train on the full real train set (needed for fidelity; expensive at scale)
    full_epochs: int = _num(50, POSITIVE)
    # diversity / precision / recall / density / coverage in the penultimate-layer features of the first
    # net's full-data classifier (seed 0); needs `full`. k of the k-nearest-neighbour balls:
    metrics: bool = True
    knn: int = _num(5, POSITIVE)
    batch_size: int = _num(64, POSITIVE)
    lr: float = _num(0.01, POSITIVE)
    momentum: float = _num(0.9, BELOW_ONE)
    weight_decay: float = _num(5e-4, NON_NEGATIVE)
    eval_every: int = _num(50, POSITIVE)
    # augmentation, every batch; each element can be switched off (crop_scale [1, 1], strength 0, prob 0)
    crop_scale: tuple[float, float] = _num((0.5, 1.0), _check(lambda v: 0 < v[0] <= v[1] <= 1,
                                                              "two numbers 0 < lo <= hi <= 1"))  # RandomResizedCrop
    color_jitter: float = _num(0.4, BELOW_ONE)  # brightness / contrast / saturation strength
    lighting: float = _num(0.1, NON_NEGATIVE)  # PCA lighting noise std (RGB only)
    cutmix_prob: float = _num(1.0, PROBABILITY)
    cutmix_beta: float = _num(1.0, POSITIVE)
    # classifier training under bf16 autocast (channels-last on CUDA); fp32 everywhere by default
    precision: Literal["fp32", "bf16"] = "fp32"
    # GiB a set (distilled, random-real subset, val) may take as uint8 at the classifier size to be held whole on
    # the device; a larger one is streamed from its files batch by batch. null: 20 % of the GPU's memory, 1 on CPU
    resident_gb: float | None = _num(None, NON_NEGATIVE_OR_NULL)
    # CPU only: processes training classifiers at once, each with threads / workers torch threads (results are
    # those of one process with that many threads); on a GPU the jobs run in one process
    workers: int = _num(1, POSITIVE)
    # hard: cross-entropy on the set's labels (SGD, the settings above); soft: a teacher's labels (`soft`).
    # Both: every distilled and random-real classifier is trained under each, reported side by side
    labels: tuple[str, ...] = field(default=("hard",), metadata=_check(
        lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(LABEL_PROTOCOLS),
        "a non-empty list of hard and/or soft"))
    soft: SoftLabelConfig = field(default_factory=SoftLabelConfig)


@dataclass(frozen=True)
class Config:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = _num(0, NON_NEGATIVE)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = _num(None, POSITIVE_OR_NULL)  # torch CPU threads; None: torch's default
    # autocast dtype for the DiT (training and sampling); "fp32" = no autocast. fp16 adds loss scaling.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True  # CUDA only: TF32 tensor cores for fp32 matmuls and convolutions
    # torch.compile the DiT for training and sampling (the first steps compile; worth it for long GPU runs).
    # compile_mode: torch.compile's mode; "reduce-overhead" adds CUDA graphs (training has a fixed batch shape)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=5e-4, batch_size=64, check_images=10, memory=MemoryConfig(policy="none"))
    )
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(init="pretrain"))
    sample: SampleConfig = field(default_factory=SampleConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    # set by diffdistill.recipe, never by a file: (key, why) for each key that was auto (run_info.json)
    auto: tuple[tuple[str, str], ...] = field(default=(), metadata={"internal": True})

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# checks that relate two keys: (key named in the error, test of the whole config, what is expected)
_RELATIONS: tuple[tuple[str, typing.Callable[[Config], bool], str], ...] = (
    ("diffusion.beta_end", lambda c: c.diffusion.schedule != "linear" or c.diffusion.beta_start < c.diffusion.beta_end,
     "a number larger than diffusion.beta_start"),
    ("sample.steps", lambda c: c.sample.steps <= c.diffusion.train_steps, "at most diffusion.train_steps"),
    ("sample.candidates", lambda c: c.sample.candidates == 1 or c.sample.redraw == 0,
     "1 while sample.redraw is set (both choose among draws by the generator check's classifier: set one)"),
    ("finetune.max_steps", lambda c: c.finetune.max_steps == 0,
     "0 (only pretraining goes on while the generator check is below its goal)"),
    ("pretrain.max_steps", lambda c: c.pretrain.max_steps in (0, AUTO) or (c.pretrain.check_images > 0
                                                                             and c.evaluate.full),
     "0 or auto while pretrain.check_images is 0 or evaluate.full is false (pretraining goes on only while the "
     "generator check, whose classifier is a full-data one, is below its goal)"),
    ("pretrain.max_steps", lambda c: AUTO in (c.pretrain.max_steps, c.pretrain.steps) or c.pretrain.max_steps == 0
     or c.pretrain.max_steps >= c.pretrain.steps, "0, auto or at least pretrain.steps"),
    ("data.train", lambda c: c.data.train is not None or c.data.builtin is not None,
     "a folder of class subfolders when data.builtin is null"),
    ("sample.clip_denoised", lambda c: not c.sample.clip_denoised or (
        c.autoencoder.kind == "identity" and c.sample.scheduler != "dpm"),
     "false with a VAE's latents (unbounded) or the dpm sampler"),
    ("sample.clip_denoised", lambda c: c.sample.clip_denoised or c.diffusion.schedule != "cosine" or (
        c.sample.timestep_spacing or DEFAULT_SPACING[c.sample.scheduler])
     == "leading", "true (or sample.timestep_spacing=leading): with the cosine schedule a sampler that starts at "
                   "t = T − 1 (ᾱ ≈ 2e-9) returns noise unless x̂0 is clipped"),
)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        args = typing.get_args(tp)
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0])
        return f"a list of {inner}" if args[-1] is Ellipsis else f"a list of {len(args)} × {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and (args[-1] is Ellipsis or len(value) == len(args)):
            elems = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
            # class names may be written as bare numbers in YAML (digits: [0, 1])
            value = [str(v) if e is str and type(v) is int else v for v, e in zip(value, elems)]
            try:
                return tuple(_coerce(v, e, key) for v, e in zip(value, elems))
            except ConfigError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        raise ConfigError(f"config key '{key}': expected a mapping of keys, got {value!r}")
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _merge(base: Any, raw: dict, prefix: str) -> Any:
    """Apply the nested mapping `raw` on top of the dataclass instance `base`."""
    if not isinstance(raw, dict):
        where = f"'{prefix[:-1]}'" if prefix else "the top level"
        raise ConfigError(f"config {where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(type(base))
    names = [f.name for f in dataclasses.fields(base) if not f.metadata.get("internal")]
    changes = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in names:
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{key}'; valid keys in {where}: {', '.join(names)}")
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _merge(current, value, key + ".")
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(base, **changes)


def _validate(cfg: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _validate(value, key + ".")
        elif "check" in f.metadata and not f.metadata["check"][0](value):
            raise ConfigError(f"config key '{key}': expected {f.metadata['check'][1]}, got {value!r}")
    if isinstance(cfg, Config):
        for key, test, expected in _RELATIONS:
            if not test(cfg):
                raise ConfigError(f"config key '{key}': expected {expected}, got {_get(cfg, key)!r}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. finetune.memory.policy=fifo")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.__class__.__name__})") from None
    return key.split("."), parsed


def build_config(raw: dict | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Config from a nested mapping (as read from YAML) plus dotted overrides, validated."""
    raw = dict(raw or {})
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = value
    cfg = _merge(Config(), raw, "")
    _validate(cfg)
    return cfg


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The mapping in `path`; a top-level `base: OTHER.yaml` (relative to `path`) is read first and
    overridden key by key, so a config can say only how it differs from another."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must be a file name, got {base!r}")
    parent = (path.parent / base).resolve()
    if parent in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to {parent}")
    return _deep_merge(read_yaml(parent, (*seen, path.resolve())), raw)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    path = Path(path)
    raw = read_yaml(path)
    if "points" in raw:
        raise ConfigError(f"{path} is a sweep file: run it with `diffdistill sweep {path}`")
    try:
        return build_config(raw, overrides)
    except ConfigError as err:
        try:  # blame the file only if the file alone has the problem
            build_config(raw)
        except ConfigError:
            raise ConfigError(f"{path}: {err}") from None
        raise ConfigError(f"command line: {err}") from None


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    out = plain(dataclasses.asdict(cfg))
    out.pop("auto", None)  # recorded in run_info.json; config.yaml holds the chosen values themselves
    return out


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value} (dotted keys, as overrides name them)."""
    out = {}
    for k, v in d.items():
        out.update(flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
