"""Rank and world from torchrun's environment; a no-op on one process.

`torchrun --nproc_per_node N -m diffdistill STAGE CONFIG ...` sets RANK / WORLD_SIZE / LOCAL_RANK; the
process group uses NCCL when the run's device is CUDA (one GPU per process, cuda:LOCAL_RANK) and gloo on
CPU. Every collective here is skipped when WORLD_SIZE is 1, so single-process runs need nothing.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from diffdistill.errors import StageError

GLOO_TIMEOUT = timedelta(days=1)  # collectives of CPU process groups (torch's default: 30 min)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def enabled() -> bool:
    return world_size() > 1


def init(device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device."""
    if not enabled():
        return device
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise StageError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', world_size())} processes on "
                             f"this machine but it has {torch.cuda.device_count()} GPU(s): one process per GPU "
                             f"(--nproc_per_node), or device=cpu")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # CPU ranks can reach a barrier hours apart (one trains a full-data classifier while the other waits)
        timeout = None if device.type == "cuda" else GLOO_TIMEOUT
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return device


def barrier() -> None:
    if enabled() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not (enabled() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's [B_r, ...] tensor in rank order (ranks may hold different B_r)."""
    if not (enabled() and dist.is_initialized()):
        return x
    sizes = [int(s) for s in all_gather_object(int(x.shape[0]))]
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not (enabled() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any (so that all ranks stop together)."""
    if not (enabled() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
