"""Coreset selection and k-means modes at ImageNet-1K's per-class shape: 1,300 latents of D = 4 × 32 × 32 =
4096 per class, k = IPC 10 and 50. Prints JSON: seconds per class for k-means (the modes of mgd3 / d4m and
the kmeans selection), herding and k-center, on the CPU and, where there is one, on the GPU.

Goal: k-means <= 1 s per class on a GPU (so a 1,000-class mode discovery takes minutes, not hours).
"""

import json
import statistics
import time

import torch

from diffdistill.runtime import package_versions
from diffdistill.select import herding, kcenter, kmeans


def seconds(fn, args: tuple, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 4)


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = {"benchmark": "select", "points_per_class": 1300, "dim": 4096, "torch_threads": torch.get_num_threads(),
           "versions": package_versions(), "seconds_per_class": {}}
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        x = torch.randn(1300, 4096, generator=torch.Generator().manual_seed(0)).to(device)
        for k in (10, 50):
            kmeans(x, k, 0)  # warm-up
            out["seconds_per_class"][f"{device} k={k}"] = {
                "kmeans": seconds(kmeans, (x, k, 0), 3, sync), "herding": seconds(herding, (x, k), 3, sync),
                "kcenter": seconds(kcenter, (x, k), 3, sync)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
