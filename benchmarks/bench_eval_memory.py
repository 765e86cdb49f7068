"""Peak host memory of `diffdistill evaluate` on a synthetic 1000-class set, sets held whole vs streamed.

Writes a folder set of 1000 classes (train = IPC images per class, val, a distilled set of IPC per class; small
PNG files, read at data.image_size and resized to the classifier's evaluate.image_size, which is what sizes a
set in memory), runs `diffdistill evaluate` on it once per mode in a child process and reports that process's
peak RSS. Mode `memory`: every set held whole (evaluate.resident_gb large); `streamed`: none (resident_gb 0);
`auto`: the tool's own choice. Training is one epoch of a narrow ConvNet-3 in one process (`evaluate.workers` N
holds N copies): the figure is about the sets, not the net. Prints JSON.

    python benchmarks/bench_eval_memory.py                       # IPC 10 at 64 px: all three modes, minutes
    python benchmarks/bench_eval_memory.py --ipc 50 --size 224 --modes auto   # ImageNet-1K IPC 50's shape
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

MODES = {"memory": "1000", "streamed": "0", "auto": "null"}
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)")


def write_set(root: Path, classes: int, per_class: int, size: int, seed: int) -> None:
    """`per_class` PNGs of each class: a class colour plus noise, `size` px."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"c{c:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], dtype=np.int16)
        for i in range(per_class):
            noise = rng.integers(-40, 41, (size, size, 3), dtype=np.int16)
            Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--val-per-class", type=int, default=2)
    ap.add_argument("--file-size", type=int, default=32, help="px of the PNG files and data.image_size")
    ap.add_argument("--size", type=int, default=64, help="classifier input px (evaluate.image_size)")
    ap.add_argument("--modes", default="streamed,auto,memory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        for name, per_class, seed in (("train", args.ipc, 0), ("val", args.val_per_class, 1), ("syn", args.ipc, 2)):
            write_set(root / name, args.classes, per_class, args.file_size, seed)
        written = time.perf_counter() - t0
        set_bytes = args.classes * 3 * args.size**2
        out = {"classes": args.classes, "ipc": args.ipc, "val_images": args.classes * args.val_per_class,
               "file_px": args.file_size, "classifier_px": args.size, "write_seconds": round(written, 1),
               "gb_held_whole": {"distilled": round(set_bytes * args.ipc / 2**30, 2),
                                 "random_real": round(set_bytes * args.ipc / 2**30, 2),
                                 "val": round(set_bytes * args.val_per_class / 2**30, 2)}, "modes": {}}
        for mode in args.modes.split(","):
            cmd = [sys.executable, "-m", "diffdistill", "evaluate", "configs/demo-digits.yaml",
                   f"data.train={root / 'train'}", f"data.val={root / 'val'}", f"data.image_size={args.file_size}",
                   "data.channels=3", "data.hflip=true", f"out_dir={root / ('out-' + mode)}",
                   f"evaluate.image_size={args.size}", f"evaluate.ipc=[{args.ipc}]", "evaluate.full=false",
                   "evaluate.metrics=false", "evaluate.labels=[hard]", "evaluate.nets=[convnet3]",
                   "evaluate.width=8", "evaluate.epochs=1", "evaluate.eval_every=1", "evaluate.seeds=1",
                   "evaluate.batch_size=256", "evaluate.workers=1", f"evaluate.resident_gb={MODES[mode]}",
                   "--distilled", str(root / "syn")]
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{mode}: evaluate failed:\n{done.stderr[-2000:]}")
            results = json.loads(next((root / f"out-{mode}").rglob("evaluate/results.json")).read_text())
            ipc = results["ipc"][str(args.ipc)]
            out["modes"][mode] = {"peak_rss_gb": round(int(done.stdout.split()[-1]) / 2**20, 2),
                                  "seconds": round(time.perf_counter() - t0, 1),
                                  "accuracy": {"distilled": ipc["distilled"]["runs"],
                                               "random_real": ipc["random_real"]["runs"]}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
