"""`diffdistill compare`: ways of making a small training set, side by side under one evaluation protocol.

    diffdistill compare CONFIG --methods random,herding,kcenter,kmeans,dit,mgd3,d4m,minimax,adaptive --seeds 0,1,2

Methods (the registry `METHODS`):
- real-image selection, exactly IPC real images per class: `random` (the evaluation's random-real baseline),
  `herding`, `kcenter`, `kmeans` (the real image nearest each of IPC k-means centroids) in the space
  `select.space` (the autoencoder's latents, or the full-data classifier's penultimate features);
- training-free sampling of the pretrained DiT: `dit` (plain), `mgd3` (mode guidance toward IPC k-means modes,
  λ = 0.1 unless set, stop after `sample.mode_guidance.stop` of the steps), `d4m` (a D4M-style start from
  the k-means prototypes noised to `sample.prototype_strength`; an adaptation to a class-conditional DiT);
- fine-tuning, then sampling: `none` (plain DiffFit / full fine-tune), `minimax` (FIFO memories), `adaptive`
  (this project's method: the self-adaptive memories).

What can be shared is shared: one pretrained model (or `finetune.init`), one fine-tune per fine-tuning method
and seed, and one set of random-real and full-data classifiers per seed (`<compare>/baselines-s<seed>/`),
so every method is scored by the same nets, seeds and protocol (the config's first `evaluate.labels`: hard
or soft labels, one of them). A method whose set for IPC k is not the first
k images of a larger one (k-means, mgd3, d4m) runs once per IPC. Each method and seed is a run folder
`<compare>/<method>[-ipc<k>]-s<seed>/`; a finished one is not recomputed. Outputs: compare.csv (one row per
method, IPC, net and seed), compare.md (mean ± std over seeds, gap to random, fidelity, diversity and
coverage, wall time) and compare.png (accuracy against IPC, one line per method, min–max band over seeds).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffdistill.config import Config, ConfigError, build_config, read_yaml, to_dict
from diffdistill.data.datasets import data_classes, load_data, to_uint8
from diffdistill.data.pixels import channel_stats
from diffdistill.errors import StageError
from diffdistill.files import atomic_write_bytes, atomic_write_json, atomic_write_text, staged_dir
from diffdistill.latents import RealLatents, cache_root
from diffdistill.metrics import spread
from diffdistill.models.classifiers import build_classifier
from diffdistill.plots import compare_plot
from diffdistill.preflight import check_plan
from diffdistill.recipe import describe, resolve_config
from diffdistill.runs import (
    CHECK_OFF,
    TRAINING_STAGES,
    evaluate_jobs,
    reads_check,
    results_file,
    run_order,
    stage_dir,
)
from diffdistill.runtime import derive_seed, setup, write_run_info
from diffdistill.select import PREFIX_STABLE, SELECTORS
from diffdistill.stages.evaluate import evaluate_stage, features
from diffdistill.stages.prepare import prepare_stage
from diffdistill.stages.report import write_report
from diffdistill.stages.sample import hwc, image_file, sample_stage, save_png
from diffdistill.stages.train import train_stage


@dataclass(frozen=True)
class Method:
    family: str  # select | sample | finetune
    about: str
    defaults: tuple[str, ...] = ()  # overrides a user's key=value may change
    pins: tuple[str, ...] = ()  # overrides that define the method (applied last)
    per_ipc: bool = False  # one set per IPC: the set for k is not the first k images of a larger one


_PLAIN = ("sample.mode_guidance.scale=0", "sample.start=noise")
METHODS: dict[str, Method] = {
    "random": Method("select", "random real images (the evaluation's random-real baseline)"),
    "herding": Method("select", "herding: real images whose running mean tracks the class mean"),
    "kcenter": Method("select", "greedy k-center real images"),
    "kmeans": Method("select", "the real image nearest each k-means centroid (k = IPC)", per_ipc=True),
    "dit": Method("sample", "the pretrained DiT, sampled as is", pins=_PLAIN),
    "mgd3": Method("sample", "the pretrained DiT with mode guidance (MGD³)", ("sample.mode_guidance.scale=0.1",),
                   ("sample.start=noise", "sample.prototype=centroid"), per_ipc=True),
    "d4m": Method("sample", "the pretrained DiT started from noised k-means prototypes (D4M-style, adapted)",
                  pins=("sample.mode_guidance.scale=0", "sample.start=prototype", "sample.prototype=centroid"),
                  per_ipc=True),
    "none": Method("finetune", "fine-tuned without memories", pins=("finetune.memory.policy=none", *_PLAIN)),
    "minimax": Method("finetune", "fine-tuned with FIFO memories (Minimax)",
                      pins=("finetune.memory.policy=fifo", *_PLAIN)),
    "adaptive": Method("finetune", "fine-tuned with self-adaptive memories (this method)",
                       pins=("finetune.memory.policy=adaptive", *_PLAIN)),
}
CSV_FIELDS = ("method", "family", "ipc", "net", "seed", "accuracy", "accuracy_std", "best_epoch_accuracy",
              "fidelity", "diversity", "precision", "coverage", "seconds", "run")
TIME_FILE = "compare.json"  # in each method's run folder: the method, its IPCs and its wall time


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods {text!r}: unknown method {', '.join(unknown) or '(none given)'}; expected "
                          f"names from {', '.join(METHODS)} separated by commas")
    if methods == ["random"]:
        raise ConfigError("--methods random: random real images are the baseline every other method is scored "
                          "beside; name at least one more method")
    return list(dict.fromkeys(methods))


def _build(raw: dict, overrides: list[str]) -> Config:
    return resolve_config(build_config(raw, overrides))


def method_config(raw: dict, user: list[str], name: str, seed: int, root: Path, model: list[str],
                  ipc: int | None = None) -> Config:
    """The config of one method's run: its defaults, the user's overrides, its pins, the shared model, and
    (per-IPC methods) the one IPC it makes."""
    m = METHODS[name]
    label = f"{name}-ipc{ipc}-s{seed}" if ipc is not None else f"{name}-s{seed}"
    only = [f"sample.ipc=[{ipc}]", f"evaluate.ipc=[{ipc}]"] if ipc is not None else []
    return _build(raw, [*m.defaults, *user, *m.pins, *model, *only, f"seed={seed}", f"out_dir={root}",
                        f"name={label}"])


def run_compare(config: str | Path, methods: list[str], seeds: list[int], overrides: list[str],
                dry_run: bool = False) -> Path:
    """Run every (method, seed) not already finished; write compare.csv, compare.md and compare.png.
    `dry_run`: check the plan and print it (the runs it would make), train nothing."""
    raw = read_yaml(Path(config))
    base = _build(raw, overrides)
    off = reads_check(base)  # every method samples as drawn and pretrains for pretrain.steps, under one protocol
    for key, value, why in off:
        print(f"compare: {key}={value} is off here ({why}, and compare runs no check)", flush=True)
    if off:
        overrides = [*overrides, *(f"{key}={CHECK_OFF[key]}" for key, _, _ in off)]
        base = _build(raw, overrides)
    for line in describe(base):
        print(line, flush=True)
    root = base.run_dir.parent / f"{base.name}-compare"
    ipcs = sorted(set(base.evaluate.ipc or base.sample.ipc))
    generative = [m for m in methods if METHODS[m].family != "select"]
    if base.select.space == "features" and set(methods) - {"random"} - set(generative) and not (
            generative and base.evaluate.full):
        raise ConfigError("select.space=features: the selections read the full-data classifier that a generative "
                          "method's evaluation trains first; add one (e.g. dit) to --methods and keep "
                          "evaluate.full=true, or use select.space=latents")
    if base.evaluate.pool:
        raise ConfigError("compare: evaluate.pool draws each IPC at random from a larger set, which would change "
                          "what herding and k-center pick; compare needs evaluate.pool=false")
    if any(METHODS[m].family == "finetune" for m in methods) and base.finetune.steps <= 0:
        raise ConfigError(f"compare: finetune.steps is {base.finetune.steps}, but "
                          f"{', '.join(m for m in methods if METHODS[m].family == 'finetune')} fine-tune; set "
                          "finetune.steps or leave those methods out")
    if generative and base.pretrain.steps <= 0 and base.finetune.init in TRAINING_STAGES:
        raise ConfigError("compare: pretrain.steps is 0, so the generative methods need a pretrained DiT: set "
                          "finetune.init to a diffusers folder, a hub id or an original DiT checkpoint")
    # what `run` would check for the base config, before any work: data and val folders, IPC against every
    # class's real images (selections and k-means modes draw from them too), init models, writability
    plan = check_plan(base, [s for s in run_order(base) if s != "check"])
    if dry_run:
        runs = [f"{m}-ipc{k}-s{s}" if METHODS[m].per_ipc else f"{m}-s{s}" for s in seeds for m in methods
                if m != "random" for k in (ipcs if METHODS[m].per_ipc else [None])]
        shared = ["a shared pretraining, "] if generative and base.pretrain.steps > 0 else []
        print("\n".join([f"plan for {root} (nothing was run):", *plan.lines[:1],
                         f"compare: {''.join(shared)}{len(runs)} runs ({', '.join(runs)}), each evaluated at IPC "
                         f"{', '.join(map(str, ipcs))} beside the same random-real draws"]), flush=True)
        return root
    if "prepare" in run_order(base):  # the latent cache every method's fine-tune (and the modes) read
        prepare_stage(base, False)
    # every run of the comparison reads the one latent cache (its runs live in another out_dir)
    model: list[str] = [f"prepare.dir={cache_root(base)}"]
    if generative:
        if base.pretrain.steps > 0 and base.finetune.init == "pretrain":
            shared = _build(raw, [*overrides, *model, f"out_dir={root}", "name=shared"])
            _same_settings(shared, "the shared pretraining")
            if not stage_dir(shared.run_dir, "pretrain").is_dir():
                print(f"== compare: pretraining the shared DiT ({shared.pretrain.steps} steps) ==", flush=True)
                t0 = time.perf_counter()
                train_stage(shared, "pretrain", force=False, resume=True)
                atomic_write_json(shared.run_dir / TIME_FILE, {"seconds": round(time.perf_counter() - t0, 1),
                                                               "config": settings_key(shared)})
            model += ["pretrain.steps=0", f"finetune.init={stage_dir(shared.run_dir, 'pretrain') / 'ema'}"]
        else:
            model.append(f"finetune.init={base.finetune.init}")
    runs = [(name, seed, ipc) for seed in seeds for name in sorted(methods, key=lambda m: METHODS[m].family ==
            "select") if name != "random" for ipc in (ipcs if METHODS[name].per_ipc else [None])]
    # one label protocol, the config's first (what the tables show): a second would double every evaluation
    user = [*overrides, f"evaluate.labels=[{base.evaluate.labels[0]}]"]
    configs = {run: method_config(raw, user, *run[:2], root, model, run[2]) for run in runs}
    for (name, _, _), cfg in configs.items():  # a folder made with other settings is never mixed in
        _same_settings(cfg, f"the {name} run")
    table = []
    for seed in seeds:
        baselines = root / f"baselines-s{seed}"
        # generative methods first: their evaluations train the shared baselines the selections may read
        for name in sorted(methods, key=lambda m: METHODS[m].family == "select"):
            if name == "random":
                continue
            for ipc in (ipcs if METHODS[name].per_ipc else [None]):
                cfg = configs[(name, seed, ipc)]
                if not results_file(cfg.run_dir).is_file():
                    print(f"== compare: {cfg.name} ({METHODS[name].about}) ==", flush=True)
                    _run_method(cfg, name, baselines)
                table += _rows(name, seed, cfg.run_dir, baselines)
        if "random" in methods:
            table += _random_rows(seed, root, table)
    _write_outputs(root, table, methods, seeds)
    return root


def _run_method(cfg: Config, name: str, baselines: Path) -> None:
    method = METHODS[name]
    t0 = time.perf_counter()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.run_dir / TIME_FILE, {"method": name, "config": settings_key(cfg)})
    if method.family == "finetune" and not stage_dir(cfg.run_dir, "finetune").is_dir():
        train_stage(cfg, "finetune", force=False, resume=True)
    if not stage_dir(cfg.run_dir, "sample").is_dir():
        if method.family == "select":
            select_stage(cfg, name, baselines)
        else:
            sample_cfg = cfg if method.family == "finetune" else _with(cfg, "sample.checkpoint",
                                                                        cfg.finetune.init)
            sample_stage(sample_cfg)
    t_eval = time.perf_counter()
    evaluate_stage(cfg, force=True, baselines=baselines)
    evaluated = time.perf_counter() - t_eval
    write_report(cfg.run_dir)
    atomic_write_json(cfg.run_dir / TIME_FILE, {"method": name, "config": settings_key(cfg),
                                                "seconds": round(time.perf_counter() - t0, 1),
                                                "evaluate_seconds": round(evaluated, 1)})


def settings_key(cfg: Config) -> str:
    """A hash of everything a run's config says (its folder name and output folder included)."""
    return str(derive_seed(json.dumps(to_dict(cfg), sort_keys=True)))


