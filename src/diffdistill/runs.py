"""Where a run keeps its stages, checkpoints and models: the one home of the run folder's layout.

    <out_dir>/<name>/            the run folder (Config.run_dir)
      pretrain/ finetune/        training stages: {raw,ema}/ diffusers model folders, log.jsonl, run_info.json;
                                 pretrain/check.json: the generator check after pretraining;
                                 pretrain/check-classifier.safetensors: its classifier (and the checks on
                                 the way's: probe-classifier.safetensors)
      checkpoints/<stage>/       resumable checkpoints of an unfinished training stage
      .samples.partial/          images of an unfinished sample stage
      samples/                   the distilled set: <class>/<i>.png + manifest.json
      evaluate-jobs/             one record per trained classifier
      evaluate/                  results.json of the evaluation, real_examples.safetensors
      results.json report.md *.png   the report
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors import safe_open

from diffdistill.config import Config, SampleConfig, flat_keys, to_dict
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
    """The classifier the generator check trained on the real train set (`sample.redraw` and
    `sample.candidates` judge by it)."""
    return stage_dir(run_dir, "pretrain") / "check-classifier.safetensors"


PROBE_CLASSIFIER = "probe-classifier.safetensors"  # written into pretraining's folder before it is in place


def probe_classifier_file(run_dir: Path) -> Path:
    """The classifier the generator checks on the way trained (pretrain.max_steps): the check after pretraining
    takes it instead of training its own when it was trained from the same settings and pixels."""
    return stage_dir(run_dir, "pretrain") / PROBE_CLASSIFIER


CLASS_MEANS = "class_means"  # in the check's classifier file: each real class's mean feature [classes, F]


# the settings that make sampling read the check's classifier, and the values that switch them off
JUDGE_OFF = {"sample.redraw": 0, "sample.candidates": 1}


# every setting that reads the generator check (sampling's, and pretraining that goes on while it is low) and
# its off value: compare and sweep, which run no check, set these (reads_check)
CHECK_OFF = {**JUDGE_OFF, "pretrain.max_steps": 0}


def judge_setting(scfg: SampleConfig) -> tuple[str, int]:
    """The setting that makes sampling read the check's classifier: (key, value)."""
    return ("sample.redraw", scfg.redraw) if scfg.redraw else ("sample.candidates", scfg.candidates)


def reads_check(cfg: Config) -> list[tuple[str, int, str]]:
    """The settings of `cfg` that need the generator check, each as (key, value, what it does with the check):
    compare and sweep, which run no check, set each to its CHECK_OFF value and say so."""
    found = []
    if cfg.sample.judged:
        key, value = judge_setting(cfg.sample)
        found.append((key, value, "it needs the generator check's classifier"))
    if cfg.pretrain.max_steps:
        found.append(("pretrain.max_steps", cfg.pretrain.max_steps,
                      "pretraining goes on by the generator check; here it stops at pretrain.steps"))
    return found


def judge_missing(path: Path, scfg: SampleConfig) -> str | None:
    """Why the check's classifier file cannot serve these sampling settings (None: it can)."""
    if not path.is_file():
        return "does not exist"
    if scfg.candidates > 1:
        with safe_open(path, "pt") as f:
            if CLASS_MEANS not in f.keys():
                return "holds no class feature means (it was made before sample.candidates existed)"
    return None


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


# `run --resume` and finished stages: a stage runs again when a setting its output depends on changed since
# it ran (compared with the config it recorded) or when the output of a stage it reads was made again since
# (STAGE_READS; each output records a token of its own and those of the outputs it read; the sample stage
# reads the check's classifier only with sample.redraw or sample.candidates).
STAGE_READS = {"check": ("pretrain",), "finetune": ("pretrain",), "sample": ("pretrain", "finetune"),
               "evaluate": ("sample", "check")}  # the report quotes the check
SHARED = {"seed", "precision", "data", "autoencoder", "model", "diffusion", "prepare"}  # every stage's output
VAL_KEYS = {"data.val", "data.val_labels"}  # only the check's and the evaluation's
BUILTIN_KEYS = {"data.builtin", "data.val_fraction", "data.split_seed"}  # nothing while data.train is set
# settings that change no result (sampled images do not depend on their batch; select.* is compare's)
NO_RESULT = {"name", "out_dir", "device", "threads", "tf32", "compile", "compile_mode", "prepare.dir",
             "prepare.shard_size", "prepare.batch_size", "sample.batch_size", "select.space"}
NO_RESULT_LEAVES = {"log_every", "checkpoint_every", "keep_checkpoints", "workers", "resident_gb"}
# the check samples from noise with the run's sampler and trains the first evaluation net on the real set:
# sample.* and evaluate.* count for it, except these (and mode_guidance.*, soft.*)
CHECK_IGNORES = {"sample.ipc", "sample.checkpoint", "sample.weights", "sample.start", "sample.prototype_strength",
                 "sample.prototype", "sample.redraw", "sample.candidates", "evaluate.seeds", "evaluate.ipc",
                 "evaluate.pool", "evaluate.epochs", "evaluate.eval_every", "evaluate.metrics", "evaluate.knn",
                 "evaluate.labels", "evaluate.full"}


