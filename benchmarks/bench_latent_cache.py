"""Paper-scale costs, measured at reduced width on a CPU. Prints JSON.

1. Fine-tune steps/s reading the latent cache vs encoding every batch with the VAE, same config (the
   imagewoof paper config at 256 px: DiffFit, adaptive memories, hybrid loss, batch 8), with an SD-VAE-shaped
   autoencoder and a DiT of reduced width (the full ones take seconds per image on 2 cores).
   Goal: >= 1.5x. The one-off cost of `prepare` is reported beside it.
2. Memory banks for 1000 classes x 64 rows x D = 4096 (the imagenet1k config): bytes held and peak process
   memory while filling them and running fine-tune pushes, float32 and float16. Goal: <= 2 GB in total.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffdistill.cli import main
from diffdistill.runtime import package_versions

STEPS = 12
WIDTH = {"vae": (32, 64, 128, 128), "dit": "DiT-S/4"}  # SD VAE: (128, 256, 512, 512); paper DiT: XL/2


def _fixture(root: Path) -> list[str]:
    from diffusers import AutoencoderKL

    from diffdistill.data.classes import PRESETS
    from diffdistill.models.dit import build_dit, save_dit

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=WIDTH["vae"], down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=256, scaling_factor=0.18215)
    vae.save_pretrained(root / "hub" / "vae")
    dit = build_dit(WIDTH["dit"], 4, 32, 1000, learn_sigma=True)
    save_dit(root / "hub" / "transformer", dit, dit.state_dict())
    rng = np.random.default_rng(0)
    for wnid in PRESETS["imagewoof"]():
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(8):
            arr = rng.integers(0, 256, (256, 300, 3)).astype(np.uint8)
            Image.fromarray(arr).save(root / "train" / wnid / f"{i}.JPEG", quality=90)
    return [f"out_dir={root / 'runs'}", f"data.train={root / 'train'}", f"autoencoder.pretrained={root / 'hub'}",
            "autoencoder.subfolder=vae", f"finetune.init={root / 'hub'}", "finetune.revision=null",
            f"finetune.steps={STEPS}", "finetune.log_every=4", "finetune.difffit_blocks=6", "threads=2"]


def latent_cache() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = _fixture(Path(tmp))
        assert main(["prepare", "configs/imagewoof.yaml", *overrides]) == 0
        cache = next((Path(tmp) / "runs" / "latent-cache").iterdir())
        prep = json.loads((cache / "manifest.json").read_text())
        out = {}
        for mode in ("images", "cache"):
            assert main(["finetune", "configs/imagewoof.yaml", *overrides, f"finetune.latents={mode}",
                         f"name={mode}"]) == 0
            info = json.loads((Path(tmp) / "runs" / mode / "finetune" / "run_info.json").read_text())
            out[mode] = round(STEPS / info["seconds"], 3)
    return {"image_size": 256, "latent": [4, 32, 32], "vae_block_out_channels": list(WIDTH["vae"]),
            "dit": WIDTH["dit"], "batch_size": 8, "steps": STEPS, "steps_per_s_encode_every_step": out["images"],
            "steps_per_s_latent_cache": out["cache"], "speedup": round(out["cache"] / out["images"], 2),
            "prepare_seconds_80_images_mirrored": prep["seconds"]}


def _status_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e6  # kB
    raise KeyError(field)


def banks_child(dtype_name: str) -> dict:
    """Run in a fresh process so that peak RSS is this measurement's alone."""
    from diffdistill.memory import MemoryBank

    classes, size, dim = 1000, 64, 4096
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    torch.randn(8, dim, generator=g)  # warm up torch's allocator and kernels before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_gb("VmRSS")
    banks = [MemoryBank(classes, size, dim, "adaptive", dtype=dtype) for _ in range(2)]
    for bank in banks:  # fill every class (16 classes x 72 rows per push: each push also prunes)
        for lo in range(0, classes, 16):
            labels = torch.arange(lo, min(classes, lo + 16)).repeat_interleave(72)
            bank.push(torch.randn(len(labels), dim, generator=g), labels)
    for _ in range(50):  # fine-tune pushes: batch 8 of random classes
        labels = torch.randint(0, classes, (8,), generator=g)
        for bank in banks:
            bank.push(torch.randn(8, dim, generator=g), labels)
    held = sum(t.nbytes for bank in banks for t in bank.state_dict().values())
    return {"dtype": dtype_name, "held_gb": round(held / 1e9, 3),
            "peak_rss_increase_gb": round(_status_gb("VmHWM") - base, 3),
            "full": bool(all((bank.counts == size).all() for bank in banks))}


def banks() -> list[dict]:
    out = []
    for dtype in ("float32", "float16"):
        res = subprocess.run([sys.executable, __file__, "--banks", dtype], capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout))
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--banks":
        print(json.dumps(banks_child(sys.argv[2])))
        sys.exit(0)
    torch.set_num_threads(2)
    result = {"latent_cache": latent_cache(), "banks_1000_classes": banks(),
              "threads": torch.get_num_threads(), "versions": package_versions()}
    print(json.dumps(result, indent=2))
