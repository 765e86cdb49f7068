"""`diffdistill STAGE CONFIG [key=value ...]` — argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from diffdistill import __version__
from diffdistill.config import Config, ConfigError, load_config
from diffdistill.distributed import is_main
from diffdistill.errors import StageError
from diffdistill.files import check_output_free
from diffdistill.preflight import check_plan
from diffdistill.recipe import describe, resolve_config
from diffdistill.runs import (
    STAGE_FOLDERS,
    TRAINING_STAGES,
    checkpoint_root,
    generator_check_file,
    run_order,
    stage_dir,
)

STAGE_HELP = {
    "prepare": "encode the train images once into the latent cache (read by finetune.latents=cache)",
    "pretrain": "train a class-conditional DiT from scratch on data.train",
    "check": "fidelity estimate of the pretrained DiT: a classifier trained on the real data scores "
             "pretrain.check_images samples per class (run does this right after pretrain)",
    "finetune": "fine-tune the DiT with the memory losses (finetune.init: pretrain, a folder or a hub id)",
    "sample": "generate max(sample.ipc) images per class into <run>/samples",
    "evaluate": "train small classifiers on the distilled set, random-real subsets and the full data",
    "report": "write results.json, report.md and PNGs at the top of the run folder (CONFIG or the run folder)",
    "sweep": "many runs over config values × seeds (a sweep file, or CONFIG --vary KEY=V1,V2): one CSV and a plot",
    "run": "every stage in order: prepare (if a training stage reads the cache), pretrain (if steps > 0), "
           "check (after pretrain, if pretrain.check_images > 0), finetune (if steps > 0), sample, evaluate, report",
}


def _report(run_dir: Path) -> None:
    """Write the run's report and print its table (rank 0 only: the other ranks have nothing to write)."""
    from diffdistill.report import write_report

    if is_main():
        print(write_report(run_dir))
        print(f"\nreport: {run_dir / 'report.md'}")


def _actions() -> dict[str, Callable[[Config, argparse.Namespace], object]]:
    from diffdistill.check import generator_check
    from diffdistill.evaluate import evaluate_stage
    from diffdistill.prepare import prepare_stage
    from diffdistill.sample import sample_stage
    from diffdistill.train import train_stage

    return {
        # `run --force` redoes the run's stages, never the (shared, expensive) cache
        "prepare": lambda cfg, a: print(f"latent cache: {prepare_stage(cfg, a.force and a.stage == 'prepare')}"),
        "pretrain": lambda cfg, a: train_stage(cfg, "pretrain", a.force, a.resume),
        "check": lambda cfg, a: generator_check(cfg),
        "finetune": lambda cfg, a: train_stage(cfg, "finetune", a.force, a.resume),
        "sample": lambda cfg, a: sample_stage(cfg, a.force),
        "evaluate": lambda cfg, a: (evaluate_stage(cfg, a.force, a.distilled), _report(cfg.run_dir)),
        "report": lambda cfg, a: _report(cfg.run_dir),
    }


def say(text: str) -> None:
    if is_main():
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffdistill",
        description="Generative dataset distillation: DiT + self-adaptive memory.",
        epilog="Overrides use dotted keys, e.g. finetune.memory.policy=fifo data.train=DIR sample.ipc=[1,10]",
    )
    parser.add_argument("--version", action="version", version=f"diffdistill {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config file (e.g. configs/demo-digits.yaml)"
                       + (" or a sweep file" if name == "sweep" else " or a run folder" if name == "report" else ""))
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
        p.add_argument("--force", action="store_true", help="overwrite existing stage output folders")
        if name in ("pretrain", "finetune", "run"):
            p.add_argument("--resume", action="store_true",
                           help="continue an interrupted training stage from its newest checkpoint")
        if name in ("evaluate", "run"):
            p.add_argument("--pool", action="store_true",
                           help="draw IPC images per class at random (seeded) from a larger set (evaluate.pool=true)")
        if name == "sweep":
            p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                           help="sweep KEY over these values, the other keys at the config's (repeatable)")
            p.add_argument("--seeds", metavar="S1,S2", help="the run seeds of every point (default: the file's, or 0)")
        if name not in ("report", "sweep"):
            p.add_argument("--dry-run", action="store_true",
                           help="check the whole plan (data, IPC, models, outputs) and print it; train nothing")
        if name == "evaluate":
            p.add_argument("--distilled", metavar="DIR",
                           help="score this folder of class subfolders instead of <run>/samples")
    parser.set_defaults(distilled=None, resume=False, dry_run=False)
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE may also come after a flag (`run CONFIG --resume name=x`): argparse leaves those over
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    try:
        if args.stage == "sweep":
            from diffdistill.sweep import load_sweep, parse_seeds, run_sweep

            root = run_sweep(load_sweep(args.config, args.overrides, args.vary, parse_seeds(args.seeds)))
            say((root / "summary.md").read_text())
            say(f"sweep: {root / 'sweep.csv'}, {root / 'sweep.png'}")
            return 0
        if args.stage == "report" and Path(args.config).is_dir():  # `diffdistill report RUN_DIR`
            _report(Path(args.config))
            return 0
        overrides = args.overrides + (["evaluate.pool=true"] if getattr(args, "pool", False) else [])
        if args.distilled and not any(o.startswith("name=") for o in overrides):
            # a set made elsewhere gets its own run folder: scoring it never touches another run's outputs
            overrides.append(f"name={_set_name(args.distilled)}")
        cfg = resolve_config(load_config(args.config, overrides))
        for line in describe(cfg):
            say(line)
        order = run_order(cfg) if args.stage == "run" else [args.stage]
        plan = check_plan(cfg, order, args.distilled) if args.stage != "report" else None
        if not (args.force or args.resume):  # fail before any work, not after an hour of training
            for name in order:
                if name in STAGE_FOLDERS:
                    check_output_free(stage_dir(cfg.run_dir, name), False)
        if args.dry_run:
            say("\n".join([f"plan for {cfg.run_dir} (nothing was run):", *plan.lines]))
            return 0
        actions = _actions()
        if args.stage != "run":
            actions[args.stage](cfg, args)
            return 0
        start = time.perf_counter()
        for number, name in enumerate(order, start=1):
            output = generator_check_file(cfg.run_dir) if name == "check" else \
                stage_dir(cfg.run_dir, name) if name in STAGE_FOLDERS else None
            if args.resume and output is not None and output.exists() and not (
                    name in TRAINING_STAGES and checkpoint_root(cfg.run_dir, name).is_dir()):
                say(f"== {name} ({number}/{len(order)}) == done before: {output}")
                continue
            say(f"== {name} ({number}/{len(order)}) ==")
            t0 = time.perf_counter()
            actions[name](cfg, args)
            say(f"{name} took {_clock(time.perf_counter() - t0)} ({_clock(time.perf_counter() - start)} so far)")
        say(f"done in {_clock(time.perf_counter() - start)}: {cfg.run_dir}")
    except (ConfigError, StageError) as err:
        print(f"diffdistill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "the same command" + (" with --resume" if args.stage in ("run", *TRAINING_STAGES) else "")
        print(f"diffdistill: interrupted; {again} continues where it stopped", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return 0


def _set_name(folder: str) -> str:
    """The run name for scoring `folder`: its own name (its run's name for a run's `samples` folder)."""
    path = Path(folder).resolve()
    return f"{path.parent.name}-{path.name}" if path.name == STAGE_FOLDERS["sample"] else path.name


def _clock(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec} s" if minutes else f"{sec} s"


def _leave_process_group() -> None:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
