"""The Python API — the command line's stages as functions, for notebooks and scripts:

    import diffdistill as dd
    cfg = dd.load_config("configs/demo-digits.yaml", ["pretrain.steps=300"])
    print("\\n".join(dd.plan(cfg)))        # what `run` would do; checks everything first
    result = dd.run(cfg)                   # every stage; result.table(): one row per net and IPC
    other = dd.evaluate(dd.scoring_config(cfg, "path/to/set"), distilled="path/to/set")  # a set made elsewhere

Every function checks what it can before it starts (as the CLI does) and raises `ConfigError` / `StageError`
with the same one-line messages. Each returns a `Result` (the run folder, its results.json as a dict).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffdistill.config import Config
from diffdistill.config import load_config as _read_config
from diffdistill.distributed import is_main
from diffdistill.files import check_output_free
from diffdistill.preflight import check_plan
from diffdistill.recipe import describe, resolve_config
from diffdistill.runs import (
    STAGE_FOLDERS,
    TRAINING_STAGES,
    changed_settings,
    check_classifier_file,
    checkpoint_root,
    generator_check_file,
    judge_missing,
    remade_inputs,
    results_file,
    run_order,
    stage_dir,
    stage_reads,
)


def say(text: str) -> None:
    """Print on rank 0 only (under torchrun every rank runs the same code)."""
    if is_main():
        print(text, flush=True)


@dataclass(frozen=True)
class Result:
    """A run folder and what it holds so far."""

    run_dir: Path

    @property
    def results(self) -> dict | None:
        """results.json of the evaluation (None before `evaluate`)."""
        path = results_file(self.run_dir)
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def report(self) -> Path | None:
        path = self.run_dir / "report.md"
        return path if path.is_file() else None

    def table(self) -> list[dict[str, Any]]:
        """One row per (net, IPC): final-epoch accuracy (mean over seeds) of the distilled set and of random
        real images, their gap, and the fidelity of the distilled set."""
        res = self.results or {}
        rows = []
        for net, entry in (res.get("by_net") or {}).items():
            fidelity = (entry.get("fidelity") or {}).get("mean")
            for ipc, e in entry["ipc"].items():
                rows.append({"net": net, "ipc": int(ipc), "distilled": e["distilled"]["mean"],
                             "random_real": e["random_real"]["mean"], "gap": e["gap_over_random_real"],
                             "fidelity": fidelity})
        return rows

    def __repr__(self) -> str:
        rows = self.table()
        shown = "; ".join(f"{r['net']} IPC {r['ipc']}: {r['distilled']:.1f} vs {r['random_real']:.1f} random"
                          for r in rows)
        return f"Result({str(self.run_dir)!r}{', ' + shown if rows else ''})"


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A config file plus dotted `key=value` overrides, its `auto` values sized to its data (and said)."""
    cfg = resolve_config(_read_config(path, overrides))
    for line in describe(cfg):
        say(line)
    return cfg


def plan(cfg: Config, stages: Sequence[str] | None = None, distilled: str | None = None,
         timed: bool = True) -> list[str]:
    """Check `stages` (default: what `run` does) without running anything; the plan, one line per item, and
    (`timed`) a time estimate from a few timed steps of fresh models."""
    order = list(stages) if stages is not None else run_order(cfg)
    return [f"plan for {cfg.run_dir} (nothing was run):", *check_plan(cfg, order, distilled, timed).lines]


def _start(cfg: Config, order: list[str], force: bool, resume: bool, distilled: str | None = None) -> None:
    check_plan(cfg, order, distilled)
    if not (force or resume):  # fail before any work, not after an hour of training
        for name in order:
            if name in STAGE_FOLDERS:
                check_output_free(stage_dir(cfg.run_dir, name), False)


def prepare(cfg: Config, force: bool = False) -> Path:
    """Encode the train images once into the latent cache; returns the cache folder."""
    from diffdistill.stages.prepare import prepare_stage

    _start(cfg, ["prepare"], force, False)
    return prepare_stage(cfg, force)


def pretrain(cfg: Config, force: bool = False, resume: bool = False) -> Result:
    return _train(cfg, "pretrain", force, resume)


def finetune(cfg: Config, force: bool = False, resume: bool = False) -> Result:
    return _train(cfg, "finetune", force, resume)


def _train(cfg: Config, stage: str, force: bool, resume: bool, checked: bool = False) -> Result:
    from diffdistill.stages.check import FidelityProbe
    from diffdistill.stages.train import train_stage

    if not checked:
        _start(cfg, [stage], force, resume)
    # pretrain.max_steps: pretraining goes on while the generator check on the way is below its goal
    probe = FidelityProbe(cfg) if stage == "pretrain" and cfg.pretrain.max_steps else None
    train_stage(cfg, stage, force, resume, probe)
    return Result(cfg.run_dir)


def check(cfg: Config) -> dict:
    """The generator check after pretraining: check.json as a dict (its line is printed too)."""
    from diffdistill.stages.check import generator_check

    _start(cfg, ["check"], True, False)
    return json.loads(generator_check(cfg).read_text())


def sample(cfg: Config, force: bool = False, checked: bool = False) -> Result:
    from diffdistill.stages.sample import sample_stage

    if not checked:
        _start(cfg, ["sample"], force, False)
    sample_stage(cfg, force)
    return Result(cfg.run_dir)


def evaluate(cfg: Config, force: bool = False, distilled: str | None = None, checked: bool = False) -> Result:
    """Score the run's samples, or the folder `distilled`, and write the report. To score a set made elsewhere
    into a run of its own, as the command line does, pass `scoring_config(cfg, distilled)` as `cfg`."""
    from diffdistill.stages.evaluate import evaluate_stage

    if not checked:
        _start(cfg, ["evaluate"], force, False, distilled)
    evaluate_stage(cfg, force, distilled)
    return report(cfg.run_dir)