def _depends(stage: str, key: str) -> bool:
    """Whether the output of `stage` depends on the setting `key` itself (not through an earlier stage)."""
    section = key.split(".")[0]
    if key in NO_RESULT or section in NO_RESULT or key.split(".")[-1] in NO_RESULT_LEAVES:
        return False
    if key in VAL_KEYS:
        return stage in ("check", "evaluate")
    if section in SHARED:
        return True
    if stage == "check":
        return key == "pretrain.check_images" or (section in ("sample", "evaluate") and key not in CHECK_IGNORES
                                                  and not key.startswith(("sample.mode_guidance.", "evaluate.soft.")))
    return section == stage and key != "pretrain.check_images" and key != "finetune.check_images"


def judge_settings(cfg: Config) -> dict:
    """The settings the check's classifier is trained from: what the check depends on (`_depends`), less the
    val folders and what only makes the generated images it is scored on (sample.*, pretrain.*)."""
    found = {key: value for key, value in flat_keys(to_dict(cfg)).items()
             if _depends("check", key) and key not in VAL_KEYS and key.split(".")[0] not in ("sample", "pretrain")}
    found["evaluate.nets"] = list(found["evaluate.nets"])[:1]  # the check's classifier is the first net
    return found


def recorded_config(run_dir: Path, stage: str) -> dict | None:
    """The config a finished stage recorded: its folder's config.yaml; the check's in check.json."""
    if stage == "check":
        return (_record(run_dir, "check") or {}).get("config")
    file = stage_dir(run_dir, stage) / "config.yaml" if stage in STAGE_FOLDERS else None
    return yaml.safe_load(file.read_text()) or {} if file is not None and file.is_file() else None


def stage_reads(cfg: Config, stage: str) -> tuple[str, ...]:
    """The stages whose output `stage` reads in this run."""
    return STAGE_READS.get(stage, ()) + (("check",) if stage == "sample" and cfg.sample.judged else ())


def _record(run_dir: Path, stage: str) -> dict | None:
    """What a finished stage recorded: check.json for the check, else its folder's run_info.json."""
    file = generator_check_file(run_dir) if stage == "check" else \
        stage_dir(run_dir, stage) / "run_info.json" if stage in STAGE_FOLDERS else None
    return json.loads(file.read_text()) if file is not None and file.is_file() else None


def input_tokens(cfg: Config, stage: str) -> dict[str, str]:
    """The tokens of the outputs `stage` reads now (recorded with its own output as "reads")."""
    records = {u: _record(cfg.run_dir, u) for u in stage_reads(cfg, stage)}
    return {u: r["made"] for u, r in records.items() if r is not None and "made" in r}


def remade_inputs(cfg: Config, stage: str) -> list[str]:
    """The stages whose output a finished `stage` read and that were made again since (none when it recorded
    no tokens: made by an older version)."""
    read = (_record(cfg.run_dir, stage) or {}).get("reads") or {}
    now = input_tokens(cfg, stage)
    return [u for u, token in read.items() if now.get(u) != token]


def changed_settings(cfg: Config, stage: str) -> list[str]:
    """The settings the output of a finished `stage` depends on that `cfg` holds differently from the config the
    stage recorded, as "key: then -> now" (none when it recorded none). A key an older version did not record
    counts with its default."""
    recorded = recorded_config(cfg.run_dir, stage)
    if recorded is None:
        return []
    saved, now = {**flat_keys(to_dict(Config())), **flat_keys(recorded)}, flat_keys(to_dict(cfg))
    # a pretraining that checked itself on the way (pretrain.max_steps) depends on what the check reads, the val
    # folders included (the classifier's accuracy on them can lower the goal)
    checked = stage == "pretrain" and bool(((_record(cfg.run_dir, stage) or {}).get("extension") or {}).get("checks"))
    if stage == "check" or checked:  # the check's classifier is the first net's
        saved["evaluate.nets"], now["evaluate.nets"] = list(saved["evaluate.nets"])[:1], list(now["evaluate.nets"])[:1]
    unused = unused_data_keys(saved, now)
    return [f"{key}: {saved.get(key)} -> {value}" for key, value in now.items()
            if (_depends(stage, key) or (checked and _depends("check", key)))
            and saved.get(key) != value and key not in unused]


def unused_data_keys(saved: dict, now: dict) -> set[str]:
    """Of two flat configs (dotted keys), the data keys that choose nothing in either: the built-in set's while
    both read data.train."""
    return BUILTIN_KEYS if saved.get("data.train") is not None and now.get("data.train") is not None else set()
