"""`diffdistill sweep`: many runs that differ in a few config keys, × seeds, summarized in one CSV and a
plot in the style of the paper's Fig. 4 (mean line, min–max band over seeds, default marked).

A sweep file (YAML) names a base config, seeds and points; each point is a label, the overrides that
define it, and optionally a group (one line in the plot) and an x value:

    config: demo-digits.yaml            # relative to the sweep file
    name: ablation-demo
    seeds: [0, 1, 2]                    # the run's `seed`: fine-tuning, sampling and evaluation
    overrides: [evaluate.seeds=1]       # applied to every point
    x_label: λ as a multiple of the paper's
    default_x: 1
    points:
      - {label: adaptive-1x, group: adaptive, x: 1, set: {}}
      - {label: fifo-1x, group: fifo, x: 1, set: {finetune.memory.policy: fifo}}

`diffdistill sweep CONFIG --vary KEY=V1,V2,... --seeds 0,1` makes the same from the command line (each
KEY swept alone, the others at the config's values). When the base config pretrains and no point changes
what pretraining depends on, one pretrained model is shared by every point and seed (its seed is the base
config's); each point then runs finetune, sample, evaluate and report in `<out_dir>/<name>/<label>-s<seed>/`.
A rerun skips finished runs.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from diffdistill.config import Config, ConfigError, build_config, read_yaml, to_dict
from diffdistill.errors import StageError
from diffdistill.files import atomic_write_bytes, atomic_write_text
from diffdistill.metrics import spread
from diffdistill.plots import fig4_plot
from diffdistill.recipe import describe, resolve_config
from diffdistill.runs import CHECK_OFF, reads_check, results_file, stage_dir

# keys a point may not change if the pretrained model is shared (they change what pretraining makes)
PRETRAIN_KEYS = ("pretrain.", "data.", "model.", "diffusion.", "autoencoder.", "prepare.")
CSV_FIELDS = ("label", "group", "x", "seed", "net", "ipc", "distilled", "random_real", "gap", "full", "fidelity",
              "diversity", "precision", "recall", "coverage", "random_real_diversity", "run")


@dataclass
class Point:
    label: str
    overrides: list[str]
    group: str = ""
    x: float | None = None


@dataclass
class Sweep:
    base: dict  # the base config mapping (YAML, `base:` resolved)
    name: str
    seeds: list[int]
    points: list[Point]
    common: list[str] = field(default_factory=list)
    x_label: str = "value"
    default_x: float | None = None


def _as_overrides(values: dict, where: str) -> list[str]:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: 'set' must be a mapping of dotted keys to values")
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def load_sweep(path: str | Path, overrides: list[str], vary: list[str], seeds: list[int] | None) -> Sweep:
    """A sweep file, or a plain config plus --vary options."""
    path = Path(path)
    raw = read_yaml(path)
    if "points" in raw or "config" in raw:
        base = read_yaml((path.parent / raw.get("config", "")).resolve()) if raw.get("config") else {}
        points = []
        for i, p in enumerate(raw.get("points") or []):
            where = f"{path}: points[{i}]"
            if not isinstance(p, dict) or "label" not in p:
                raise ConfigError(f"{where}: expected a mapping with 'label' and 'set'")
            points.append(Point(str(p["label"]), _as_overrides(p.get("set") or {}, where), str(p.get("group", "")),
                                p.get("x")))
        sweep = Sweep(base, str(raw.get("name", path.stem)), list(raw.get("seeds", [0])), points,
                      list(raw.get("overrides", [])), str(raw.get("x_label", "value")), raw.get("default_x"))
    else:
        sweep = Sweep(raw, f"{raw.get('name', path.stem)}-sweep", [0], [])
    sweep.common += overrides
    for spec in vary:
        key, _, values = spec.partition("=")
        if not key or not values:
            raise ConfigError(f"--vary {spec!r}: expected KEY=V1,V2,... e.g. finetune.memory.lambda_gen=0.002,0.008")
        for v in values.split(","):
            sweep.points.append(Point(f"{key}={v}", [f"{key}={v}"], key, _number(v)))
        sweep.x_label = key
    if seeds is not None:
        sweep.seeds = seeds
    if not sweep.points:
        raise ConfigError(f"{path}: nothing to sweep; give points in a sweep file or --vary KEY=V1,V2")
    for p in sweep.points:  # fail on a bad key or value before any run
        build_config(sweep.base, [*sweep.common, *p.overrides])
    if vary:  # the config's own value of the (last) swept key is the default
        default = to_dict(build_config(sweep.base, sweep.common))
        sweep.default_x = _number(str(_get(default, sweep.x_label)))
    return sweep


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def run_sweep(sweep: Sweep, out_dir: str | None = None) -> Path:
    """Run every (point, seed) not already finished; write sweep.csv, summary.md and sweep.png."""
    from diffdistill.stages.evaluate import evaluate_stage
    from diffdistill.stages.report import write_report
    from diffdistill.stages.sample import sample_stage
    from diffdistill.stages.train import train_stage

    varied = next((k for p in sweep.points for o in p.overrides if (k := o.split("=")[0]) in CHECK_OFF), None)
    if varied:
        raise ConfigError(f"sweep {sweep.name}: {varied} needs the generator check, and a sweep "
                          "runs no check; leave it out of the points")
    base = _build(sweep.base, sweep.common)
    off = reads_check(base)  # every point samples as drawn and pretrains for pretrain.steps
    for key, value, why in off:
        print(f"sweep {sweep.name}: {key}={value} is off here ({why}, and a sweep runs no check)", flush=True)
    if off:
        sweep = replace(sweep, common=[*sweep.common, *(f"{key}={CHECK_OFF[key]}" for key, _, _ in off)])
        base = _build(sweep.base, sweep.common)
    root = Path(out_dir or base.out_dir) / sweep.name
    shared = base.pretrain.steps > 0 and not any(o.split("=")[0].startswith(PRETRAIN_KEYS)
                                                 for p in sweep.points for o in p.overrides)
    extra = []
    if shared:
        pre_cfg = _build(sweep.base, [*sweep.common, f"out_dir={root}", "name=shared"])
        if not stage_dir(pre_cfg.run_dir, "pretrain").is_dir():
            print(f"== sweep {sweep.name}: shared pretraining ==", flush=True)
            train_stage(pre_cfg, "pretrain", force=False, resume=True)
        extra = ["pretrain.steps=0", f"finetune.init={stage_dir(pre_cfg.run_dir, 'pretrain') / 'ema'}"]
    table = []
    total = len(sweep.points) * len(sweep.seeds)
    for n, (point, seed) in enumerate(((p, s) for p in sweep.points for s in sweep.seeds), start=1):
        cfg = _build(sweep.base, [*sweep.common, *point.overrides, *extra, f"seed={seed}",
                                        f"out_dir={root}", f"name={_safe(point.label)}-s{seed}"])
        results = results_file(cfg.run_dir)
        if not results.is_file():
            print(f"== sweep {sweep.name} [{n}/{total}]: {point.label}, seed {seed} ==", flush=True)
            if cfg.finetune.steps > 0 and not stage_dir(cfg.run_dir, "finetune").is_dir():
                train_stage(cfg, "finetune", force=False, resume=True)
            if not stage_dir(cfg.run_dir, "sample").is_dir():
                sample_stage(cfg)
            evaluate_stage(cfg, force=True)
            write_report(cfg.run_dir)
        table += _table_entries(point, seed, json.loads(results.read_text()), cfg.run_dir)
    _write_outputs(sweep, root, table)
    return root


def _build(raw: dict, overrides: list[str]) -> Config:
    """A point's config with its auto values sized to its data (and said, once per config)."""
    cfg = resolve_config(build_config(raw, overrides))
    for line in describe(cfg):
        print(line, flush=True)
    return cfg


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)


