"""Files written atomically: a temp file or folder beside the target, renamed into place when complete.

A failed or interrupted write never leaves a half-written output, and a stage's folder appears only once
the stage has finished (`staged_dir`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from diffdistill.errors import StageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output_free(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise StageError(f"output folder {path} exists; pass --resume to continue an interrupted run, --force to "
                         "redo it, or set name=... for a new run")


@contextmanager
def staged_dir(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` (which must not exist unless
    `force`). On failure nothing is left behind, and an existing `final` is untouched."""
    check_output_free(final, force)
    created = [p for p in [final.parent, *final.parent.parents] if not p.exists()]  # made here, removed on failure
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    except OSError as err:
        raise StageError(f"cannot write the output folder {final.parent}: {err.strerror or err}") from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        replace_dir(tmp, final)
        for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first; only if nothing else was put there meanwhile
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def replace_dir(src: Path, final: Path) -> None:
    """Move the finished folder `src` to `final`, replacing an existing `final` (two renames)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, final)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp name, then rename (read back with torch.load(weights_only=True))."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
