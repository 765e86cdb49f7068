"""diffdistill: generative dataset distillation with a class-conditional DiT and self-adaptive memory.

    import diffdistill as dd
    result = dd.run(dd.load_config("configs/demo-digits.yaml"))

The functions below are those of `diffdistill.api`, imported on first use (importing the package itself
loads nothing heavy).
"""

__version__ = "0.1.0"

API = ("load_config", "plan", "run", "prepare", "pretrain", "check", "finetune", "sample", "evaluate", "report",
       "sweep", "compare", "scoring_config", "Result")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from diffdistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffdistill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