def _table_entries(point: Point, seed: int, res: dict, run_dir: Path) -> list[dict]:
    out = []
    for net, entry in res["by_net"].items():
        for ipc, e in entry["ipc"].items():
            metrics = (res.get("metrics") or {}).get("ipc", {}).get(ipc, {})
            d, r = metrics.get("distilled", {}).get("overall", {}), metrics.get("random_real", {}).get("overall", {})
            out.append({"label": point.label, "group": point.group, "x": point.x, "seed": seed, "net": net,
                        "ipc": int(ipc), "distilled": e["distilled"]["mean"], "random_real": e["random_real"]["mean"],
                        "gap": e["gap_over_random_real"], "full": (entry.get("full") or {}).get("mean"),
                        "fidelity": (entry.get("fidelity") or {}).get("mean"), "diversity": d.get("diversity"),
                        "precision": d.get("precision"), "recall": d.get("recall"), "coverage": d.get("coverage"),
                        "random_real_diversity": r.get("diversity"), "run": str(run_dir)})
    return out


def summarize(table: list[dict]) -> list[dict]:
    """Mean ± std (over seeds) per (label, net, IPC) of the distilled accuracy and the other columns."""
    groups: dict[tuple, list[dict]] = {}
    for r in table:
        groups.setdefault((r["label"], r["net"], r["ipc"]), []).append(r)
    out = []
    for (label, net, ipc), rs in groups.items():
        entry = {"label": label, "group": rs[0]["group"], "x": rs[0]["x"], "net": net, "ipc": ipc, "seeds": len(rs)}
        for key in ("distilled", "random_real", "gap", "fidelity", "diversity", "precision", "coverage"):
            vals = [r[key] for r in rs if r[key] is not None]
            if vals:
                entry[key] = spread(vals)
        out.append(entry)
    return out


def _write_outputs(sweep: Sweep, root: Path, table: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(root / "sweep.csv", buf.getvalue())
    summary = summarize(table)
    atomic_write_text(root / "summary.md", summary_table(summary, len(sweep.seeds)) + "\n")
    atomic_write_bytes(root / "sweep.png", fig4_plot(summary, sweep.x_label, sweep.default_x))
    atomic_write_text(root / "sweep.yaml", yaml.safe_dump({
        "name": sweep.name, "seeds": sweep.seeds, "overrides": sweep.common, "x_label": sweep.x_label,
        "default_x": sweep.default_x, "points": [p.__dict__ for p in sweep.points]}, sort_keys=False))


def _pm(v: tuple | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def summary_table(summary: list[dict], seeds: int) -> str:
    lines = [f"Mean ± std over {seeds} seeds (final-epoch accuracy, %).", "",
             "| point | net | IPC | distilled | random real | gap | fidelity | diversity | precision | coverage |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in summary:
        lines.append(f"| {e['label']} | {e['net']} | {e['ipc']} | **{_pm(e.get('distilled'))}** | "
                     f"{_pm(e.get('random_real'))} | {_pm(e.get('gap'))} | {_pm(e.get('fidelity'))} | "
                     f"{_pm(e.get('diversity'), 3)} | {_pm(e.get('precision'), 3)} | {_pm(e.get('coverage'), 3)} |")
    return "\n".join(lines)


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise StageError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None

