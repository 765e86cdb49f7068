"""`diffdistill STAGE CONFIG [key=value ...]` — argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from diffdistill import __version__, api
from diffdistill.api import say
from diffdistill.config import ConfigError
from diffdistill.errors import StageError
from diffdistill.runs import TRAINING_STAGES

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
    "compare": "ways of making the small set side by side under one protocol (--methods random,herding,kcenter,"
               "kmeans,dit,mgd3,d4m,none,minimax,adaptive): compare.csv, compare.md and a plot",
    "run": "every stage in order: prepare (if a training stage reads the cache), pretrain (if steps > 0), "
           "check (after pretrain, if pretrain.check_images > 0 and evaluate.full), finetune (if steps > 0), "
           "sample, evaluate, report",
}


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
        if name in ("sweep", "compare"):
            p.add_argument("--seeds", metavar="S1,S2", help="the run seeds (default: the file's, or 0)"
                           if name == "sweep" else "the run seeds of every method (default: the config's seed)")
        if name == "compare":
            p.add_argument("--methods", required=True, metavar="M1,M2",
                           help="methods separated by commas: random, herding, kcenter, kmeans (real images); dit, "
                                "mgd3, d4m (the pretrained DiT, training-free); none, minimax, adaptive (fine-tuned)")
        if name == "sweep":
            p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                           help="sweep KEY over these values, the other keys at the config's (repeatable)")
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
            from diffdistill.stages.sweep import parse_seeds

            root = api.sweep(args.config, args.overrides, args.vary, parse_seeds(args.seeds))
            say((root / "summary.md").read_text())
            say(f"sweep: {root / 'sweep.csv'}, {root / 'sweep.png'}")
            return 0
        if args.stage == "compare":
            from diffdistill.stages.sweep import parse_seeds

            root = api.compare(args.config, args.methods, parse_seeds(args.seeds), args.overrides, args.dry_run)
            if args.dry_run:
                return 0
            say((root / "compare.md").read_text())
            say(f"compare: {root / 'compare.csv'}, {root / 'compare.png'}")
            return 0
        if args.stage == "report" and Path(args.config).is_dir():  # `diffdistill report RUN_DIR`
            api.report(args.config)
            return 0
        if args.stage == "report" and not Path(args.config).is_file():
            raise StageError(f"report: {args.config} is neither a run folder nor a config file (a run folder "
                             "holds evaluate/results.json, e.g. runs/demo-digits)")
        overrides = args.overrides + (["evaluate.pool=true"] if getattr(args, "pool", False) else [])
        cfg = api.load_config(args.config, overrides)
        if args.distilled and not any(o.startswith("name=") for o in overrides):
            cfg = api.scoring_config(cfg, args.distilled)
        if args.dry_run:
            say("\n".join(api.plan(cfg, None if args.stage == "run" else [args.stage], args.distilled)))
            return 0
        actions: dict[str, Callable[[], object]] = {
            "run": lambda: api.run(cfg, args.force, args.resume),
            "prepare": lambda: say(f"latent cache: {api.prepare(cfg, args.force)}"),
            "pretrain": lambda: api.pretrain(cfg, args.force, args.resume),
            "check": lambda: api.check(cfg),
            "finetune": lambda: api.finetune(cfg, args.force, args.resume),
            "sample": lambda: api.sample(cfg, args.force),
            "evaluate": lambda: api.evaluate(cfg, args.force, args.distilled),
            "report": lambda: api.report(cfg.run_dir),
        }
        actions[args.stage]()
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


def _leave_process_group() -> None:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