def _same_settings(cfg: Config, what: str) -> None:
    """Refuse a run folder that an earlier compare made with other settings (its results would be mixed in)."""
    saved = cfg.run_dir / TIME_FILE
    earlier = json.loads(saved.read_text()).get("config") if saved.is_file() else None
    if earlier is not None and earlier != settings_key(cfg):
        raise ConfigError(f"compare: {cfg.run_dir} holds {what} made with other settings; give this comparison "
                          "another name (name=...) or delete that folder")


def _with(cfg: Config, key: str, value: str) -> Config:
    section, field_name = key.split(".")
    return replace(cfg, **{section: replace(getattr(cfg, section), **{field_name: value})})


def select_stage(cfg: Config, method: str, baselines: Path) -> Path:
    """<run>/samples/<class>/<i>.png: the real train images a selection method picks (max IPC per class, in
    selection order), with manifest.json naming each one's index in the train set."""
    device = setup(cfg)
    names = data_classes(cfg.data)
    k = max(cfg.evaluate.ipc or cfg.sample.ipc)
    train, _ = load_data(cfg.data, need_val=False)
    index_of = {c: (train.labels == c).nonzero().squeeze(1) for c in range(len(names))}  # train-set order
    if cfg.select.space == "latents":
        real = RealLatents(cfg, device, train)
        space = f"autoencoder latents ({real.source})"
        if not torch.equal(real.labels, train.labels):  # the cache's rows are the train set's, in its order
            raise StageError(f"select: {real.source} does not list the train set's images in its order; "
                             "run `diffdistill prepare --force` with this config")

        def rows_of(c: int) -> torch.Tensor:
            return real.of_class(c).flatten(1)  # [n_c, D]
    else:
        model, norm = _full_model(cfg, train, baselines, device)
        space = f"penultimate features of the {cfg.evaluate.nets[0]} trained on the full real train set (seed 0)"

        def rows_of(c: int) -> torch.Tensor:
            return features(model, _at_eval_size(train.images[index_of[c]], cfg).to(device), norm)  # [n_c, F]
    picks, records = [], []
    for c, name in enumerate(names):  # one class's rows on the device at a time
        chosen = SELECTORS[method](rows_of(c), k, derive_seed(cfg.seed, "select", method, name))
        picks += [(name, i, int(index_of[c][j])) for i, j in enumerate(chosen.tolist())]
    final = stage_dir(cfg.run_dir, "sample")
    with staged_dir(final, False) as out:
        for name, i, row in picks:
            save_png(hwc(train.images[row]), out / image_file(name, i))
            records.append({"file": image_file(name, i), "class": name, "index": i, "train_index": row})
        atomic_write_json(out / "manifest.json", {"method": method, "space": space, "classes": names, "ipc": k,
                                                  "prefix_stable": method in PREFIX_STABLE, "images": records})
        write_run_info(out, cfg, "select", {"method": method, "space": space})
    return final


