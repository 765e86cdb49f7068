"""The one user-facing error type, and the translation of "weights not found" into an actionable line.

Imports nothing from the package, so every module (models/, data/, the pure math) can raise it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class StageError(RuntimeError):
    """A user-facing problem (bad input, missing file): printed as one line, exit code 2."""


def load_pretrained(load: Callable[[], T], source: str, key: str, revision: str | None = None) -> T:
    """Run `load` (a from_pretrained call); turn "not found / offline" into one line saying what to download."""
    try:
        return load()
    except (OSError, ValueError) as err:
        local = Path(source).exists()
        rev = f" --revision {revision}" if revision else ""
        where = (
            f"the folder {source} does not hold diffusers weights ({str(err).splitlines()[0]})"
            if local
            else f"'{source}' is not on disk and cannot be downloaded here; download it on a machine with "
            f"internet (hf download {source}{rev} --local-dir DIR), copy DIR here and set {key}=DIR"
        )
        raise StageError(f"{key}: {where}") from None
