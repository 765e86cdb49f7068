"""Operations per fine-tune step at the paper's structure, counted on any machine (prints JSON).

On a GPU a step of this size is host-bound: its time follows the number of operations the host dispatches
(each one a kernel launch or more), not the FLOPs. This counts them on the CPU, where the code path is the
same: DiT-XL/2's structure (28 blocks, patch 2, learned sigma, latents 4×32×32) at a narrow width so that it
runs in seconds, batch 8, DiffFit on 14 blocks, bf16 autocast, memories 64/64 of 10 classes; the aten
operations of 3 steps after 5 warm-up steps, less views and allocations, per step and by part of the step.

The CPU runs a few things its own way (AdamW and EMA per tensor where CUDA runs them fused or in a few
multi-tensor kernels; addmm's bias copy; casts of Python scalars), so compare counts between versions, not
with a GPU profile. `python benchmarks/bench_ops.py [--precision fp32]`
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import tempfile

import torch
from bench_gpu import RandomLatents  # benchmarks/ is on the path when a benchmark runs as a script
from torch.profiler import ProfilerActivity, profile, record_function

from diffdistill.config import build_config
from diffdistill.models import dit
from diffdistill.models.adapters import make_trainable
from diffdistill.runtime import package_versions
from diffdistill.stages.train import TrainLoop

# the paper's depth and token count at a width of 32 (DiT-XL/2 is 1152 wide)
PROBE = dict(num_layers=28, num_attention_heads=2, attention_head_dim=16, patch_size=2)
# operations that launch no kernel (views, metadata, allocations)
NO_KERNEL = set("""empty empty_strided view as_strided _reshape_alias resolve_conj resolve_neg detach t transpose
unsqueeze squeeze expand permute slice select alias _unsafe_view unflatten lift_fresh split chunk narrow reshape
flatten contiguous empty_like result_type split_with_sizes""".split())


def _labelled(name: str, fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with record_function("part:" + name):
            return fn(*args, **kwargs)

    return inner


def count(policy: str, precision: str, steps: int = 3) -> dict[str, float]:
    shape = (4, 32, 32)
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config({}, [f"out_dir={out}", "name=bench", f"precision={precision}", "finetune.batch_size=8",
                                f"finetune.memory.policy={policy}", "finetune.trainable=difffit", "threads=1",
                                "finetune.memory.size_real=64", "finetune.memory.size_gen=64",
                                "finetune.log_every=1000000"])
        torch.manual_seed(0)
        dit.SIZES["probe"] = PROBE
        try:
            model = dit.build_dit("probe", shape[0], shape[1], 1000, learn_sigma=True)
        finally:
            del dit.SIZES["probe"]
        loop = TrainLoop(cfg, "finetune", model.train(), make_trainable(model, "difffit", 14),
                         RandomLatents(640, 10, shape), shape, torch.arange(10), torch.device("cpu"))
        loop.draw = _labelled("draw", loop.draw)
        loop.net = _labelled("forward", loop.net)
        loop.losses = _labelled("losses (other)", loop.losses)
        loop._update = _labelled("backward, grad clip", loop._update)
        loop.opt.step = _labelled("optimizer", loop.opt.step)
        loop.ema.update = _labelled("ema", loop.ema.update)
        loop._remember = _labelled("memory push", loop._remember)
        for loop.step in range(1, 6):
            loop.train_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for loop.step in range(6, 6 + steps):
                loop.train_step()
    parts: collections.Counter = collections.Counter()
    for e in prof.events():
        if e.cpu_children or not e.name.startswith("aten::") or e.name[6:] in NO_KERNEL:
            continue
        parent, part = e.cpu_parent, "other"
        while parent is not None:
            if parent.name.startswith("part:"):
                part = parent.name[5:]
                break
            parent = parent.cpu_parent
        parts[part] += 1
    per_step = {k: v / steps for k, v in sorted(parts.items())}
    return {"total": sum(per_step.values()), **per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {p: count(p, args.precision) for p in ("none", "fifo", "adaptive")}
    print(json.dumps({"benchmark": "operations per fine-tune step (DiT-XL/2 structure, narrow)",
                      "precision": args.precision, "ops_per_step": result,
                      "memory_ops_per_step": {p: result[p]["total"] - result["none"]["total"]
                                              for p in ("fifo", "adaptive")},
                      "versions": package_versions()}, indent=2))


if __name__ == "__main__":
    main()
