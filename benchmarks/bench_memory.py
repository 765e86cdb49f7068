"""Memory cost in fine-tuning: step time per policy (none / fifo / adaptive), one push at the demo's shape
(eager, eager told the batch's largest class, and through torch.compile as `compile: true` runs it), the
parts of one step's memory work (loss forward, its backward, the two pushes, and the page faults they
cause), and the adaptive prune against a naive version that recomputes the similarity matrix after every removal.
Prints JSON.

Goals: memory work <= 3 % of a step; at 72 -> 64 rows of D = 4096 the incremental prune >= 5x faster
than the naive one, with the same result. Ratios come from one run on one machine.
"""

import contextlib
import json
import resource
import statistics
import tempfile
import time

import torch

from diffdistill.config import build_config
from diffdistill.losses import memory_loss_dense
from diffdistill.memory import MemoryBank, select_adaptive, similarity_matrix
from diffdistill.runtime import package_versions
from diffdistill.stages.train import most_per_class, train_stage


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def select_adaptive_naive(bank: torch.Tensor, size: int) -> torch.Tensor:
    """The baseline: recompute the similarity matrix after every removal."""
    keep = torch.arange(bank.shape[0])
    while keep.numel() > size:
        i = int(similarity_matrix(bank[keep]).sum(dim=1).argmax())
        keep = torch.cat([keep[:i], keep[i + 1 :]])
    return keep


def prune(rows: int = 72, keep: int = 64, dim: int = 4096, trials: int = 20) -> dict:
    g = torch.Generator().manual_seed(0)
    banks = [torch.randn(rows, dim, generator=g) for _ in range(trials)]
    same = all(select_adaptive(b, keep).tolist() == select_adaptive_naive(b, keep).tolist() for b in banks)
    naive = statistics.median(best_of(lambda b=b: select_adaptive_naive(b, keep), 5) for b in banks)
    fast = statistics.median(best_of(lambda b=b: select_adaptive(b, keep), 5) for b in banks)
    return {"rows": rows, "keep": keep, "dim": dim, "same_selection": same, "naive_ms": round(naive * 1e3, 3),
            "incremental_ms": round(fast * 1e3, 3), "speedup": round(naive / fast, 2)}


def demo_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` seeded batches at the demo's memory shape: 32 rows of D = 256 over 10 classes."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(count)]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def push_times(policy: str, pushes: int = 60) -> dict:
    """ms of process time per push into 10 banks of 64 rows of D = 256 (the demo's shape), batch 32, one thread:
    eager; eager with `most` (the batch's largest class, as the training loop passes it); compiled (inductor;
    the first push compiles). The compiled banks must end equal to the eager ones, to the bit."""
    batches = demo_batches(20 + pushes)
    banks = {name: MemoryBank(10, 64, 256, policy) for name in ("eager", "eager, told most", "compiled")}
    t0 = time.perf_counter()
    banks["compiled"].compile()
    banks["compiled"].push(*batches[0])
    compile_s = time.perf_counter() - t0
    for name, bank in banks.items():
        for rows, labels in batches[int(name == "compiled"):20]:
            bank.push(rows, labels)
    times = {name: [] for name in banks}
    with one_thread():
        for _ in range(3):  # alternated, the median of three
            for name, bank in banks.items():
                t = time.process_time()
                for rows, labels in batches[20:]:
                    bank.push(rows, labels, most=most_per_class(labels) if name != "eager" else None)
                times[name].append((time.process_time() - t) / pushes)
    states = [b.state_dict() for b in banks.values()]
    same = all(torch.equal(a, b) for other in states[1:] for a, b in zip(states[0].values(), other.values()))
    return {**{f"{k}_ms": round(1e3 * statistics.median(v), 3) for k, v in times.items()},
            "compile_s": round(compile_s, 1), "identical_banks": same}


def step_parts(steps: int = 60) -> dict:
    """ms of process time for each part of one step's memory work at the demo's shape (10 classes × 64 rows,
    D = 256, batch 32, one thread), in the training loop's order: the memory loss's forward, its backward, the
    two adaptive pushes told the largest class; and the minor page faults of the pushes per step."""
    batches = demo_batches(20 + steps)
    real, gen = MemoryBank(10, 64, 256, "adaptive"), MemoryBank(10, 64, 256, "adaptive")
    for rows, labels in batches[:20]:
        real.push(rows, labels)
        gen.push(0.5 * rows + 0.1, labels)
    times, faults = {"loss_forward": 0.0, "loss_backward": 0.0, "two_pushes": 0.0}, 0
    with one_thread():
        for rows, labels in batches[20:]:
            x0 = rows.clone().requires_grad_()
            t0 = time.process_time()
            loss = memory_loss_dense(x0, labels, real.rows, real.counts, gen.rows, gen.counts, 0.002, 0.008)[0]
            t1 = time.process_time()
            loss.backward()
            t2, f2 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            most = most_per_class(labels)
            real.push(rows, labels, most=most)
            gen.push(x0.detach(), labels, most=most)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f2
            for key, seconds in zip(times, (t1 - t0, t2 - t1, time.process_time() - t2)):
                times[key] += seconds
    return {**{f"{k}_ms": round(1e3 * v / steps, 3) for k, v in times.items()},
            "push_page_faults_per_step": round(faults / steps, 1)}


def finetune_steps(policy: str, steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config({}, ["name=bench", f"out_dir={out}", "threads=2", "data.hflip=false",
                                "autoencoder.unshuffle=2", "diffusion.schedule=cosine", "sample.clip_denoised=true",
                                "finetune.init=null",
                                f"finetune.steps={steps}", "finetune.batch_size=32", f"finetune.log_every={steps}",
                                f"finetune.memory.policy={policy}", *overrides])
        folder = train_stage(cfg, "finetune")
        info = json.loads((folder / "run_info.json").read_text())
    return {"ms_per_step": round(1e3 * info["seconds"] / steps, 2),
            "memory_ms_per_step": round(1e3 * info["memory_seconds"] / steps, 3),
            "memory_share_percent": round(100 * info["memory_seconds"] / info["seconds"], 2)}


def main() -> None:
    torch.set_num_threads(2)
    settings = {
        "demo (digits 16 px, D = 4x8x8 = 256)": (["data.image_size=16"], 150),
        "D = 4x32x32 = 4096 (digits at 64 px)": (["data.image_size=64"], 40),
    }
    steps = {name: {p: finetune_steps(p, n, ov) for p in ("none", "fifo", "adaptive")}
             for name, (ov, n) in settings.items()}
    pushes = {p: push_times(p) for p in ("fifo", "adaptive")}
    print(json.dumps({"benchmark": "memory", "prune_72_to_64": prune(), "push_demo_shape": pushes,
                      "memory_step_parts_demo_shape": step_parts(),
                      "finetune_step": steps,
                      "torch_threads": torch.get_num_threads(), "versions": package_versions()}, indent=2))


if __name__ == "__main__":
    main()