def scoring_config(cfg: Config, distilled: str) -> Config:
    """`cfg` renamed after the set `distilled`, so that scoring it never touches another run's outputs."""
    path = Path(distilled).resolve()
    name = f"{path.parent.name}-{path.name}" if path.name == STAGE_FOLDERS["sample"] else path.name
    return replace(cfg, name=name)


def report(run_dir: str | Path) -> Result:
    """Write report.md, results.json and the PNGs at the top of the run folder; print the table."""
    from diffdistill.stages.report import write_report

    run_dir = Path(run_dir)
    if is_main():
        print(write_report(run_dir))
        print(f"\nreport: {run_dir / 'report.md'}")
    return Result(run_dir)


def run(cfg: Config, force: bool = False, resume: bool = False) -> Result:
    """Every stage in order (`runs.run_order`); `resume` skips finished stages and continues the interrupted
    one; `force` redoes them (never the shared latent cache)."""
    from diffdistill.stages.check import generator_check
    from diffdistill.stages.prepare import prepare_stage

    order = run_order(cfg)
    _start(cfg, order, force, resume)
    actions = {  # each called with (force, resume)
        "prepare": lambda f, r: say(f"latent cache: {prepare_stage(cfg, False)}"),
        "pretrain": lambda f, r: _train(cfg, "pretrain", f, r, checked=True),
        "check": lambda f, r: generator_check(cfg),
        "finetune": lambda f, r: _train(cfg, "finetune", f, r, checked=True),
        "sample": lambda f, r: sample(cfg, f, checked=True),
        "evaluate": lambda f, r: evaluate(cfg, f, checked=True),
    }
    start, ran = time.perf_counter(), set()
    for number, name in enumerate(order, start=1):
        output = generator_check_file(cfg.run_dir) if name == "check" else \
            stage_dir(cfg.run_dir, name) if name in STAGE_FOLDERS else None
        done = resume and output is not None and output.exists() and not (
            name in TRAINING_STAGES and checkpoint_root(cfg.run_dir, name).is_dir())
        # resuming: a stage it reads ran now, or was made again since it ran (in an earlier, interrupted --resume)
        remade = ([u for u in stage_reads(cfg, name) if u in ran] or (remade_inputs(cfg, name) if done else [])) \
            if resume else []
        changed = changed_settings(cfg, name) if done else []
        # sampling reads the check's classifier: one it cannot use (missing, or without class means) is made again
        unusable = judge_missing(check_classifier_file(cfg.run_dir), cfg.sample) \
            if done and name == "check" and cfg.sample.judged else None
        if done and not remade and not changed and not unusable:
            say(f"== {name} ({number}/{len(order)}) == done before: {output}")
            continue
        why = []
        if changed:
            why.append(f"before with other settings ({'; '.join(changed)})")
        if unusable:
            why.append(f"before, but its classifier {check_classifier_file(cfg.run_dir)} {unusable}")
        if remade and done:
            why.append(f"before {' and '.join(remade)} {'were' if len(remade) > 1 else 'was'} made again")
        say(f"== {name} ({number}/{len(order)}) ==" + (f" done {', and '.join(why)}: running it again" if why else ""))
        t0 = time.perf_counter()
        again = bool(remade or changed)  # made again over its finished output: forced, not resumed
        actions[name](force or again, resume and not again)
        ran.add(name)
        say(f"{name} took {clock(time.perf_counter() - t0)} ({clock(time.perf_counter() - start)} so far)")
    say(f"done in {clock(time.perf_counter() - start)}: {cfg.run_dir}")
    if "evaluate" not in ran:  # its report printed them; a resumed run whose evaluation was done before says them here
        _close_with_verdicts(cfg.run_dir)
    return Result(cfg.run_dir)


def _close_with_verdicts(run_dir: Path) -> None:
    """Where the distilled set scores below random real images, one line per IPC with the likely cause (the
    report's first lines)."""
    from diffdistill.stages.report import verdicts

    file = results_file(run_dir)
    if not is_main() or not file.is_file():
        return
    try:
        results = json.loads(file.read_text())
        lines = [f"below random real ({results['net']}): {line}" for line in verdicts(results)]
    except (KeyError, TypeError, ValueError) as e:  # a results.json of an older version: the run itself is done
        lines = [f"(could not read {file} for the comparison with random real images: {e!r})"]
    for line in lines:
        print(line, flush=True)


def sweep(path: str | Path, overrides: Sequence[str] = (), vary: Sequence[str] = (),
          seeds: Sequence[int] | None = None) -> Path:
    """Runs over config values × seeds (a sweep file, or a config with `vary` = ["KEY=V1,V2"]); returns the
    sweep folder (sweep.csv, summary.md, sweep.png)."""
    from diffdistill.stages.sweep import load_sweep, run_sweep

    return run_sweep(load_sweep(str(path), list(overrides), list(vary), list(seeds) if seeds else None))


def compare(config: str | Path, methods: str | Sequence[str], seeds: Sequence[int] | None = None,
            overrides: Sequence[str] = (), dry_run: bool = False) -> Path:
    """Methods side by side under one evaluation protocol (`stages.compare.METHODS`; a list or "a,b,c"), over
    `seeds` (default: the config's); returns the folder with compare.csv, compare.md and compare.png
    (`dry_run`: only checked and printed)."""
    from diffdistill.stages.compare import parse_methods, run_compare

    names = parse_methods(methods if isinstance(methods, str) else ",".join(methods))
    if seeds is None:
        seeds = [_read_config(config, overrides).seed]
    return run_compare(config, names, list(seeds), list(overrides), dry_run)


def clock(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec} s" if minutes else f"{sec} s"
