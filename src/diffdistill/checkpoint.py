"""Resumable training checkpoints: everything a training step changes, so a resumed run repeats the
uninterrupted one bit for bit.

    <root>/step-<N>/trainable.safetensors   trainable weights (param.i) and their EMA (ema.i)
                   optimizer.pt             optimizer, lr schedule and loss-scaler states
                   rank-<r>.pt              per rank: generator, data order, memories, running log sums
                   log.jsonl                the log rows up to step N
                   state.json               step, world size, the config it must be resumed with; written
                                            last, so its presence marks a complete checkpoint
Only tensors and plain containers are stored; they are read back with safetensors or
torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffdistill import distributed as dist
from diffdistill.config import Config, flat_keys, to_dict
from diffdistill.errors import StageError
from diffdistill.files import atomic_torch_save, atomic_write_json, atomic_write_text, replace_dir
from diffdistill.runs import VAL_KEYS, unused_data_keys

# keys that may change between a checkpoint and its resumption (they do not change the result)
RESUME_FREE = {"steps", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every"}
# what a checkpoint holds and how the loop uses it; bump when a resumed run would no longer repeat the original
# (2: the DiT runs with the original DiT's timestep spacing; ranks share one data order per epoch; 3: on a GPU
# timesteps and noise come from a generator there, saved with the rank's state)
FORMAT = 3


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, Tensor]  # param.i and ema.i, in the order of the trainable parameters
    optimizer: dict  # {"optimizer", "lr_scheduler", "scaler"} state dicts
    rank: dict  # this rank's {"generator", "order", "sums", "banks"}
    log: list[dict]  # the log rows up to `step`


def resume_spec(cfg: Config, stage: str) -> dict:
    """The part of the config a checkpoint must match to be resumed bit-identically."""
    d = to_dict(cfg)
    return {"format": FORMAT, "seed": cfg.seed, "precision": cfg.precision, "data": d["data"],
            "autoencoder": d["autoencoder"], "model": d["model"], "diffusion": d["diffusion"], "prepare": d["prepare"],
            stage: {k: v for k, v in d[stage].items() if k not in RESUME_FREE}}


def valid_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (state.json is written last), newest first."""
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name, reverse=True)


def save_checkpoint(root: Path, ckpt: Checkpoint, spec: dict, keep: int) -> None:
    """Write `ckpt` as <root>/step-<N>/ and keep the newest `keep`. Every rank calls this with its own
    `ckpt.rank`; rank 0 writes the shared files."""
    final = root / f"step-{ckpt.step:08d}"
    tmp = root / f".step-{ckpt.step:08d}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    atomic_torch_save(ckpt.rank, tmp / f"rank-{dist.rank()}.pt")
    if dist.is_main():
        save_file(ckpt.tensors, str(tmp / "trainable.safetensors"))
        atomic_torch_save(ckpt.optimizer, tmp / "optimizer.pt")
        atomic_write_text(tmp / "log.jsonl", "".join(json.dumps(r) + "\n" for r in ckpt.log))
    dist.barrier()
    if dist.is_main():
        atomic_write_json(tmp / "state.json", {"step": ckpt.step, "world_size": dist.world_size(), "config": spec})
        replace_dir(tmp, final)
        for old in valid_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(folder: Path, spec: dict) -> Checkpoint:
    """This rank's view of the checkpoint in `folder`, after checking that this run may resume it."""
    state = json.loads((folder / "state.json").read_text())
    if state["world_size"] != dist.world_size():
        raise StageError(f"{folder} was written by {state['world_size']} processes, this run has "
                         f"{dist.world_size()}: resume with the same number (torchrun --nproc_per_node)")
    if state["config"].get("format") != spec["format"]:
        raise StageError(f"{folder} was written by an earlier version of diffdistill and cannot be resumed "
                         f"exactly; pass --force to start over")
    old, new = flat_keys(state["config"]), flat_keys(spec)
    unused = VAL_KEYS | unused_data_keys(old, new)  # training reads neither the val set nor an unused built-in set
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in unused)
    if keys:
        raise StageError(f"{folder} was made with a different config ({', '.join(keys[:6])} differ); "
                         f"resume with the same config or pass --force to start over")
    try:
        tensors = load_file(str(folder / "trainable.safetensors"))
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        rank = torch.load(folder / f"rank-{dist.rank()}.pt", map_location="cpu", weights_only=True)
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    except Exception as err:  # damaged files: name them, never resume from half a state
        raise StageError(f"checkpoint {folder} cannot be read ({str(err).splitlines()[0]}); delete it to "
                         f"resume from an older one, or pass --force to start over") from None
    return Checkpoint(state["step"], tensors, optimizer, rank, log)


def remove_checkpoints(root: Path) -> None:
    """Rank 0 removes a finished stage's checkpoints (the stage's output supersedes them)."""
    if dist.is_main():
        shutil.rmtree(root, ignore_errors=True)
        if root.parent.is_dir() and not any(root.parent.iterdir()):
            root.parent.rmdir()