def _at_eval_size(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    size = cfg.evaluate.image_size or cfg.data.image_size
    if x.shape[-1] == size:
        return x
    return to_uint8(F.interpolate(x.float() / 127.5 - 1, size=(size, size), mode="bilinear", antialias=True))


def _full_model(cfg: Config, train, baselines: Path, device: torch.device):
    """The seed-0 full-data classifier of the first net and its normalization, from the shared baselines."""
    net = cfg.evaluate.nets[0]
    weights = baselines / f"{net}_full_ipcNone_seed0.safetensors"
    if not weights.is_file():
        raise StageError(f"select.space=features needs the full-data {net} in {baselines} (trained by a "
                         "generative method's evaluation, which compare runs first)")
    size = cfg.evaluate.image_size or cfg.data.image_size
    model = build_classifier(net, train.channels, len(data_classes(cfg.data)), size, cfg.evaluate.width,
                             cfg.evaluate.norm)
    model.load_state_dict(load_file(str(weights)))
    return model.to(device), channel_stats(train, size, device)


def baseline_seconds(baselines: Path, trained_in: Path | None = None) -> float:
    """Training time of the shared random-real and full-data classifiers (those trained during one run)."""
    records = [json.loads(f.read_text()) for f in baselines.glob("*.json")]
    return sum(r.get("seconds", 0.0) for r in records if trained_in is None or r.get("trained_in") == str(trained_in))


def method_seconds(timing: dict, run_dir: Path, baselines: Path) -> float:
    """A run's wall time less the share of its evaluation that trained the shared baselines (the comparison's,
    not the method's). Classifiers train several at a time, so that share is the evaluation's wall time split
    in proportion to the classifiers' own times, not the baselines' summed times."""
    base = baseline_seconds(baselines, run_dir)
    own = sum(json.loads(f.read_text()).get("seconds", 0.0) for f in evaluate_jobs(run_dir).glob("*.json"))
    if "evaluate_seconds" in timing:
        share = timing["evaluate_seconds"] * base / (own + base) if own + base > 0 else 0.0
    else:  # written by an earlier version: the baselines' summed times
        share = base
    return round(max(0.0, timing["seconds"] - share), 1)


def _rows(name: str, seed: int, run_dir: Path, baselines: Path) -> list[dict]:
    res = json.loads(results_file(run_dir).read_text())
    timing = json.loads((run_dir / TIME_FILE).read_text()) if (run_dir / TIME_FILE).is_file() else {}
    seconds = method_seconds(timing, run_dir, baselines) if "seconds" in timing else None
    out = []
    for net, entry in res["by_net"].items():
        for ipc, e in entry["ipc"].items():
            metrics = (res.get("metrics") or {}).get("ipc", {}).get(ipc, {}).get("distilled", {}).get("overall", {})
            out.append({"method": name, "family": METHODS[name].family, "ipc": int(ipc), "net": net, "seed": seed,
                        "accuracy": e["distilled"]["mean"], "accuracy_std": e["distilled"]["std"],
                        "best_epoch_accuracy": e["distilled"]["best_epoch"]["mean"],
                        "fidelity": (entry.get("fidelity") or {}).get("mean"),
                        "diversity": metrics.get("diversity"), "precision": metrics.get("precision"),
                        "coverage": metrics.get("coverage"), "seconds": seconds, "run": str(run_dir),
                        "_random": e["random_real"], "_random_metrics": (res.get("metrics") or {}).get(
                            "ipc", {}).get(ipc, {}).get("random_real", {}).get("overall", {})})
    return out


def _random_rows(seed: int, root: Path, table: list[dict]) -> list[dict]:
    """Random real images: the shared random-real records, read from the first method's results that hold
    each (net, IPC) — every method of a seed is scored beside the same draws."""
    out, seen = [], set()
    for r in table:
        if r["seed"] != seed or (r["net"], r["ipc"]) in seen:
            continue
        seen.add((r["net"], r["ipc"]))
        e, m = r["_random"], r["_random_metrics"]
        out.append({"method": "random", "family": "select", "ipc": r["ipc"], "net": r["net"], "seed": seed,
                    "accuracy": e["mean"], "accuracy_std": e["std"], "best_epoch_accuracy": e["best_epoch"]["mean"],
                    "fidelity": None, "diversity": m.get("diversity"), "precision": m.get("precision"),
                    "coverage": m.get("coverage"), "seconds": 0.0, "run": str(root / f"baselines-s{seed}")})
    return out


def summarize(table: list[dict]) -> list[dict]:
    """Per (method, net, IPC): (mean, std, min, max) over seeds of accuracy and the other columns."""
    groups: dict[tuple, list[dict]] = {}
    for r in table:
        groups.setdefault((r["method"], r["net"], r["ipc"]), []).append(r)
    out = []
    for (method, net, ipc), rs in groups.items():
        entry: dict = {"method": method, "net": net, "ipc": ipc, "seeds": len(rs)}
        for key in ("accuracy", "fidelity", "diversity", "precision", "coverage", "seconds"):
            vals = [r[key] for r in rs if r[key] is not None]
            if vals:
                entry[key] = spread(vals)
        out.append(entry)
    return out


def _pm(v: tuple | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def compare_table(summary: list[dict], seeds: list[int], shared_seconds: float | None,
                  baselines_seconds: float) -> str:
    shared = f"the shared pretraining took {shared_seconds / 60:.1f} min, " if shared_seconds else ""
    lines = [f"Final-epoch accuracy (%) on the real val set, mean ± std over {len(seeds)} seed(s) "
             f"({', '.join(map(str, seeds))}); each seed's value is the mean over the evaluation's classifier seeds. "
             "Gap = method − random real images (same nets, seeds and draws). Time = the method's own wall time "
             f"per seed (fine-tuning, sampling or selection, its evaluation, less its share of the shared "
             f"classifiers); {shared}the shared random-real and full-data classifiers "
             f"{baselines_seconds / 60 / max(len(seeds), 1):.1f} min per seed (their training times summed; "
             "several train at a time).",
             "", "| method | net | IPC | accuracy | gap to random | fidelity | diversity | precision | coverage | "
             "time / seed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    random = {(e["net"], e["ipc"]): e["accuracy"][0] for e in summary if e["method"] == "random"}
    for e in sorted(summary, key=lambda e: (e["net"], e["ipc"])):
        gap = e["accuracy"][0] - random[(e["net"], e["ipc"])] if (e["net"], e["ipc"]) in random else None
        sec = e.get("seconds")
        lines.append(f"| {e['method']} | {e['net']} | {e['ipc']} | **{_pm(e.get('accuracy'))}** | "
                     f"{'—' if gap is None else f'{gap:+.1f}'} | {_pm(e.get('fidelity'))} | "
                     f"{_pm(e.get('diversity'), 3)} | {_pm(e.get('precision'), 3)} | {_pm(e.get('coverage'), 3)} | "
                     f"{'—' if not sec else f'{sec[0] / 60:.1f} min'} |")
    return "\n".join(lines)


def _write_outputs(root: Path, table: list[dict], methods: list[str], seeds: list[int]) -> None:
    rows = [{k: r[k] for k in CSV_FIELDS} for r in table]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / "compare.csv", buf.getvalue())
    summary = summarize(rows)
    order = {m: i for i, m in enumerate(methods)}
    summary.sort(key=lambda e: order[e["method"]])
    shared = root / "shared" / TIME_FILE
    shared_seconds = json.loads(shared.read_text())["seconds"] if shared.is_file() else None
    baselines = sum(baseline_seconds(root / f"baselines-s{seed}") for seed in seeds)
    atomic_write_text(root / "compare.md", compare_table(summary, seeds, shared_seconds, baselines) + "\n")
    atomic_write_bytes(root / "compare.png", compare_plot(summary))
