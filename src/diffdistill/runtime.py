"""Process-level setup and provenance: device choice, thread count, and the record that re-makes a run."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from diffdistill.config import Config, to_dict
from diffdistill.errors import StageError
from diffdistill.files import atomic_write_json, atomic_write_text
from diffdistill.runs import input_tokens

PACKAGES = ("diffdistill", "torch", "diffusers", "numpy", "kornia", "safetensors", "pillow", "scikit-learn")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {name!r} requested but CUDA is not available; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise StageError(f"config key 'device': expected auto, cpu, cuda or cuda:N, got {name!r}") from None


def setup(cfg: Config) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    return resolve_device(cfg.device)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: on CUDA it is pinned and copied
    asynchronously (a plain copy from pageable memory first waits for the queued GPU work)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


SAMPLE_BATCH = {"cpu": 64, "cuda": 256}  # sample.batch_size=auto: images per batch by device type


def sample_batch(size: int | str, device: torch.device) -> int:
    """`sample.batch_size` as a number: `auto` by the device (SAMPLE_BATCH; 64 elsewhere)."""
    return SAMPLE_BATCH.get(device.type, 64) if size == "auto" else int(size)


def sample_batches(classes: int, ipc: int, draws: int, size: int) -> list[list[tuple[int, int]]]:
    """The sample stage's batches of jobs (class, image index), class-major: `size` images at a time; with
    several draws per image (`sample.candidates`) whole classes (image i's pick depends on images 0..i−1 of its
    class), as many as fit in `size` draws and at least one. A batch's draws are sampled `size` at a time."""
    jobs = [(c, i) for c in range(classes) for i in range(ipc)]
    if draws == 1:
        return [jobs[k : k + size] for k in range(0, len(jobs), size)]
    per = max(1, size // (ipc * draws))
    return [jobs[k : k + per * ipc] for k in range(0, len(jobs), per * ipc)]


def compiled(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """`model` through torch.compile when the config asks for it (`compile`, `compile_mode`), else itself. The
    compiled module forwards attribute reads (config, ...) to the model; weights stay shared."""
    return torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the DiT's forward ("fp32": none). Works on CUDA and, for tests, on CPU."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


# matrix-product modules whose weight and bias autocast casts to the low dtype in every forward, with the call
# that takes the weights as arguments (exact types only: a subclass may have a forward of its own)
CAST_CALLS = {
    torch.nn.Linear: lambda m, x, w, b: torch.nn.functional.linear(x, w, b),
    torch.nn.Conv1d: lambda m, x, w, b: m._conv_forward(x, w, b),
    torch.nn.Conv2d: lambda m, x, w, b: m._conv_forward(x, w, b),
    torch.nn.Conv3d: lambda m, x, w, b: m._conv_forward(x, w, b),
}


class CastOnce:
    """`model` called under bf16/fp16 autocast with its frozen matrix weights cast once instead of by autocast.

    Autocast casts every Linear/Conv weight and bias to the low dtype in every forward: one kernel per tensor
    and a pass over all the weights (a DiT-XL/2 DiffFit step casts 201 frozen weight matrices, 675 M values,
    each step). Here the frozen ones are cast once, when wrapped (the model must not change them
    afterwards); trainable ones are left to autocast, which casts them as before. The cast is the same
    rounding of the same fp32 values that autocast makes, so outputs, gradients and weights are identical
    (tested).

    The Linear/Conv modules with a frozen parameter get a forward that passes the cast copy while this
    object is being called and is their own forward otherwise; the parameters themselves are never touched,
    so the model's state dict stays fp32. Costs a low-precision copy of the frozen weights (2 bytes per value
    in bf16)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.model, self.active = model, False
        cast: dict[int, torch.Tensor] = {}  # id(frozen parameter) -> its low-precision copy (tied ones once)
        for module in {id(m): m for m in model.modules()}.values():  # tied modules once
            call = CAST_CALLS.get(type(module))
            if call is None:
                continue
            frozen = [p for p in (module.weight, module.bias) if p is not None and not p.requires_grad]
            if not frozen:
                continue
            for p in frozen:
                if id(p) not in cast:
                    cast[id(p)] = p.detach().to(dtype)
            weight, bias = (None if p is None else cast.get(id(p), p) for p in (module.weight, module.bias))
            module.forward = self._forward(module, call, module.forward, weight, bias)

    def _forward(self, module: torch.nn.Module, call: Any, own: Any, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return call(module, x, weight, bias) if self.active else own(x)

        return forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.active = True
        try:
            return self.model(*args, **kwargs)
        finally:
            self.active = False


class DeviceTimer:
    """Time spent in a stretch of device work, summed over many stretches. On CUDA it records events (no host
    synchronization until `seconds()`, so it times the GPU work itself, not what was queued before it); on
    the CPU it reads the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.total, self.events = 0.0, []

    def start(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started: Any) -> None:
        if not self.cuda:
            self.total += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events.append((started, end))

    def seconds(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events = []
        return self.total


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on `parts` (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() + ("+dirty" if dirty else "")) if res.returncode == 0 else None


def write_run_info(folder: Path, cfg: Config, stage: str, extra: dict[str, Any]) -> None:
    """config.yaml (resolved) and run_info.json (command, versions, commit, seeds, data hashes) in `folder`."""
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    atomic_write_json(folder / "run_info.json", {
        "stage": stage,
        "command": sys.argv,
        "torchrun": {k: os.environ[k] for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                     if k in os.environ} or None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": cfg.seed,
        "device": cfg.device,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "auto": dict(cfg.auto),  # keys set to auto and the values chosen for this data (diffdistill.recipe)
        "made": uuid.uuid4().hex,  # this output's token; "reads": those of the outputs it was made from
        "reads": input_tokens(cfg, stage),
        **extra,
    })
