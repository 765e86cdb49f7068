"""Where a run keeps its stages, checkpoints and models: the one home of the run folder's layout.

    <out_dir>/<name>/            the run folder (Config.run_dir)
      pretrain/ finetune/        training stages: {raw,ema}/ diffusers model folders, log.jsonl, run_info.json;
                                 pretrain/check.json: the generator check after pretraining
      checkpoints/<stage>/       resumable checkpoints of an unfinished training stage
      .samples.partial/          images of an unfinished sample stage
      samples/                   the distilled set: <class>/<i>.png + manifest.json
      evaluate-jobs/             one record per trained classifier
      evaluate/                  results.json of the evaluation, real_examples.safetensors
      results.json report.md *.png   the report
"""

from __future__ import annotations

from pathlib import Path

import yaml

from diffdistill.config import Config, to_dict
from diffdistill.errors import StageError

TRAINING_STAGES = ("pretrain", "finetune")
# stage -> its output folder inside the run folder (prepare writes to the shared, resumable latent cache)
STAGE_FOLDERS = {"pretrain": "pretrain", "finetune": "finetune", "sample": "samples", "evaluate": "evaluate"}
REAL_EXAMPLES = "real_examples.safetensors"  # in the evaluate folder: real train images for the report


def stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / STAGE_FOLDERS[stage]


def checkpoint_root(run_dir: Path, stage: str) -> Path:
    return run_dir / "checkpoints" / stage


def samples_partial(run_dir: Path) -> Path:
    return run_dir / ".samples.partial"


def evaluate_jobs(run_dir: Path) -> Path:
    return run_dir / "evaluate-jobs"


def results_file(run_dir: Path) -> Path:
    return stage_dir(run_dir, "evaluate") / "results.json"


def generator_check_file(run_dir: Path) -> Path:
    """The fidelity estimate made right after pretraining (`diffdistill check`)."""
    return stage_dir(run_dir, "pretrain") / "check.json"


def check_classifier_file(run_dir: Path) -> Path:
    """The classifier the generator check trained on the real train set (`sample.redraw` judges by it)."""
    return stage_dir(run_dir, "pretrain") / "check-classifier.safetensors"


def training_log(run_dir: Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / "log.jsonl"


def model_source(run_dir: Path, spec: str, weights: str = "ema") -> str:
    """A training stage of this run ("pretrain", "finetune") -> its saved model folder; else `spec` as given
    (a diffusers folder, a hub id or an original DiT checkpoint)."""
    if spec in TRAINING_STAGES:
        folder = stage_dir(run_dir, spec) / weights
        if not folder.is_dir():
            raise StageError(f"{folder} does not exist: run `diffdistill {spec}` with this config first")
        return str(folder)
    return spec


def run_order(cfg: Config) -> list[str]:
    """The stages `diffdistill run` chains for this config, in order."""
    training = [s for s in TRAINING_STAGES if getattr(cfg, s).steps > 0]
    prepare = ["prepare"] if any(getattr(cfg, s).latents == "cache" for s in training) else []
    # the check trains a classifier on the whole train set: only where evaluation does so anyway
    check = ["check"] if "pretrain" in training and cfg.pretrain.check_images > 0 and cfg.evaluate.full else []
    return prepare + training[:1] + check + training[1:] + ["sample", "evaluate"]



# What a finished stage's output depends on, for `run --resume`: each setting counts from the first stage it
# changes (the stages after that one read its output). Sections every trained model depends on count from
# pretrain; the validation set only from evaluate; these change no result at all (sampled images do not depend
# on their batch):
NO_RESULT = {"name", "out_dir", "device", "threads", "tf32", "compile", "compile_mode", "prepare",
             "sample.batch_size"}
NO_RESULT_LEAVES = {"log_every", "checkpoint_every", "keep_checkpoints", "check_images", "workers", "resident_gb"}
FIRST_STAGE = {"seed": "pretrain", "precision": "pretrain", "data": "pretrain", "autoencoder": "pretrain",
               "model": "pretrain", "diffusion": "pretrain", "pretrain": "pretrain", "finetune": "finetune",
               "select": "sample", "sample": "sample", "evaluate": "evaluate", "data.val": "evaluate",
               "data.val_labels": "evaluate"}
RESULT_STAGES = ("pretrain", "finetune", "sample", "evaluate")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_settings(cfg: Config, stage: str) -> list[str]:
    """The settings a finished stage's output depends on that `cfg` holds differently from the config.yaml the
    stage wrote, as "key: then -> now" (none when it wrote no config.yaml). A key an older version did not
    write counts with its default."""
    saved_file = stage_dir(cfg.run_dir, stage) / "config.yaml" if stage in RESULT_STAGES else None
    if saved_file is None or not saved_file.is_file():
        return []
    now, default = _flat(to_dict(cfg)), _flat(to_dict(Config()))
    saved = {**default, **_flat(yaml.safe_load(saved_file.read_text()) or {})}
    upto = RESULT_STAGES.index(stage)
    changed = []
    for key, value in now.items():
        first = FIRST_STAGE.get(key, FIRST_STAGE.get(key.split(".")[0]))
        if {key, key.split(".")[0]} & NO_RESULT or key.split(".")[-1] in NO_RESULT_LEAVES or first is None:
            continue
        if RESULT_STAGES.index(first) <= upto and saved.get(key) != value:
            changed.append(f"{key}: {saved.get(key)} -> {value}")
    return changed
